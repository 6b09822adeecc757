"""The scene + instance task: pair files (bundled, YAML, CSV) and their errors, keys that cover
the scene, the scene-placing prompt, LPIPS to the scene against the lpips package, the gallery."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.config import load_config
from benchmark.driver import run_benchmark
from benchmark.units import expand, method_context
from data.errors import DatasetError
from data.images import load_image, to_tensor
from data.scene_pairs import bundled_pairs_file, load_pairs
from data.subjects import load_subjects, mini_dataset_dir
from metrics.base import MetricSettings, ScoringInputs
from metrics.scene import LpipsScene, resize_to

MINI = mini_dataset_dir()


def test_bundled_pairs_load_with_scene_and_prompt():
    pairs = load_subjects("pairs")
    assert [p.id for p in pairs] == ["dog_in_teapot_scene", "toy_in_dog_scene", "teapot_in_toy_scene"]
    dog = pairs[0]
    assert dog.scene == (MINI / "teapot" / "00.png",) and len(dog.images) == 4 and dog.kind == "live"
    (prompt,) = dog.prompts()
    assert prompt.render("sks", "dog") == "a sks dog in the scene" and prompt.evaluation_text("dog") == "a dog in the scene"
    assert load_pairs(bundled_pairs_file(), ["toy_in_dog_scene"])[0].class_noun == "toy"


def test_two_stage_prompt_binds_the_scene_and_keys_cover_it(tmp_path):
    config = load_config("scene_instance", ["subjects=dog_in_teapot_scene"])
    plan = expand(config, method_context(config, "cpu", "float32"))
    texts = {u.label: (u.prompt_text, u.eval_text) for u in plan.image_units}
    assert texts["two_stage (reconstructed)"] == ("a sks dog in the zwx scene", "a dog in the scene")
    assert texts["dreambooth"] == ("a sks dog in the scene", "a dog in the scene")
    # another scene, same instance: another subject hash, so other states and images
    shutil.copy(MINI / "dog" / "01.png", tmp_path / "scene.png")
    (tmp_path / "pairs.yaml").write_text(
        f"pairs:\n  - {{id: dog_in_teapot_scene, scene: scene.png, instance: {MINI / 'dog'}, class: dog}}\n"
    )
    other = load_config("scene_instance", ["subjects=dog_in_teapot_scene", f"dataset.path={tmp_path / 'pairs.yaml'}"])
    other_plan = expand(other, method_context(other, "cpu", "float32"))
    assert not {u.key for u in plan.image_units} & {u.key for u in other_plan.image_units}


def test_csv_pairs(tmp_path):
    (tmp_path / "pairs.csv").write_text(
        f"id,scene,instance,class,kind,prompt\nmug,{MINI / 'teapot' / '01.png'},{MINI / 'teapot'},teapot,object,"
        "a {0} {1} on the table in the {scene}\n"
    )
    (pair,) = load_pairs(tmp_path / "pairs.csv")
    assert pair.prompts()[0].render("sks", "teapot") == "a sks teapot on the table in the scene"


@pytest.mark.parametrize(
    "text, match",
    [
        ("pairs: []", "top-level 'pairs:' list"),
        ("pairs:\n  - {id: a, scene: nothing.png, instance: INST, class: dog}", "scene .*nothing.png does not exist"),
        ("pairs:\n  - {id: a, scene: SCENE, instance: INST}", "missing class noun"),
        ("pairs:\n  - {id: a, instance: INST, class: dog}", "missing 'scene'"),
        ("pairs:\n  - {id: a, scene: SCENE, instance: INST, class: dog, colour: red}", "unknown field"),
        ("pairs:\n  - {id: a, scene: SCENE, instance: INST, class: dog}\n  - {id: a, scene: SCENE, instance: INST, class: dog}",
         "used twice"),
        ("pairs:\n  - {id: a, scene: SCENE, instance: INST, class: dog, prompt: 'a dog'}", "must contain"),
        ("pairs: [", "cannot be parsed"),
        ("pairs:\n  - {id: a, scene: bad.png, instance: INST, class: dog}", "scene cannot be read"),
    ],
)
def test_bad_pair_files_get_clear_errors(tmp_path, text, match):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = tmp_path / "pairs.yaml"
    path.write_text(text.replace("SCENE", str(MINI / "teapot" / "00.png")).replace("INST", str(MINI / "dog")))
    with pytest.raises(DatasetError, match=match) as error:
        load_pairs(path)
    assert str(path) in str(error.value)


def test_missing_pairs_file_names_it(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_pairs(tmp_path / "none.yaml")


def test_lpips_scene_equals_the_lpips_package():
    import lpips

    from metrics.backbones import get_lpips

    settings = MetricSettings(weights="random", lpips_net="alex")
    scene = to_tensor([load_image(MINI / "teapot" / "00.png")])[0]
    images = to_tensor([load_image(MINI / "dog" / f"0{i}.png", 64) for i in range(2)] + [load_image(MINI / "teapot" / "00.png", 64)])
    metric = LpipsScene(settings)
    inputs = ScoringInputs(images=images, image_keys=["a", "b", "c"], texts=["", "", ""], references=[scene],
                           reference_key="r", scene_images=[scene])
    values = metric.score(inputs)
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(get_lpips(settings).model.state_dict())
    with torch.no_grad():
        expected = reference(images, resize_to(scene, (64, 64)).expand(3, -1, -1, -1), normalize=True).flatten().numpy()
    np.testing.assert_allclose(values, expected, atol=1e-5)
    assert values[2] < min(values[0], values[1])  # the scene itself (resized by PIL vs torch) is closest
    no_scene = metric.score(ScoringInputs(images=images, image_keys=["a", "b", "c"], texts=["", "", ""],
                                          references=[scene], reference_key="r"))
    assert np.isnan(no_scene).all() and metric.notes[0].startswith("no scene")


def test_scene_instance_run_scores_and_shows_the_scene(tmp_path):
    config = load_config("scene_instance", ["methods=dummy", "subjects=dog_in_teapot_scene", "metrics.names=[lpips_scene]"])
    run_benchmark(config, tmp_path, quiet=True)
    from reports.build import build_report

    build_report(tmp_path, resamples=50)
    results = pd.read_parquet(tmp_path / "report" / "results.parquet")
    assert set(results["metric"]) == {"lpips_scene"} and results["value"].notna().all()
    page = next((tmp_path / "report" / "gallery").glob("s-*.html")).read_text()
    assert "<h2>Scene</h2>" in page and "<h2>Instance (reference images)</h2>" in page
    assert page.index("<h2>Scene</h2>") < page.index("<h2>Instance") < page.index("<h2>Generated images</h2>")
