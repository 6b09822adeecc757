"""What a new user reads: `list methods NAME`, the help epilogs and the README's examples."""

from __future__ import annotations

import dataclasses
import re

import pytest

from benchmark.cli import EPILOG, main
from benchmark.commands import RUN_EPILOG
from methods.registry import get_method
from tests.helpers import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_list_methods_name_shows_type_default_source_and_grid_behaviour(capsys):
    assert main(["list", "methods", "dreambooth"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert re.search(r"^steps\s+int\s+1000\s+axis\s+paper$", rows["steps"])
    assert re.search(r"^learning_rate\s+float\s+5e-06\s+axis\s+paper$", rows["learning_rate"])
    assert re.search(r"class_images\s+int\s+200\s+axis\s+diffusers example", rows["class_images"])
    assert re.search(r"checkpoint_steps\s+tuple\[int, \.\.\.\]\s+\[\]\s+checkpoints\s+ours: ", rows["checkpoint_steps"])
    assert "a list is ONE training that saves more checkpoints" in " ".join(out.split())
    for field in dataclasses.fields(get_method("dreambooth").Params):
        assert field.name in rows, field.name


@pytest.mark.parametrize("name", ["textual_inversion", "dreambooth", "dreambooth_lora"])
def test_every_shipped_default_names_its_source(name):
    for field in dataclasses.fields(get_method(name).Params):
        assert field.metadata.get("source"), f"{name}.{field.name} has no recorded source"


def test_dreambooth_lora_states_that_prior_preservation_is_our_choice(capsys):
    """The LoRA recipe its defaults cite trains without prior preservation; ours keeps it on, says
    so in the docstring and in `list methods`, and keeps the full method's defaults (and keys)."""
    from methods.dreambooth import DreamBoothLoRA, DreamBoothLoRAParams, DreamBoothParams

    assert main(["list", "methods", "dreambooth_lora"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "prior preservation kept on (our choice: the diffusers LoRA recipe has none" in out
    assert re.search(r"class_images int 200 axis ours: prior preservation kept ON, unlike the diffusers LoRA README", out)
    assert "0 gives the LoRA README recipe" in out
    doc = " ".join(__import__("methods.dreambooth").dreambooth.__doc__.split())
    assert "Prior preservation stays on, a deliberate departure from the recipe these defaults cite" in doc
    lora, full = DreamBoothLoRAParams(), DreamBoothParams()
    assert (lora.class_images, lora.prior_loss_weight) == (full.class_images, full.prior_loss_weight) == (200, 1.0)
    assert lora.with_prior_preservation and DreamBoothLoRA.Params is DreamBoothLoRAParams
    names = [f.name for f in dataclasses.fields(DreamBoothLoRAParams)]
    assert names == [f.name for f in dataclasses.fields(DreamBoothParams)] + ["rank"]  # field order, so keys, unchanged


def test_list_methods_unknown_name_is_one_error_line(capsys):
    assert main(["list", "methods", "dreambooht"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'dreambooht' (did you mean 'dreambooth'?)") and "Traceback" not in err


def _method_overrides(text: str) -> set[tuple[str, str]]:
    return set(re.findall(r"methods\.([a-z_]+)\.([a-z_]+)=", text))


@pytest.mark.parametrize("where", ["README.md", "run --help", "--help"])
def test_documented_overrides_name_real_parameters(where):
    text = {"README.md": README, "run --help": RUN_EPILOG, "--help": EPILOG}[where]
    for method, parameter in _method_overrides(text):
        fields = {f.name for f in dataclasses.fields(get_method(method).Params)}
        assert parameter in fields, f"{where}: methods.{method}.{parameter} is not a parameter"
    assert not re.search(r"\blr=", text), f"{where}: 'lr' is not a parameter (learning_rate is)"


def test_examples_use_paths_a_user_has():
    assert "shared/datasets" not in EPILOG and "shared/datasets" not in RUN_EPILOG
    assert "subjectbench data verify\n" in EPILOG


def test_readme_groups_results_by_entry_and_explains_checkpoint_lists():
    snippet = README.split("```python", 1)[1].split("```", 1)[0]
    assert 'groupby(["entry", "metric"])' in snippet and 'groupby(["method"' not in snippet
    assert "`checkpoint_steps` is\nnot a grid axis" in README
    assert "Real numbers need the `dreambooth` suite" in README and "dataset.source=custom" in README
