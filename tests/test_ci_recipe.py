"""The CI regression recipe (docs/ci-regression.yml, README) runs as written, on the dummy method.

The workflow's `subjectbench` lines are taken from the file itself and run in order with the
workflow's environment, OVERRIDES set to the fast dummy method: baseline run, export, current
run, compare against the bundle. A changed method must then fail the job (exit 1) with a
Markdown report fit for a pull-request comment.
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path

import pytest
import yaml

from benchmark.cli import main
from benchmark.config import load_config
from reports.bundle import verify_bundle
from tests.report_fakes import use_fakes

WORKFLOW = Path(__file__).resolve().parents[1] / "docs" / "ci-regression.yml"
FAST = "methods=dummy metrics.weights=random"


def recipe_commands() -> list[str]:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["regression"]["steps"]
    lines = [line.strip() for step in steps for line in str(step.get("run", "")).splitlines()]
    return [line for line in lines if line.startswith("subjectbench ")]


def run_recipe(commands: list[str], environment: dict[str, str]) -> list[int]:
    codes = []
    for line in commands:
        words = shlex.split(string.Template(line).substitute(environment))
        codes.append(main(words[1:]))
    return codes


def test_the_recipe_has_the_documented_steps():
    commands = [c.split()[1] for c in recipe_commands()]
    assert commands == ["run", "export", "run", "compare"]
    env = yaml.safe_load(WORKFLOW.read_text())["env"]
    assert env["SUITE"] == "regression"
    suite = load_config("regression")
    assert suite.backbone == "tiny" and suite.protocol.seed == 0 and len(suite.protocol.prompts) == 4
    readme = (WORKFLOW.parents[1] / "README.md").read_text()
    for command in recipe_commands():
        assert command.replace(" --quiet", "") in readme.replace(" --quiet", ""), command


@pytest.mark.parametrize("change", ["unchanged", "regressed"])
def test_recipe_runs_as_written(tmp_path, monkeypatch, capsys, change):
    use_fakes(monkeypatch)
    monkeypatch.chdir(tmp_path)
    env = {k: str(v) for k, v in yaml.safe_load(WORKFLOW.read_text())["env"].items()}
    env["OVERRIDES"] = FAST
    commands = recipe_commands()
    if change == "regressed":  # the baseline as written; the change lowers the method's subject fidelity
        commands = [c.replace("$OVERRIDES", "$OVERRIDES methods.dummy.fidelity=0.3") if c.startswith("subjectbench run")
                    and "runs/current" in c else c for c in commands]
        assert commands != recipe_commands()
    codes = run_recipe(commands, env)
    expected = 0 if change == "unchanged" else 1
    assert codes == [0, 0, 0, expected]
    verify_bundle(tmp_path / "baseline-bundle")
    comment = (tmp_path / "compare" / "compare.md").read_text()
    assert comment.startswith("# Comparison") and "| entry | metric |" in comment
    assert ("PASS" if change == "unchanged" else "FAIL: significant regression") in comment
    capsys.readouterr()
