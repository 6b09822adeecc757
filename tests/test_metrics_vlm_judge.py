"""The local VLM judge (``vlm_judge_cp`` / ``vlm_judge_pf``) on a tiny Qwen3-VL built offline:
the whole path (images -> conversations -> processor -> greedy generate -> parse -> stored
values, NaN + raw text for an unparsable answer), the parser, the fingerprint and determinism."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from benchmark.config import ConfigError, load_config
from benchmark.driver import run_benchmark
from benchmark.hashing import stable_hash
from benchmark.results import current_fingerprints, load_scores, read_score_parts
from benchmark.store import Store
from metrics import vlm_judge
from metrics.backbones import MetricWeightsError
from metrics.base import MetricInputError, MetricSettings
from metrics.registry import build_metric, expand_metric_names
from metrics.testing import mini_scoring_inputs
from metrics.vlm_judge import LoadedJudge, build_tiny_judge, parse_score, state_sha256

RANDOM = MetricSettings(weights="random")
TINY_KEY = ("random", "tiny", "cpu", str(torch.float32))  # get_judge's cache key for RANDOM


@pytest.fixture
def short(monkeypatch):
    """Fewer tokens for the CPU: 256-px images (64 visual tokens each, the processor's minimum)
    and 24 new tokens for prompt following (random weights never stop early)."""
    monkeypatch.setattr(vlm_judge, "IMAGE_SIZE", 256)
    monkeypatch.setitem(vlm_judge.MAX_NEW_TOKENS, "prompt", 24)


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("Score: 3", 3.0),
        ("score:4", 4.0),
        ("The image shows a dog on a beach, as asked.\nScore: 2", 2.0),
        ("**Score:** 1", 1.0),
        ("Score = 0", 0.0),
        ("The score is 3.", 3.0),
        ("Score: 3/4", 3.0),
        ("Score: 2 out of 4", 2.0),
        ("Score: [4]", 4.0),
        ("3", 3.0),
        ("  4.  ", 4.0),
        ("Score: 3.0", 3.0),
        ("Score: 2\nSo, Score: 2", 2.0),  # one value said twice
        ("", None),
        ("   \n ", None),
        ("The subject matches well.", None),  # no score
        ("Score: 5", None),  # outside 0-4
        ("Score: -1", None),
        ("Score: 2.5", None),  # not on the rubric
        ("Score: 3/5", None),  # another scale
        ("Score: 2 ... actually Score: 3", None),  # two different scores
        ("Score: excellent", None),
        ("3 or 4", None),
        ("Score:", None),
    ],
)
def test_parser_accepts_one_rubric_score_and_refuses_everything_else(answer, expected):
    value, problem = parse_score(answer)
    if expected is None:
        assert math.isnan(value) and problem
    else:
        assert value == expected and problem == ""


def _scores_match_answers(metric, values):
    assert len(metric.answers) == len(values) == len(metric.notes)
    for value, answer, note in zip(values, metric.answers, metric.notes):
        parsed, problem = parse_score(answer)
        assert (math.isnan(value) and math.isnan(parsed)) or value == parsed
        assert repr(answer) in note  # the raw text is always kept
        assert note.startswith("unparsed (") == bool(problem)


@pytest.mark.parametrize("name", ["vlm_judge_cp", "vlm_judge_pf"])
def test_tiny_random_judge_runs_the_whole_path_and_never_imputes(name, short):
    inputs = mini_scoring_inputs(per_subject=1)
    metric = build_metric(name, RANDOM)
    values = metric.score(inputs)
    assert values.shape == (3,)
    _scores_match_answers(metric, values)
    # random weights answer noise: missing, never a made-up score
    assert np.isnan(values).all()
    assert all(note.startswith("unparsed (") for note in metric.notes)
    again = build_metric(name, RANDOM)  # deterministic: same answers, bit for bit
    np.testing.assert_array_equal(again.score(inputs), values)
    assert again.answers == metric.answers


def test_batched_answers_equal_one_by_one_answers(short):
    """Left padding and Qwen3-VL's multimodal positions: a padded batch answers as single prompts do (fp32)."""
    inputs = mini_scoring_inputs(per_subject=1)
    inputs.texts = ["a dog", "a toy in the jungle with a red hat on a sunny day", "a teapot on a table"]
    batched = build_metric("vlm_judge_pf", MetricSettings(weights="random", batch_size=3))
    single = build_metric("vlm_judge_pf", MetricSettings(weights="random", batch_size=1))
    np.testing.assert_array_equal(batched.score(inputs), single.score(inputs))
    assert batched.answers == single.answers and len(set(batched.answers)) > 1


def test_tiny_judge_is_identical_when_rebuilt():
    first, second = build_tiny_judge(), build_tiny_judge()
    assert first.identity["weights_sha256"] == second.identity["weights_sha256"]
    assert first.processor.tokenizer("Score: 3")["input_ids"] == [83, 99, 111, 114, 101, 58, 32, 51]


def scripted_judge(answer: str = "Score: 3") -> LoadedJudge:
    """The tiny Qwen3-VL with weights set so that greedy decoding answers ``answer`` to any prompt.

    Attention and MLP outputs are zeroed, so the last position's hidden state is its token's
    embedding; each token of the chain prompt-end -> answer -> <|im_end|> gets its own embedding
    direction, and the LM head maps that direction to the next token. The processor, the vision
    tower, generate() and the decoder run unchanged.
    """
    judge = build_tiny_judge()
    tokenizer = judge.processor.tokenizer
    chain = [tokenizer.convert_tokens_to_ids("Ċ")]  # the generation prompt ends "assistant\n"
    chain += tokenizer(answer)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain[:-1])) == len(chain) - 1, "each token may lead to one next token"
    language = judge.model.model.language_model
    with torch.no_grad():
        for layer in language.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        language.embed_tokens.weight.zero_()
        judge.model.lm_head.weight.zero_()
        for slot, (token, following) in enumerate(zip(chain, chain[1:])):
            language.embed_tokens.weight[token, slot] = 1.0
            judge.model.lm_head.weight[following, slot] = 10.0
    judge.identity = {**judge.identity, "weights_tag": f"scripted {answer!r}",
                      "weights_sha256": state_sha256(judge.model)}
    return judge


