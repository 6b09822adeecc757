"""DDIM inversion and null-text inversion (Mokady et al., CVPR 2023), batched across images.

Shared by every method that edits or guides real images (HiFi Tuner's reference guidance,
subject replacement with Prompt-to-Prompt). Conventions:

- **Schedule.** ``DdimSchedule`` holds a DDIM timestep list (descending, as diffusers'
  ``DDIMScheduler.set_timesteps`` gives it) and the ᾱ table; ``ddim_step`` is the deterministic
  (η = 0) DDIM update written out, differentiable, checked against ``DDIMScheduler.step`` in the
  tests. ε-prediction only (every SD 1.x backbone); v-prediction raises.
- **DDIM inversion** (``ddim_invert``): guidance 1 (conditional branch only), the update of
  Mokady et al.'s ``next_step``: ε is evaluated at the *next* (noisier) timestep on the current
  latent, x_next = √ᾱ_next·x̂₀ + √(1−ᾱ_next)·ε. Returns the pivot trajectory x*_0 … x*_T.
- **Null-text optimisation** (``null_text_inversion``): from x̄_T = x*_T, at DDIM step i (t from T
  down to 1) one unconditional embedding per image, initialised from the previous step's
  (the first from ∅ = E("")), is optimised N = 10 Adam steps with lr 1e-2·(1 − i/100) on
  ‖x*_{t−1} − DDIM(x̄_t, ε_∅ + w(ε_c − ε_∅))‖² (w = 7.5), early stop when the loss falls below
  1e-5 + i·2e-5; then x̄_{t−1} is the update with the optimised embedding (not the pivot), as in
  the official notebook. All values: the paper and its official code.
- **Batching.** Every image has its own embeddings; losses are summed over images (each image's
  loss is a mean over its own latent), and Adam is element-wise, so image b's trajectory is the
  one it would get alone. Early stopping is per image: an image that met its threshold keeps its
  embedding while the others go on.
- **Masked objective** (HiFi Tuner's masked null-text optimisation): with ``mask`` (B,1,h,w),
  the loss is Σ M·(x − x*)² / (C·ΣM), the mean over masked positions, so an all-ones mask gives
  exactly the unmasked loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from methods.diffusion import frozen_dtype


class InversionError(ValueError):
    """Inputs that inversion cannot use (shapes, prediction type), naming the value and fix."""


@dataclass(frozen=True)
class DdimSchedule:
    """A DDIM timestep list (descending) with the training ᾱ table and the final ᾱ."""

    timesteps: tuple[int, ...]
    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) fp32, CPU
    final_alpha_cumprod: float
    num_train_timesteps: int

    @classmethod
    def from_config(cls, scheduler_config: dict, steps: int) -> DdimSchedule:
        """The schedule diffusers' ``DDIMScheduler`` uses for ``steps`` sampling steps."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler_config)
        if scheduler.config.prediction_type != "epsilon":
            raise InversionError(
                f"inversion supports epsilon-prediction backbones only, got prediction_type "
                f"{scheduler.config.prediction_type!r}"
            )
        if steps < 1:
            raise InversionError(f"DDIM steps must be >= 1, got {steps}")
        scheduler.set_timesteps(steps)
        return cls(
            timesteps=tuple(int(t) for t in scheduler.timesteps),
            alphas_cumprod=scheduler.alphas_cumprod.float().cpu(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            num_train_timesteps=int(scheduler.config.num_train_timesteps),
        )

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def stride(self) -> int:
        return self.num_train_timesteps // self.steps

    def alpha(self, timestep: int) -> float:
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha_cumprod


def ddim_step(schedule: DdimSchedule, noise: torch.Tensor, timestep: int, latents: torch.Tensor) -> torch.Tensor:
    """x_{t−1} from x_t and ε (η = 0), as ``DDIMScheduler.step`` computes it; differentiable."""
    alpha = schedule.alpha(timestep)
    alpha_prev = schedule.alpha(timestep - schedule.stride)
    predicted_x0 = (latents - (1 - alpha) ** 0.5 * noise) / alpha**0.5
    return alpha_prev**0.5 * predicted_x0 + (1 - alpha_prev) ** 0.5 * noise


def ddim_inversion_step(
    schedule: DdimSchedule, noise: torch.Tensor, timestep: int, latents: torch.Tensor
) -> torch.Tensor:
    """One inversion step towards ``timestep`` (ε evaluated at ``timestep``), Mokady et al.'s
    ``next_step``: the current latent sits at ``timestep − stride``."""
    current = timestep - schedule.stride
    alpha = schedule.alpha(current)
    alpha_next = schedule.alpha(timestep)
    predicted_x0 = (latents - (1 - alpha) ** 0.5 * noise) / alpha**0.5
    return alpha_next**0.5 * predicted_x0 + (1 - alpha_next) ** 0.5 * noise


def unet_noise(unet: torch.nn.Module, latents: torch.Tensor, timestep: int, context: torch.Tensor) -> torch.Tensor:
    dtype = frozen_dtype(unet)
    t = torch.full((latents.shape[0],), timestep, device=latents.device, dtype=torch.long)
    return unet(latents.to(dtype), t, context.to(dtype), return_dict=False)[0].float()


def _check(latents: torch.Tensor, context: torch.Tensor, name: str) -> None:
    if latents.ndim != 4:
        raise InversionError(f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}")
    if context.ndim != 3 or context.shape[0] != latents.shape[0]:
        raise InversionError(
            f"{name} must be (B, tokens, dim) with B = {latents.shape[0]} (one per latent), got {tuple(context.shape)}"
        )


@torch.no_grad()
def ddim_invert(
    unet: torch.nn.Module, schedule: DdimSchedule, latents: torch.Tensor, cond: torch.Tensor
) -> list[torch.Tensor]:
    """The pivot trajectory [x*_0, x*_1, …, x*_T] (fp32) of DDIM inversion with guidance 1."""
    _check(latents, cond, "cond")
    trajectory = [latents.float()]
    current = latents.float()
    for timestep in reversed(schedule.timesteps):
        noise = unet_noise(unet, current, timestep, cond)
        current = ddim_inversion_step(schedule, noise, timestep, current)
        trajectory.append(current)
    return trajectory


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image mean squared error (B,), over the masked positions when ``mask`` (B,1,h,w) is given."""
    squared = (prediction.float() - target.float()) ** 2
    if mask is None:
        return squared.mean(dim=(1, 2, 3))
    mask = mask.to(device=squared.device, dtype=squared.dtype).expand_as(squared)
    return (squared * mask).sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1.0)


def optimise_null_step(
    unet: torch.nn.Module,
    schedule: DdimSchedule,
    latents: torch.Tensor,
    timestep: int,
    cond: torch.Tensor,
    null_init: torch.Tensor,
    target: torch.Tensor,
    *,
    guidance: float,
    iterations: int,
    learning_rate: float,
    mask: torch.Tensor | None = None,
    stop_below: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one null embedding per image so that the guided DDIM step from ``latents`` at
    ``timestep`` lands on ``target``; returns (null embeddings (B,T,D) fp32, last per-image losses).

    A fresh Adam per call, as the official code makes one per timestep. ``stop_below``: early
    stop per image once its loss is below it.
    """
    _check(latents, cond, "cond")
    _check(latents, null_init, "null_init")
    with torch.no_grad():
        noise_cond = unet_noise(unet, latents, timestep, cond)
    null = null_init.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([null], lr=learning_rate)
    active = torch.ones(latents.shape[0], dtype=torch.bool, device=latents.device)
    losses = torch.full((latents.shape[0],), float("nan"), device=latents.device)
    for _ in range(iterations):
        with torch.enable_grad():
            noise_null = unet_noise(unet, latents, timestep, null)
            noise = noise_null + guidance * (noise_cond - noise_null)
            per_image = masked_mse(ddim_step(schedule, noise, timestep, latents), target, mask)
            kept = null.detach().clone()
            optimizer.zero_grad(set_to_none=True)
            (per_image * active).sum().backward()
        optimizer.step()
        with torch.no_grad():
            losses = torch.where(active, per_image.detach(), losses)
            # Images that already met their threshold keep their embedding (Adam's momentum
            # would otherwise move it); the others go on.
            null.data[~active] = kept[~active]
            if stop_below is not None:
                active &= per_image.detach() >= stop_below
        if not bool(active.any()):
            break
    return null.detach(), losses


@torch.no_grad()
def guided_step(
    unet: torch.nn.Module,
    schedule: DdimSchedule,
    latents: torch.Tensor,
    timestep: int,
    cond: torch.Tensor,
    null: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """One classifier-free-guided DDIM step with per-image null embeddings."""
    noise_both = unet_noise(unet, torch.cat([latents, latents]), timestep, torch.cat([null, cond]))
    noise_null, noise_cond = noise_both.chunk(2)
    return ddim_step(schedule, noise_null + guidance * (noise_cond - noise_null), timestep, latents)


@dataclass
class NullTextInversion:
    """The result of null-text inversion of a batch: pivots, per-step nulls, reconstruction error."""

    trajectory: list[torch.Tensor]  # x*_0 … x*_T (DDIM inversion, guidance 1)
    null_embeddings: list[torch.Tensor]  # one (B,T,D) per sampling step, step 0 = timestep T
    final_losses: list[torch.Tensor]  # per step, per image


def null_text_inversion(
    unet: torch.nn.Module,
    schedule: DdimSchedule,
    latents: torch.Tensor,
    cond: torch.Tensor,
    null: torch.Tensor,
    *,
    guidance: float = 7.5,
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    epsilon: float = 1e-5,
    mask: torch.Tensor | None = None,
    trajectory: list[torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> NullTextInversion:
    """Null-text inversion of ``latents`` (B,C,h,w) captioned by ``cond`` (B,T,D), from the
    unconditional embedding ``null`` ((T,D) or (B,T,D)); defaults are the paper's."""
    if null.ndim == 2:
        null = null.unsqueeze(0).expand(latents.shape[0], -1, -1)
    if trajectory is None:
        trajectory = ddim_invert(unet, schedule, latents, cond)
    if len(trajectory) != schedule.steps + 1:
        raise InversionError(f"trajectory has {len(trajectory)} latents, expected steps + 1 = {schedule.steps + 1}")
    current = trajectory[-1]
    embeddings, losses = [], []
    for index, timestep in enumerate(schedule.timesteps):
        target = trajectory[schedule.steps - index - 1]
        null, loss = optimise_null_step(
            unet, schedule, current, timestep, cond, null, target,
            guidance=guidance, iterations=inner_steps, learning_rate=learning_rate * (1.0 - index / 100.0),
            mask=mask, stop_below=epsilon + index * 2e-5,
        )
        embeddings.append(null)
        losses.append(loss)
        current = guided_step(unet, schedule, current, timestep, cond, null, guidance)
        if progress is not None:
            progress(index)
    return NullTextInversion(trajectory, embeddings, losses)


@torch.no_grad()
def sample_with_nulls(
    unet: torch.nn.Module,
    schedule: DdimSchedule,
    start: torch.Tensor,
    cond: torch.Tensor | Sequence[torch.Tensor],
    nulls: torch.Tensor | Sequence[torch.Tensor],
    guidance: float = 7.5,
) -> torch.Tensor:
    """DDIM sampling from ``start`` = x_T with per-step (or fixed) cond and null embeddings."""
    current = start.float()
    for index, timestep in enumerate(schedule.timesteps):
        step_cond = cond[index] if isinstance(cond, (list, tuple)) else cond
        step_null = nulls[index] if isinstance(nulls, (list, tuple)) else nulls
        if step_null.ndim == 2:
            step_null = step_null.unsqueeze(0).expand(current.shape[0], -1, -1)
        current = guided_step(unet, schedule, current, timestep, step_cond, step_null, guidance)
    return current
