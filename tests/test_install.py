"""The installed set works together, and the shipped constraints file agrees with pyproject.

pip cannot see every pairing (transformers checks peft's version at run time without declaring
it), so these run first in CI and fail with the versions and the fix instead of a deep error.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from methods.dependencies import DependencyError, peft_requirement, require_compatible_peft

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f".ci/constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = Version(pinned)
    return pins


def test_installed_transformers_and_peft_work_together():
    found = peft_requirement()
    if found is None:
        pytest.skip("transformers or peft not installed")
    transformers_version, peft_version, minimum = found
    assert Version(peft_version) >= Version(minimum), (
        f"transformers {transformers_version} needs peft >= {minimum}, installed {peft_version}: "
        "tighten the transformers bound in pyproject.toml or raise peft's"
    )
    require_compatible_peft()


def test_incompatible_pair_is_a_clear_error(monkeypatch):
    import transformers.integrations.peft as transformers_peft

    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "999.0")
    with pytest.raises(DependencyError, match=r"needs peft >= 999.0.*constraints.txt"):
        require_compatible_peft()


def test_constraints_pin_every_requirement_inside_its_range():
    pins = _constraints()
    for requirement in _requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f".ci/constraints.txt lacks {requirement.name} (pyproject requires {requirement})"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f".ci/constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )


def test_installed_versions_inside_pyproject_ranges():
    for requirement in _requirements():
        installed = Version(version(requirement.name))
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"installed {requirement.name} {installed} is outside pyproject's {requirement}"
        )
