"""Test doubles for report tests: cheap deterministic metrics and a checkpoint-sweep dummy method.

Registered only by the tests that use them (``use_fakes``), through the same registries the
real metrics and methods use. The fake metrics are pixel statistics with the real metrics'
names and directions, so that reports see realistic structure (a fidelity/prompt trade-off,
NaN DIV for a lone image, PRES on prior images) without loading a network.
Set SUBJECTBENCH_REPORT_REAL_METRICS=1 to run the same tests on the real metrics (random weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from methods.dummy import DummyMethod
from metrics.base import Metric

SWEEP = {"step-10": 0.4, "step-20": 0.75, "final": 1.0}  # checkpoint -> share of the fidelity


def _distance_to_references(inputs) -> np.ndarray:
    size = inputs.images.shape[-2:]
    references = torch.stack([F.interpolate(r[None], size=size, mode="bilinear", align_corners=False)[0] for r in inputs.references])
    mean = references.mean(dim=0)
    return (inputs.images - mean[None]).abs().mean(dim=(1, 2, 3)).double().numpy()


class _Fake(Metric):
    version = "fake-1"

    def __init__(self, settings):
        self.settings = settings
        self.notes: list[str] = []

    def fingerprint(self) -> dict:
        return {"metric": self.name, "version": self.version, "weights": self.settings.weights, "fake": __name__}


class FakeDino(_Fake):
    name = "dino"
    higher_is_better = True

    def score(self, inputs) -> np.ndarray:
        return 1.0 - 2.0 * _distance_to_references(inputs)


class FakeClipI(_Fake):
    name = "clip_i"
    higher_is_better = True

    def score(self, inputs) -> np.ndarray:
        return 0.5 + 0.5 * (1.0 - 2.0 * _distance_to_references(inputs))


class FakeClipT(_Fake):
    name = "clip_t"
    higher_is_better = True

    def score(self, inputs) -> np.ndarray:
        jitter = np.array([int(hashlib.sha256(t.encode()).hexdigest()[:4], 16) / 65535.0 for t in inputs.texts])
        return 0.1 + 0.8 * _distance_to_references(inputs) + 0.02 * jitter


class FakeDiv(_Fake):
    name = "div"
    higher_is_better = True
    needs_complete_groups = True

    def score(self, inputs) -> np.ndarray:
        groups = np.array(inputs.groups)
        flat = inputs.images.flatten(1).double()
        values = np.full(len(groups), np.nan)
        for i, group in enumerate(groups):
            others = np.flatnonzero((groups == group) & (np.arange(len(groups)) != i))
            if len(others):
                values[i] = float((flat[others] - flat[i]).abs().mean())
        return values


class FakePres(_Fake):
    name = "pres"
    higher_is_better = False
    role = "prior"

    def score(self, inputs) -> np.ndarray:
        return 1.0 - 2.0 * _distance_to_references(inputs)


FAKE_METRICS = {
    "dino": f"{__name__}:FakeDino",
    "clip_i": f"{__name__}:FakeClipI",
    "clip_t": f"{__name__}:FakeClipT",
    "div": f"{__name__}:FakeDiv",
    "pres": f"{__name__}:FakePres",
}


class SweepDummy(DummyMethod):
    """The dummy method with a DreamBooth-like checkpoint sweep: fidelity grows with the step."""

    name = "sweep_dummy"
    description = "Dummy with checkpoints step-10, step-20, final (report tests)"

    def checkpoints(self):
        return list(SWEEP)

    def generate(self, state, checkpoint, prompts, seeds, sampler):
        full = self.params
        self.params = dataclasses.replace(full, fidelity=full.fidelity * SWEEP[checkpoint])
        try:
            return super().generate(state, checkpoint, prompts, seeds, sampler)
        finally:
            self.params = full


def use_fakes(monkeypatch) -> None:
    """Register the sweep method, and the fake metrics unless real ones are asked for."""
    import methods.registry
    import metrics.registry

    monkeypatch.setitem(methods.registry.BUILTIN_METHODS, "sweep_dummy", f"{__name__}:SweepDummy")
    if os.environ.get("SUBJECTBENCH_REPORT_REAL_METRICS") != "1":
        for name, target in FAKE_METRICS.items():
            monkeypatch.setitem(metrics.registry.BUILTIN_METRICS, name, target)
