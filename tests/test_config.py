"""Suites, overrides, validation messages, the method registry and its entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

from benchmark.cli import main
from benchmark.config import ConfigError, available_suites, load_config
from methods.base import ParamsError, expand_params
from methods.dummy import DummyParams
from methods.registry import UnknownMethodError, available_methods, get_method


def test_shipped_suites():
    suites = available_suites()
    assert {"default", "dreambooth"} <= set(suites)
    paper = load_config("dreambooth")
    assert paper.dataset.source == "dreambooth"
    assert paper.protocol.prompts == "all" and paper.protocol.images_per_prompt == 4
    assert (paper.protocol.sampler.steps, paper.protocol.sampler.guidance) == (50, 7.5)
    assert paper.protocol.resolution == 512 and paper.metrics.weights == "pretrained"
    default = load_config("default")
    assert default.backbone == "tiny" and default.dataset.source == "mini" and default.metrics.weights == "random"


def test_overrides_apply_with_types():
    cfg = load_config(
        "default",
        ["methods=dummy", "methods.dummy.noise=5e-1", "subjects=dog,teapot", "protocol.seed=7",
         "protocol.sampler.guidance=3", "backbone=sd15"],
    )
    assert cfg.methods[0].params == {"noise": 0.5}
    assert cfg.dataset.subjects == ("dog", "teapot")
    assert cfg.protocol.seed == 7 and cfg.protocol.sampler.guidance == 3.0 and cfg.backbone == "sd15"


@pytest.mark.parametrize(
    "override, message",
    [
        ("protocl.seed=1", r"unknown key 'protocl' \(did you mean 'protocol'\?\)"),
        ("protocol.sampler.stepz=3", r"protocol.sampler: unknown key 'stepz'.*allowed: name, steps, guidance, eta"),
        ("methods=dreambth", r"unknown method 'dreambth' \(did you mean 'dreambooth'\?\)"),
        ("methods.dummy.fidelty=1", r"methods.dummy.params: unknown parameter 'fidelty' \(did you mean 'fidelity'\?\)"),
        ("methods.dummy.fidelity=high", r"methods.dummy.params.fidelity: expected a number, got 'high'"),
        ("methods.dummy.fidelity=3", r"methods.dummy.params: fidelity must be in \[0, 1\], got 3.0"),
        ("protocol.prompts=[30]", r"protocol.prompts: expected 'all' or a list of prompt indices 0-24"),
        ("protocol.images_per_prompt=0", r"protocol.images_per_prompt: expected a positive integer, got 0"),
        ("backbone=sd16", r"unknown backbone 'sd16'; valid: sd14, sd15, sd21-base, tiny, sd15-random"),
        ("metrics.names=[clipt]", r"metrics.names: unknown metric 'clipt' \(did you mean 'clip_t'\?\)"),
        ("dtype=fp32", r"dtype: 'fp32' is not valid; allowed: auto, float32, bfloat16, float16"),
        ("dataset.source=imagenet", r"dataset.source: 'imagenet' is not valid"),
        ("nonsense", r"override 'nonsense' is not of the form key=value"),
        ("methods.nomethod.x=1", r"no method 'nomethod'"),
    ],
)
def test_bad_config_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", ["methods=dummy", override])


def test_unknown_suite_and_suite_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown suite 'dreembooth' \(did you mean 'dreambooth'\?\)"):
        load_config("dreembooth")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"name": "dummy"}], "metrics": {"names": []}}))
    assert load_config(str(path)).name == "mine"
    broken = tmp_path / "broken.yaml"
    broken.write_text("methods: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_config(str(broken))


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["run", "default", "methods=dummy", "protocol.seeed=1", "--out", "/nonexistent/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'seeed'" in err and "Traceback" not in err


def test_grid_expansion_rules():
    cells = expand_params(DummyParams, {"fidelity": [0.1, 0.2], "noise": [0.0, 0.5], "fail_subjects": ["a", "b"]}, "m")
    assert len(cells) == 4  # fail_subjects is a sequence field: a flat list is its value, not a grid
    assert cells[0][0].fail_subjects == ("a", "b")
    assert [grid for _, grid in cells][:2] == [{"fidelity": 0.1, "noise": 0.0}, {"fidelity": 0.1, "noise": 0.5}]
    grid = expand_params(DummyParams, {"fail_subjects": [["a"], ["b", "c"]]}, "m")
    assert [p.fail_subjects for p, _ in grid] == [("a",), ("b", "c")]
    with pytest.raises(ParamsError, match="m.noise: expected a number"):
        expand_params(DummyParams, {"noise": [0.1, "x"]}, "m")


def test_registry_lists_valid_names_and_loads_entry_points(tmp_path, monkeypatch):
    with pytest.raises(UnknownMethodError, match=r"unknown method 'dreamboth' \(did you mean 'dreambooth'\?\); valid: "):
        get_method("dreamboth")
    site = tmp_path / "site"
    (site / "myplugin-0.1.dist-info").mkdir(parents=True)
    (site / "myplugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (site / "myplugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[subjectbench.methods]\nmy_method = myplugin:MyMethod\nbroken = myplugin:NotAMethod\n"
    )
    (site / "myplugin.py").write_text(textwrap.dedent("""
        from methods.dummy import DummyMethod

        class MyMethod(DummyMethod):
            name = "my_method"
            description = "a third-party adapter"

        class NotAMethod:
            pass
    """))
    monkeypatch.syspath_prepend(str(site))
    assert "my_method" in available_methods()
    assert get_method("my_method").description == "a third-party adapter"
    with pytest.raises(UnknownMethodError, match="not a subclass of methods.base.Method"):
        get_method("broken")
    cfg = load_config("default", ["methods=my_method", "metrics.names=[]"])
    assert cfg.methods[0].name == "my_method"
    sys.modules.pop("myplugin", None)


def test_list_commands(capsys):
    for what, expected in (("methods", "dummy"), ("suites", "dreambooth"), ("backbones", "sd15-random"), ("metrics", "clip_t")):
        assert main(["list", what]) == 0
        assert expected in capsys.readouterr().out


def test_overrides_may_follow_options(tmp_path, capsys):
    code = main(["run", "default", "--out", str(tmp_path), "--quiet", "methods=dummy", "metrics.names=[]", "--no-report"])
    assert code == 0
    assert "24 generated" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def _every_field():
    import dataclasses

    from benchmark.config import (
        DatasetConfig,
        GenerationConfig,
        MetricsConfig,
        ProtocolConfig,
        RunConfig,
    )
    from methods.base import SamplerConfig

    sections = {"dataset": DatasetConfig, "protocol": ProtocolConfig, "protocol.sampler": SamplerConfig,
                "metrics": MetricsConfig, "generation": GenerationConfig}
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                yield f"{prefix}.{f.name}"
    for f in dataclasses.fields(RunConfig):
        if f.name not in sections and f.name not in ("name", "methods"):
            yield f.name


@pytest.mark.parametrize("key", list(_every_field()))
def test_every_config_field_rejects_a_wrong_value_up_front(key):
    """Optional fields too: a bad value never reaches the workers as a raw TypeError."""
    with pytest.raises(ConfigError, match=key.rsplit(".", 1)[-1]):
        load_config("default", [f"{key}={{bad: [1]}}"])


@pytest.mark.parametrize("value", ["abc", "-8", "30", "0", "true"])
def test_resolution_must_be_a_positive_multiple_of_8(value):
    with pytest.raises(ConfigError, match="protocol.resolution: expected a positive multiple of 8"):
        load_config("default", [f"protocol.resolution={value}"])
    assert load_config("default", ["protocol.resolution=null"]).protocol.resolution is None
