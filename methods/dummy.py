"""``dummy``: a model-free method for harness tests and a template for writing adapters.

``prepare`` stores the mean of the subject's images (safetensors); ``generate`` blends that mean
with seeded noise and a prompt-dependent tint. Outputs depend only on (subject, prompt, seed)
and the params, like a real method's. Knobs for tests: ``sleep_s`` / ``prepare_sleep_s`` slow generation / preparation down,
``fail_subjects`` / ``oom_subjects`` make ``prepare`` raise, ``fail_prompts`` makes generation
of prompts containing a word raise, and ``fidelity`` moves outputs toward/away from the subject.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file

from data.images import load_image
from data.subjects import Subject
from methods.base import Method, SamplerConfig, State, param


@dataclass(frozen=True)
class DummyParams:
    # Both act in ``generate`` alone (``prepare`` stores the subject mean), so they are
    # generation-only: a grid over them trains once per subject.
    fidelity: float = param(0.7, source="ours", doc="weight of the subject mean in each image, 0..1", generation=True)
    noise: float = param(0.3, source="ours", doc="weight of the seeded noise", generation=True)
    sleep_s: float = 0.0  # per generated image
    prepare_sleep_s: float = 0.0
    fail_subjects: tuple[str, ...] = ()
    oom_subjects: tuple[str, ...] = ()
    fail_prompts: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.fidelity <= 1.0:
            raise ValueError(f"fidelity must be in [0, 1], got {self.fidelity}")


class DummyMethod(Method):
    name = "dummy"
    version = "1"
    Params = DummyParams
    description = "Model-free deterministic images from the subject's mean (harness tests)"

    # Knobs that decide whether/when a unit runs, never what it produces: not in the key, so a
    # rerun without them (or --retry-failed) completes the same units.
    _CONTROL_KNOBS = ("sleep_s", "prepare_sleep_s", "fail_subjects", "oom_subjects", "fail_prompts")

    def _without_control_knobs(self, fingerprint: dict) -> dict:
        for knob in self._CONTROL_KNOBS:
            fingerprint["params"].pop(knob)
        return fingerprint

    def fingerprint(self) -> dict:
        return self._without_control_knobs(super().fingerprint())

    def training_fingerprint(self) -> dict:
        return self._without_control_knobs(super().training_fingerprint())

    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        if subject.id in self.params.oom_subjects:
            raise torch.cuda.OutOfMemoryError(f"dummy: simulated CUDA out of memory on {subject.id}")
        if subject.id in self.params.fail_subjects:
            raise RuntimeError(f"dummy: simulated failure preparing {subject.id}")
        if self.params.prepare_sleep_s:
            time.sleep(self.params.prepare_sleep_s)
        size = self.context.resolution
        stack = np.stack(
            [np.asarray(load_image(path, size), dtype=np.float32) / 255.0 for path in subject.images]
        )
        save_file({"mean": stack.mean(axis=0)}, str(workdir / "mean.safetensors"))
        (workdir / "state.json").write_text(json.dumps({"seed": seed, "images": len(subject.images)}))

    def load_state(self, workdir: Path, subject: Subject) -> State:
        return State(workdir, subject, {"mean": load_file(str(workdir / "mean.safetensors"))["mean"]})

    def generate(
        self,
        state: State,
        checkpoint: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
    ) -> list[Image.Image]:
        mean = state.data["mean"]
        images = []
        for prompt, seed in zip(prompts, seeds):
            if any(word in prompt for word in self.params.fail_prompts):
                raise RuntimeError(f"dummy: simulated failure generating {prompt!r}")
            if self.params.sleep_s:
                time.sleep(self.params.sleep_s)
            rng = np.random.default_rng(seed)
            noise = rng.random(mean.shape, dtype=np.float32)
            tint = np.frombuffer(hashlib.sha256(prompt.encode()).digest()[:3], dtype=np.uint8)
            tint = tint.astype(np.float32) / 255.0
            p = self.params
            rest = max(1.0 - p.fidelity, 0.0)
            pixels = p.fidelity * mean + rest * ((1 - p.noise) * tint + p.noise * noise)
            images.append(Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)))
        return images