def test_a_parsable_answer_becomes_the_score(short):
    judge = scripted_judge("Score: 3")
    inputs = mini_scoring_inputs(per_subject=1)
    answers = judge.answer(*build_metric("vlm_judge_pf", RANDOM).conversations(inputs), max_new_tokens=16, batch_size=2)
    assert answers == ["Score: 3"] * 3


def _run(path, *overrides):
    config = load_config("default", ["methods=dummy", "metrics.weights=random", "metrics.names=[vlm_judge]",
                                     "protocol.prompts=[0]", "dataset.subjects=[dog]", "device=cpu", *overrides])
    run_benchmark(config, path, quiet=True)
    return Store(path)


def test_harness_stores_scores_and_keeps_unparsed_answers(tmp_path, monkeypatch, short):
    # Scripted judge: every answer parses to 3 and is stored with its text.
    monkeypatch.setitem(vlm_judge._JUDGES, TINY_KEY, scripted_judge("Score: 3"))
    store = _run(tmp_path / "scripted")
    scores = load_scores(store)
    assert set(scores["metric"]) == {"vlm_judge_cp", "vlm_judge_pf"}
    assert len(scores) == 2 * 2 and (scores["value"] == 3.0).all()  # 2 metrics x 2 images
    for metric, info in current_fingerprints(store).items():
        notes = read_score_parts(store.scores_dir(metric, info["hash"]))["note"]
        assert (notes == "judge answer: 'Score: 3'").all()

    # The random tiny judge answers noise: stored as NaN, its raw answer kept beside it.
    monkeypatch.delitem(vlm_judge._JUDGES, TINY_KEY)
    store = _run(tmp_path / "random")
    scores = load_scores(store)
    assert len(scores) == 4 and scores["value"].isna().all()
    for metric, info in current_fingerprints(store).items():
        parts = read_score_parts(store.scores_dir(metric, info["hash"]))
        assert parts["value"].isna().all() and parts["note"].str.startswith("unparsed (").all()
        assert parts["note"].str.len().gt(len("unparsed (no 'Score: N' in the answer): ''")).all()


# sha256 of the JSON list of rendered conversations for the 12 mini images (the dog's references):
# any change in the rubric, the answer format, the layout or the chat template fails here. If a
# change is intended, bump VLM_JUDGE_VERSION and regenerate.
GOLDEN_CONVERSATIONS = {
    "vlm_judge_cp": "1f66e52a4b5aac0a52b699dd81bdc2d72e5d2b67cc2c1950abe87503e72db3a0",
    "vlm_judge_pf": "1df9cf9a23116928978c78a994182215c2e9494359437afcd9e1c1fde6530dbe",
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CONVERSATIONS))
def test_golden_conversations_and_scores(name):
    metric = build_metric(name, RANDOM)
    fingerprint = metric.fingerprint()
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint["weights"] == "random" and fingerprint["version"] == vlm_judge.VLM_JUDGE_VERSION
    inputs = mini_scoring_inputs("dog")
    conversations, images = metric.conversations(inputs)
    processor = metric.judge.processor
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    assert hashlib.sha256(json.dumps(texts).encode()).hexdigest() == GOLDEN_CONVERSATIONS[name]
    # 128-px mini images go in at 512 px: 32 x 32 patches, 256 visual tokens each; the dog's first 3 photos
    assert [tuple(image.shape) for image in images[0]] == [(3, 512, 512)] * (4 if name == "vlm_judge_cp" else 1)
    grid = processor.image_processor(images=images[0], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 32, 32]] * len(images[0])


