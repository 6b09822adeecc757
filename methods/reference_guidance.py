"""HiFi Tuner's reference-guided generation (Wang et al., arXiv 2312.00079, Sec. 3.3), reusable.

Given images generated from seeds (the first generation), for each image: its subject mask, the
best-DINO reference among the subject's photos, a similarity transform of the reference mask
onto the generated mask, DDIM inversion of the transformed reference, and a second generation
from the same x_T in which the reference latent is pasted into the masked region at t_s and a
null embedding is optimised (masked) from t_s down to t_e. The sampling runs through the
diffusers pipeline; the paste and the optimisation happen in its step-end callback
(``ReferenceCallback``), so the steps outside the window are the pipeline's own.

Indices follow the paper: t counts DDIM steps, x_T (t = T = 50) is the noise, x_0 the image;
sampling step i (0-based) maps x_{T−i} to x_{T−i−1}. With a sampler of S ≠ 50 steps, t_s and t_e
are scaled to round(t·S/50) (ours: the paper only uses 50).

Our choices where the paper is silent or uses tools we cannot ship (all documented in
``methods/hifi_tuner.py``'s step table): masks of generated images come from ``data.masks``
(SAM when its weights are present, GrabCut otherwise) instead of Grounding-SAM; the transform is
initialised by matching centroids and areas, then refined by Adam on the one-sided Chamfer
distance from the transformed reference pixels to the generated mask; the inversion caption is
"a photo of a {class}" instead of a BLIP-2 caption; the masked region is the transformed
reference mask; "overwrite x_{t−1}[M]" is read as x_{t−1} = M·F_t(x_t, φ_h) + (1−M)·F_t(x_t, ∅).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from methods.inversion import DdimSchedule, guided_step, optimise_null_step

PAPER_STEPS = 50


@dataclass(frozen=True)
class ReferenceGuidance:
    """The reference-guidance knobs (paper values by default)."""

    start: int = 40  # t_s, paper
    end: int = 10  # t_e, paper
    iterations: int = 10  # J, paper
    learning_rate: float = 1e-2  # paper
    align_iterations: int = 200  # ours: unknown in the paper
    align_learning_rate: float = 1e-2  # ours: unknown in the paper

    def window(self, steps: int) -> tuple[int, int]:
        """(t_s, t_e) on a schedule of ``steps`` DDIM steps."""
        scale = steps / PAPER_STEPS
        return max(1, round(self.start * scale)), max(1, round(self.end * scale))


# ----------------------------------------------------------------------------- masks and alignment


def latent_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size) binary float mask: the area fraction of each latent cell, >= 0.5."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(tensor, size=(size, size), mode="area")[0] >= 0.5).float()


def square_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A mask cropped and resized as ``data.images.center_crop_resize`` does its image."""
    height, width = mask.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(mask[top : top + side, left : left + side].astype(np.uint8) * 255)
    return np.asarray(square.resize((resolution, resolution), Image.Resampling.NEAREST)) >= 128


def _points(mask: np.ndarray, limit: int, rng: np.random.Generator) -> torch.Tensor:
    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], axis=1).astype(np.float32)
    if len(points) > limit:
        points = points[rng.choice(len(points), limit, replace=False)]
    return torch.from_numpy(points)


def similarity_matrix(scale: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """2×3 matrix of translate(shift)·rotate(angle)·scale(scale), acting on (x, y) pixel coordinates."""
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin, shift[0]]), torch.stack([sin, cos, shift[1]])])


