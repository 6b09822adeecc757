"""Version pairs between our dependencies that pip cannot see, checked before they fail deep inside.

transformers checks peft's version at run time (``MIN_PEFT_VERSION``) but does not declare peft
as a requirement, so ``pip check`` passes on a set where every LoRA text-encoder adapter fails.
``require_compatible_peft()`` turns that into one clear error naming both versions and the fix.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

CONSTRAINTS_HINT = 'python -m pip install -e ".[dev]" -c .ci/constraints.txt'


class DependencyError(RuntimeError):
    """Installed package versions that do not work together."""


def peft_requirement() -> tuple[str, str, str] | None:
    """(transformers version, peft version, minimum peft transformers needs), or None if either is absent."""
    try:
        transformers_version = version("transformers")
        peft_version = version("peft")
    except PackageNotFoundError:
        return None
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # older transformers: no run-time floor to check
        return None
    return transformers_version, peft_version, MIN_PEFT_VERSION


def require_compatible_peft() -> None:
    found = peft_requirement()
    if found is None:
        return
    transformers_version, peft_version, minimum = found
    if Version(peft_version) < Version(minimum):
        raise DependencyError(
            f"transformers {transformers_version} needs peft >= {minimum}, but peft {peft_version} is "
            f"installed; install the tested set with `{CONSTRAINTS_HINT}` "
            f"(or `pip install 'transformers<{transformers_version}'`)"
        )