def test_fingerprint_holds_the_rubric_and_decoding(monkeypatch):
    concept, prompt = build_metric("vlm_judge_cp", RANDOM), build_metric("vlm_judge_pf", RANDOM)
    before = stable_hash(concept.fingerprint())
    assert before != stable_hash(prompt.fingerprint())
    assert concept.fingerprint()["rubric"] == vlm_judge.RUBRICS["concept"]
    assert concept.fingerprint()["decoding"] == {"greedy": True, "num_beams": 1, "max_new_tokens": 16}
    monkeypatch.setitem(vlm_judge.RUBRICS, "concept", vlm_judge.RUBRICS["concept"].replace("4: the same", "4: same"))
    assert stable_hash(concept.fingerprint()) != before
    monkeypatch.undo()
    assert stable_hash(concept.fingerprint()) == before
    monkeypatch.setitem(vlm_judge.MAX_NEW_TOKENS, "concept", 32)
    assert stable_hash(concept.fingerprint()) != before


def test_inputs_are_checked():
    inputs = mini_scoring_inputs(per_subject=1)
    inputs.references = []
    with pytest.raises(MetricInputError, match="references"):
        build_metric("vlm_judge_cp", RANDOM).score(inputs)
    inputs = mini_scoring_inputs(per_subject=1)
    inputs.texts = inputs.texts[:1]
    with pytest.raises(MetricInputError, match="texts"):
        build_metric("vlm_judge_pf", RANDOM).score(inputs)


def test_config_names_the_judge_and_its_model():
    assert expand_metric_names(["clip_t", "vlm_judge", "vlm_judge_cp"]) == ("clip_t", "vlm_judge_cp", "vlm_judge_pf")
    config = load_config("default", ["metrics.names=[dino, vlm_judge]"])
    assert config.metrics.names == ("dino", "vlm_judge_cp", "vlm_judge_pf")
    assert not {"vlm_judge_cp", "vlm_judge_pf"} & set(load_config("dreambooth").metrics.names)  # opt-in: heavy
    assert "@" in config.metrics.vlm_judge_model
    for bad in ("Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-8B-Instruct@", "a/b/c@1"):
        with pytest.raises(ConfigError, match="metrics.vlm_judge_model"):
            load_config("default", [f"metrics.vlm_judge_model={bad}"])


def test_pretrained_judge_offline_without_weights_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = MetricSettings(weights="pretrained", vlm_judge_model="nobody/not-a-cached-vlm@0123abc")
    with pytest.raises(MetricWeightsError, match="metrics.weights=random"):
        build_metric("vlm_judge_cp", settings).fingerprint()


def _fake_hub_snapshot(cache, repo: str, commit: str, folder) -> None:
    """Lay ``folder``'s files out as the hub cache does: blobs named by sha256, snapshot symlinks."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        blob = root / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        path.replace(blob)
        (snapshot / path.name).symlink_to(blob)


def test_pretrained_path_loads_a_pinned_snapshot_from_the_hub_cache(tmp_path, monkeypatch, short):
    import huggingface_hub.constants

    monkeypatch.setattr(vlm_judge, "_JUDGES", {})  # the loaded judge leaves with the test
    tiny = build_tiny_judge()
    tiny.model.save_pretrained(tmp_path / "saved")
    tiny.processor.save_pretrained(tmp_path / "saved")
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_snapshot(tmp_path / "hub", "local/tiny-judge", commit, tmp_path / "saved")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    settings = MetricSettings(weights="pretrained", vlm_judge_model=f"local/tiny-judge@{commit}")
    metric = build_metric("vlm_judge_pf", settings)
    judge = metric.fingerprint()["judge"]
    assert judge["source"] == "hf:local/tiny-judge" and judge["commit"] == commit == judge["revision"]
    weights = hashlib.sha256((tmp_path / "hub/models--local--tiny-judge/snapshots" / commit / "model.safetensors")
                             .read_bytes()).hexdigest()
    assert judge["files"] == [f"hf:local/tiny-judge/model.safetensors@sha256:{weights}"]
    # loaded through AutoProcessor / AutoModelForImageTextToText: the same answers as in memory
    inputs = mini_scoring_inputs(per_subject=1)
    values = metric.score(inputs)
    reference = build_metric("vlm_judge_pf", RANDOM)
    np.testing.assert_array_equal(values, reference.score(inputs))
    assert metric.answers == reference.answers
