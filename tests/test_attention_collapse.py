"""The attention-collapse diagnostic: its statistics against hand-computed values, and the rows
DreamBooth stores for every checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from methods.attention import AttentionCall
from methods.attention_collapse import CollapseStatistics
from methods.backbones import resolve_backbone
from methods.base import MethodContext
from methods.dreambooth import DreamBooth, DreamBoothParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _call(batch: int, heads: int, cfg: bool) -> AttentionCall:
    return AttentionCall("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", True, (2, 2), 0, batch, heads, cfg)


def test_statistics_match_hand_computed_values():
    keys, heads, queries = 8, 2, 4
    # image 0: words at 1..4, subject at 2; image 1: words at 1..3, subject at 1
    statistics = CollapseStatistics([[1, 2, 3, 4], [1, 2, 3]], [[2], [1]], keys)
    statistics.cfg = True
    probs = torch.zeros((4, heads, queries, keys))  # [uncond0, uncond1, cond0, cond1]
    probs[:2, :, :, 0] = 1.0  # the unconditional half must be ignored
    probs[2, :, :, 0] = 0.5  # half on BOS, the rest spread evenly over the 4 words
    probs[2, :, :, 1:5] = 0.125
    probs[3, :, :, 1] = 0.8  # image 1: collapsed onto the subject, 0.2 on padding
    probs[3, :, :, 7] = 0.2
    statistics(_call(4, heads, cfg=True), probs.reshape(4 * heads, queries, keys))
    (row,) = statistics.rows()
    assert row["resolution"] == 2
    assert row["entropy"] == pytest.approx((1.0 + 0.0) / 2)  # log(4)/log(4) and 0
    assert row["subject_share"] == pytest.approx((0.25 + 1.0) / 2)
    assert row["word_mass"] == pytest.approx((0.5 + 0.8) / 2)


def test_partial_spread_entropy():
    statistics = CollapseStatistics([[1, 2]], [[1]], 4)
    probs = torch.tensor([0.0, 0.75, 0.25, 0.0]).expand(1, 1, 4).clone()
    statistics(_call(1, 1, cfg=False), probs)
    (row,) = statistics.rows()
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert row["entropy"] == pytest.approx(expected)
    assert row["subject_share"] == pytest.approx(0.75)


def test_dreambooth_stores_the_diagnostic_per_checkpoint(dog, tmp_path):
    context = MethodContext(backbone=resolve_backbone("tiny"), resolution=64, cache_dir=tmp_path / "cache")
    method = DreamBooth(DreamBoothParams(steps=4, learning_rate=1e-3, checkpoint_steps=(2,), class_images=0, collapse_prompts=2), context)
    (tmp_path / "state").mkdir()
    method.prepare(dog, tmp_path / "state", seed=0)
    record = method.load_state(tmp_path / "state", dog).data["attention_collapse"]
    assert record["prompts"][0].count("sks dog") == 1 and len(record["seeds"]) == 2
    assert sorted(record["rows"]) == ["final", "step-2"]
    for name, step in (("step-2", 2), ("final", 4)):
        (row,) = record["rows"][name]  # the tiny UNet has one cross-attention resolution
        assert row["training_step"] == step and row["resolution"] == 8  # 64 px, VAE factor 4, one downsampling
        assert 0.0 <= row["entropy"] <= 1.0 and 0.0 <= row["subject_share"] <= 1.0 and 0.0 < row["word_mass"] <= 1.0
    off = DreamBooth(DreamBoothParams(steps=1, class_images=0, collapse_prompts=0), context)
    (tmp_path / "off").mkdir()
    off.prepare(dog, tmp_path / "off", seed=0)
    assert off.load_state(tmp_path / "off", dog).data["attention_collapse"] is None