def fit_similarity(
    reference: np.ndarray, generated: np.ndarray, iterations: int = 200, learning_rate: float = 1e-2, seed: int = 0
) -> np.ndarray:
    """T_θ (2×3, pixel coordinates) with T_θ(reference mask) ≈ generated mask.

    The scale is fixed by the areas (a similarity maps area A to s²·A, so s = √(A_g/A_r) when
    T_θ(M_r) = M_g); the rotation starts at 0 and the translation matches the centroids; then
    Adam refines rotation and translation on the one-sided Chamfer distance (mean over
    transformed reference pixels of the distance to the nearest generated pixel), on coordinates
    normalised by the image side. Fixing the scale is ours: optimised freely, the one-sided
    distance is minimised by shrinking the reference into the generated mask.
    """
    if not reference.any() or not generated.any():
        raise ValueError("fit_similarity needs two non-empty masks")
    rng = np.random.default_rng(seed)
    side = float(max(generated.shape))
    source = _points(reference, 1024, rng) / side
    target = _points(generated, 1024, rng) / side
    scale = torch.tensor(float(np.sqrt(generated.sum() / reference.sum())), dtype=torch.float32)
    angle = torch.zeros((), requires_grad=True)
    pivot = source.mean(0)
    offset = (target.mean(0) - pivot).clone().requires_grad_(True)

    def matrix_now() -> torch.Tensor:
        # Rotate and scale about the reference centroid, then move it by ``offset``.
        linear = similarity_matrix(scale, angle, torch.zeros(2))[:, :2]
        return torch.cat([linear, (pivot + offset - linear @ pivot)[:, None]], dim=1)

    optimizer = torch.optim.Adam([angle, offset], lr=learning_rate)
    for _ in range(iterations):
        matrix = matrix_now()
        moved = source @ matrix[:, :2].T + matrix[:, 2]
        loss = torch.cdist(moved, target).min(dim=1).values.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        matrix = matrix_now().numpy().astype(np.float64)
    matrix[:, 2] *= side  # back to pixel units (the linear part is unit-free)
    return matrix


def warp(array: np.ndarray, matrix: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """``array`` (H×W or H×W×3) moved by the 2×3 matrix onto a size×size canvas."""
    import cv2

    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpAffine(array, matrix, (size, size), flags=flags, borderMode=cv2.BORDER_REPLICATE)


# ----------------------------------------------------------------------------- the guided pass


def _synchronized_clock(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ReferenceCallback:
    """Pipeline step-end callback: paste the reference latent at t_s, then optimise a masked
    null embedding per image and overwrite the masked latent at each step down to t_e.

    ``conditioning(step)`` gives the conditional embeddings (B,T,D) used at sampling step
    ``step`` (step-wise embeddings change them); ``next_conditioning`` is installed for the next
    step, so one callback serves both (the pipeline allows one).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        schedule: DdimSchedule,
        trajectory: Sequence[torch.Tensor],
        mask: torch.Tensor,
        null: torch.Tensor,
        conditioning,
        guidance: float,
        settings: ReferenceGuidance,
        start_latents: torch.Tensor,
    ):
        self.unet, self.schedule, self.trajectory = unet, schedule, trajectory
        self.mask, self.guidance, self.settings = mask, guidance, settings
        self.null = null
        self.null_h = null.detach().float().clone()
        self.conditioning = conditioning
        self.previous = start_latents.float()
        self.start, self.end = settings.window(schedule.steps)
        self.losses: list[float] = []
        self.optimise_seconds = 0.0  # wall time of the null-text optimisation (device synchronised)

    def __call__(self, pipeline, step: int, timestep, kwargs: dict) -> dict:
        steps = self.schedule.steps
        latents = kwargs["latents"].float()
        t = steps - step  # the paper's index of the latent this step started from
        if self.end <= t <= self.start:
            cond = self.conditioning(step)
            target = self.trajectory[t - 1]
            started = _synchronized_clock(latents.device)
            self.null_h, loss = optimise_null_step(
                self.unet, self.schedule, self.previous, int(timestep), cond, self.null_h, target,
                guidance=self.guidance, iterations=self.settings.iterations,
                learning_rate=self.settings.learning_rate, mask=self.mask,
            )
            self.losses.append(float(loss.mean()))
            self.optimise_seconds += _synchronized_clock(latents.device) - started
            guided = guided_step(
                self.unet, self.schedule, self.previous, int(timestep), cond, self.null_h, self.guidance
            )
            latents = self.mask * guided + (1 - self.mask) * latents
        if t - 1 == self.start:
            latents = self.mask * self.trajectory[t - 1] + (1 - self.mask) * latents
        self.previous = latents
        out = {"latents": latents.to(kwargs["latents"].dtype)}
        if step + 1 < steps and "prompt_embeds" in kwargs:
            out["prompt_embeds"] = torch.cat([self.null, self.conditioning(step + 1)]).to(kwargs["prompt_embeds"].dtype)
        return out
