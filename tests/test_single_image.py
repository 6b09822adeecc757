"""The single-image track and the copy check: training sees one photo, metrics never see it;
keys change with the choice; copy rate 1 for a method that returns its training photo, ~0 for
the dummy method; the report pairs one-image rows with all-images rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import methods.registry
import metrics.registry
from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.errors import ConfigError
from benchmark.results import load_scores
from benchmark.store import Store
from benchmark.units import expand, method_context
from data.errors import DatasetError
from data.images import load_image, to_tensor
from data.single_image import training_view
from data.subjects import load_subjects, make_subject
from methods.base import Method, SamplerConfig, State
from metrics.base import Metric, ScoringInputs
from metrics.copying import copy_threshold, leave_one_out_nearest

SMALL = ["subjects=dog,teapot", "protocol.prompts=[0]", "protocol.images_per_prompt=2", "protocol.prior_images=0"]


# --------------------------------------------------------------------------- test instruments


@dataclass(frozen=True)
class CopyPhotoParams:
    pass


class CopyPhoto(Method):
    """Returns its (first) training photo for every prompt: the worst case the copy check exists for."""

    name = "copy_photo"
    Params = CopyPhotoParams

    def prepare(self, subject, workdir: Path, seed: int) -> None:
        (workdir / "state.json").write_text(json.dumps({"photo": str(subject.images[0])}))

    def load_state(self, workdir: Path, subject) -> State:
        return State(workdir, subject, json.loads((workdir / "state.json").read_text()))

    def generate(self, state, checkpoint, prompts: Sequence[str], seeds, sampler: SamplerConfig):
        return [load_image(state.data["photo"], self.context.resolution) for _ in prompts]


class ReferenceProbe(Metric):
    """Per image: 1 when any reference it is scored against equals (pixel for pixel) a given photo."""

    name = "reference_probe"
    higher_is_better = False
    forbidden: list[torch.Tensor] = []

    def __init__(self, settings) -> None:
        self.notes = []

    def fingerprint(self) -> dict:
        return {"metric": self.name}

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        self.notes = [""] * len(inputs.image_keys)
        hit = any(r.shape == f.shape and torch.equal(r, f) for r in inputs.references for f in self.forbidden)
        return np.full(len(inputs.image_keys), float(hit))


@pytest.fixture
def instruments(monkeypatch):
    monkeypatch.setitem(methods.registry.BUILTIN_METHODS, "copy_photo", f"{__name__}:CopyPhoto")
    monkeypatch.setitem(metrics.registry.BUILTIN_METRICS, "reference_probe", f"{__name__}:ReferenceProbe")


# --------------------------------------------------------------------------- config and plan


@pytest.mark.parametrize(
    "given, expected",
    [("all", ("all",)), ("false", ("all",)), ("true", (0,)), ("2", (2,)), ("[all,0,1]", ("all", 0, 1))],
)
def test_single_image_option_values(given, expected):
    config = load_config("default", [f"protocol.single_image={given}"])
    assert config.protocol.single_image == expected
    assert load_config("default", []).to_dict()["protocol"]["single_image"] == "all"


@pytest.mark.parametrize("given", ["-1", "[0,0]", "[]", "first"])
def test_bad_single_image_values_name_the_key(given):
    with pytest.raises(ConfigError, match="protocol.single_image"):
        load_config("default", [f"protocol.single_image={given}"])


def test_views_hold_out_the_training_image_and_change_keys():
    subject = load_subjects("mini", subjects=["dog"])[0]
    view = training_view(subject, 1)
    assert view.subject.images == (subject.images[1],)
    assert subject.images[1] not in view.references and len(view.references) == len(subject.images) - 1
    assert view.subject.data_sha != subject.data_sha and view.reference_sha != subject.data_sha

    plain = load_config("default", ["methods=dummy", *SMALL])
    both = load_config("default", ["methods=dummy", *SMALL, "protocol.single_image=[all,0,1]"])
    context = method_context(plain, "cpu", "float32")
    plain_plan, both_plan = expand(plain, context), expand(both, context)
    plain_keys = {u.key for u in plain_plan.image_units}
    by_choice: dict[str, set] = {}
    for unit in both_plan.image_units:
        by_choice.setdefault(unit.train_image, set()).add(unit.key)
    assert by_choice["all"] == plain_keys  # the all-images track reuses a plain run's images
    assert not by_choice["0"] & by_choice["1"] and not by_choice["0"] & plain_keys
    prepares = {g.prepare.key for g in both_plan.groups}
    assert len(prepares) == 3 * 2  # three trainings per subject
    for group in both_plan.groups:
        choice = group.images[0].train_image
        assert len(group.prepare.subject.images) == (4 if choice == "all" else 1)
        assert {u.cell_id for u in group.images} == {f"dummy[train_image={choice}]"}


def test_a_subject_with_one_image_cannot_be_scored_on_held_out_images(tmp_path):
    folder = tmp_path / "lonely"
    folder.mkdir()
    load_image(load_subjects("mini", subjects=["dog"])[0].images[0]).save(folder / "00.png")
    subject = make_subject(folder, "lonely", "dog", "live")
    with pytest.raises(DatasetError, match="'lonely' has only 1 image"):
        training_view(subject, 0)
    with pytest.raises(DatasetError, match="indices 0-3"):
        training_view(load_subjects("mini", subjects=["dog"])[0], 4)


# --------------------------------------------------------------------------- runs


def _run_copy_photo(tmp_path, metric_names: str) -> pd.DataFrame:
    config = load_config(
        "default",
        ["methods=copy_photo", *SMALL, "subjects=dog", "protocol.single_image=[all,1]", f"metrics.names={metric_names}"],
    )
    run_benchmark(config, tmp_path, quiet=True)
    plan = pd.read_parquet(tmp_path / "plan.parquet")
    return load_scores(Store(tmp_path), plan).merge(plan[["key", "train_image", "subject"]], on="key")


def test_training_image_never_enters_the_reference_set(tmp_path, instruments):
    subject = load_subjects("mini", subjects=["dog"])[0]
    ReferenceProbe.forbidden = [to_tensor([load_image(subject.images[1])])[0]]
    scores = _run_copy_photo(tmp_path, "[reference_probe]")
    probe = scores.groupby("train_image")["value"].max()
    assert probe["1"] == 0.0  # the held-out set never holds image 1
    assert probe["all"] == 1.0  # (the probe does see it where it belongs)
    views = json.loads((tmp_path / "subjects.json").read_text())[0]["views"]
    assert views["1"]["train"] == [str(subject.images[1])]
    assert str(subject.images[1]) not in views["1"]["references"] and len(views["1"]["references"]) == 3


def test_copy_rate_is_one_for_a_method_returning_its_training_photo(tmp_path, instruments):
    scores = _run_copy_photo(tmp_path, "[copy,copy_nn]")
    copy = scores[scores["metric"] == "copy"].groupby("train_image")["value"].mean()
    assert copy["1"] == 1.0 and copy["all"] == 1.0
    nearest = scores[(scores["metric"] == "copy_nn")]["value"]
    assert (nearest > 0.99).all()


@pytest.mark.slow
def test_single_image_dino_equals_an_independent_computation_on_held_out_images(tmp_path, instruments):
    from metrics.backbones import get_dino
    from metrics.base import MetricSettings
    from metrics.embeddings import encode_batch

    subject = load_subjects("mini", subjects=["dog"])[0]
    scores = _run_copy_photo(tmp_path, "[dino]")
    backbone = get_dino(MetricSettings(weights="random"))
    generated = encode_batch(backbone, to_tensor([load_image(subject.images[1], 64)]))
    held_out = torch.cat([encode_batch(backbone, to_tensor([load_image(p)])) for i, p in enumerate(subject.images) if i != 1])
    rows = scores[(scores["train_image"] == "1") & (scores["metric"] == "dino")]
    np.testing.assert_allclose(rows["value"], float((generated @ held_out.T).mean()), atol=1e-5)


def test_copy_rate_of_the_dummy_method_is_near_zero(tmp_path):
    config = load_config("default", ["methods=dummy", *SMALL, "protocol.prompts=[0,20]", "metrics.names=[copy,copy_nn,copy_real]"])
    run_benchmark(config, tmp_path, quiet=True)
    scores = load_scores(Store(tmp_path))
    assert scores[scores["metric"] == "copy"]["value"].mean() <= 0.1
    real = scores[scores["metric"] == "copy_real"]["value"]
    nearest = scores[scores["metric"] == "copy_nn"]["value"]
    assert real.notna().all() and nearest.mean() < real.mean()


def test_copy_threshold_matches_an_independent_leave_one_out():
    torch.manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    nearest = leave_one_out_nearest(rows)
    brute = [max(float(rows[i] @ rows[j]) for j in range(5) if j != i) for i in range(5)]
    np.testing.assert_allclose(nearest, brute, atol=1e-6)
    assert copy_threshold(nearest) == pytest.approx(np.percentile(brute, 95))


def test_report_pairs_one_image_rows_with_all_images_rows(tmp_path, instruments):
    from reports.build import build_report
    from reports.rundata import read_run
    from reports.single_image import single_image_table

    subjects = load_subjects("mini", subjects=["dog", "teapot"])
    ReferenceProbe.forbidden = [to_tensor([load_image(s.images[0])])[0] for s in subjects]
    config = load_config(
        "default", ["methods=dummy", *SMALL, "protocol.single_image=[all,0]", "metrics.names=[reference_probe]"]
    )
    run_benchmark(config, tmp_path, quiet=True)
    build_report(tmp_path, resamples=200)
    table = pd.read_csv(tmp_path / "report" / "tables" / "single_image.csv")
    row = table[table["metric"] == "reference_probe"].iloc[0]
    assert (row["base_cell"], str(row["train_image"]), row["pairs"], row["subjects"]) == ("dummy", "0", 4, 2)
    # all-images rows see photo 0 among their references (1), one-image rows never (0): drop -1
    assert (row["all_images_mean"], row["one_image_mean"], row["drop"]) == (1.0, 0.0, -1.0)
    assert "One image vs all images" in (tmp_path / "report" / "single_image.md").read_text()
    assert "single_image.html" in (tmp_path / "report" / "index.html").read_text()
    # an independent paired difference of the long results gives the same drop
    long = read_run(tmp_path).long
    one = long[long["train_image"] == "0"].set_index(["subject", "template", "k"])["value"]
    every = long[long["train_image"] == "all"].set_index(["subject", "template", "k"])["value"]
    assert single_image_table(long, resamples=50)["drop"].iloc[0] == pytest.approx(float((one - every).mean()))


def test_single_image_suite_is_valid():
    config = load_config("single_image", [])
    assert config.protocol.single_image == ("all", 0)
    assert {m.name for m in config.methods} >= {"textual_inversion", "dreambooth", "dreambooth_lora", "two_stage"}
    assert "reconstructed" in next(m.label for m in config.methods if m.name == "two_stage")
