"""Attention control for diffusers UNets: explicit attention probabilities, seen and edited per layer.

The one place where the project reads or changes attention (DreamBlend's cross-attention guidance,
Prompt-to-Prompt edits, the attention-collapse diagnostic). It works only through diffusers
attention processors (``unet.set_attn_processor``), never by patching modules:

- ``attention_control(unet, controller, select=...)`` is a context manager that installs a
  ``ControlledAttnProcessor`` on every selected attention layer and **always** restores the
  processors that were there before (also when the body raises).
- ``ControlledAttnProcessor`` computes attention as diffusers' ``AttnProcessor`` does
  (``attn.get_attention_scores``: scaled scores, softmax over keys, differentiable) and hands the
  probabilities to the controller before they multiply the values.
- A controller is any object with ``__call__(call: AttentionCall, probs) -> Tensor | None`` (see
  ``AttentionController``). ``probs`` has shape (batch * heads, queries, keys), rows of image
  ``b`` at ``b*heads ... (b+1)*heads - 1`` (diffusers' ``head_to_batch_dim`` order). Returning a
  tensor of the same shape replaces the probabilities (P2P replace/refine/reweight); ``None``
  keeps them.
- ``AttentionCall`` says which layer (the diffusers processor key, e.g.
  ``up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``), whether it is
  cross-attention (attn2, keys are text tokens) or self-attention (attn1), the spatial
  resolution (height, width) of the queries, the sampling step (``controller.step``, set by the
  caller), the batch size and head count, and whether the batch is a classifier-free-guidance
  batch (``controller.cfg``, set by the caller: diffusers' SD pipelines stack
  [unconditional; conditional] when guidance > 1). ``call.split(probs)`` gives the two halves as
  (batch, heads, queries, keys) views.

- ``AttentionAdapter`` (optional ``adapter=`` of ``attention_control``) adds low-rank weight
  offsets to the projections of chosen layers and *dual-path* attention: every selected layer
  runs an adapted path and the frozen path and blends their outputs with α (the tuning encoder,
  ``methods/tuning_encoder.py``). The controller sees each path's probabilities
  (``AttentionCall.path``).

Layers that are not selected keep their own processors. A layer whose current processor is not
one of diffusers' plain processors (e.g. Custom Diffusion's trained K/V processors, IP-Adapter)
is refused with an error naming it, because replacing it would silently drop its weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

# Processors whose computation ControlledAttnProcessor reproduces (same math, explicit softmax).
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "ControlledAttnProcessor")


class AttentionControlError(ValueError):
    """A layer selection or processor that cannot be controlled, naming it and the fix."""


@dataclass(frozen=True)
class AttentionCall:
    """What a controller learns about one attention evaluation."""

    layer: str  # diffusers processor key
    is_cross: bool  # attn2 (keys = text tokens) vs attn1 (keys = image positions)
    resolution: tuple[int, int]  # (height, width) of the query grid
    step: int  # sampling step index, as set on the controller by the caller
    batch: int  # images in the UNet batch (both CFG halves counted)
    heads: int
    cfg: bool  # the batch is [unconditional; conditional]
    path: str = "main"  # "main"; with dual-path attention "soft" (adapted) or "hard" (frozen)

    @property
    def size(self) -> int:
        """The square resolution's side (height for non-square latents)."""
        return self.resolution[0]

    def per_image(self, probs: torch.Tensor) -> torch.Tensor:
        """(batch * heads, q, k) -> (batch, heads, q, k), a view."""
        return probs.view(self.batch, self.heads, *probs.shape[1:])

    def split(self, probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(unconditional or None, conditional) halves as (n, heads, q, k) views."""
        images = self.per_image(probs)
        if not self.cfg:
            return None, images
        if self.batch % 2:
            raise AttentionControlError(
                f"layer {self.layer}: controller.cfg is set but the batch has {self.batch} images "
                "(odd); set controller.cfg = False when sampling without classifier-free guidance"
            )
        half = self.batch // 2
        return images[:half], images[half:]


class AttentionController:
    """Base controller: sees every call, changes nothing. Subclasses override ``edit``.

    ``step`` and ``cfg`` are set by whoever runs the UNet (a sampling loop, or a pipeline
    callback, see ``step_callback``); they are passed on in every ``AttentionCall``.
    """

    def __init__(self) -> None:
        self.step = 0
        self.cfg = False

    def __call__(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor | None:
        return self.edit(call, probs)

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor | None:
        return None


class AttentionRecorder(AttentionController):
    """Records attention probabilities, keyed by (step, layer).

    ``cross``/``self_attention`` choose the kinds recorded; ``resolutions`` (side lengths, empty =
    all) and ``layers`` (a predicate on the layer key) narrow it down. ``conditional_only`` keeps
    the conditional half of a CFG batch. ``mean_heads`` stores (n, queries, keys) averaged over
    heads (otherwise (n, heads, queries, keys)). ``keep_grad`` keeps the autograd graph (for
    guidance losses); by default maps are detached. ``steps`` (a predicate on the step) limits
    which steps are kept. Each recorded map sums to 1 over keys.
    """

    def __init__(
        self,
        *,
        cross: bool = True,
        self_attention: bool = False,
        resolutions: Iterable[int] = (),
        layers: Callable[[str], bool] | None = None,
        steps: Callable[[int], bool] | None = None,
        conditional_only: bool = True,
        mean_heads: bool = True,
        keep_grad: bool = False,
    ) -> None:
        super().__init__()
        self.cross = cross
        self.self_attention = self_attention
        self.resolutions = frozenset(resolutions)
        self.layers = layers
        self.steps = steps
        self.conditional_only = conditional_only
        self.mean_heads = mean_heads
        self.keep_grad = keep_grad
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self.calls: dict[str, AttentionCall] = {}  # last call per layer (its shapes and kind)

    def wants(self, call: AttentionCall) -> bool:
        if call.is_cross and not self.cross or not call.is_cross and not self.self_attention:
            return False
        if self.resolutions and call.size not in self.resolutions:
            return False
        if self.layers is not None and not self.layers(call.layer):
            return False
        return self.steps is None or self.steps(call.step)

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> torch.Tensor | None:
        if self.wants(call):
            unconditional, conditional = call.split(probs)
            kept = conditional if self.conditional_only or unconditional is None else call.per_image(probs)
            if self.mean_heads:
                kept = kept.mean(dim=1)
            self.maps[(call.step, call.layer)] = kept if self.keep_grad else kept.detach()
            self.calls[call.layer] = call
        return None

    def clear(self) -> None:
        self.maps.clear()

    def at_step(self, step: int) -> dict[str, torch.Tensor]:
        return {layer: value for (s, layer), value in self.maps.items() if s == step}


@dataclass
class _UNetInput:
    """The latent grid of the current UNet call, read by a forward pre-hook."""

    height: int = 0
    width: int = 0

    def resolution(self, queries: int, layer: str) -> tuple[int, int]:
        if self.height * self.width == 0:
            raise AttentionControlError(f"layer {layer}: attention ran outside a UNet forward call")
        factor = 1
        while (self.height // factor) * (self.width // factor) > queries:
            factor *= 2
        height, width = -(-self.height // factor), -(-self.width // factor)
        if height * width != queries:
            raise AttentionControlError(
                f"layer {layer}: {queries} queries do not match the latent {self.height}x{self.width} "
                "downsampled by a power of two"
            )
        return height, width


@dataclass
class ControlledAttnProcessor:
    """Explicit attention (diffusers' ``AttnProcessor`` computation) that lets a controller see
    and replace the probabilities. One instance per layer; it knows its layer key."""

    layer: str
    controller: Callable[[AttentionCall, torch.Tensor], torch.Tensor | None]
    unet_input: _UNetInput = field(default_factory=_UNetInput)
    adapter: AttentionAdapter | None = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        grid = (height, width) if spatial else None
        adapter = self.adapter
        if adapter is None or adapter.alpha is None:
            offsets = adapter.offsets.get(self.layer) if adapter is not None else None
            hidden_states = self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, grid, offsets, "main")
        else:
            # Dual path: the adapted path (offsets, first half of the text tokens) and the frozen
            # path (no offsets, second half) see the same input; their outputs are blended.
            soft_context = hard_context = encoder_hidden_states
            if is_cross:
                if encoder_hidden_states.shape[1] % 2:
                    raise AttentionControlError(
                        f"layer {self.layer}: dual-path attention needs the text tokens of both paths "
                        f"stacked ([soft; hard]), got {encoder_hidden_states.shape[1]} tokens (odd)"
                    )
                half = encoder_hidden_states.shape[1] // 2
                soft_context, hard_context = encoder_hidden_states[:, :half], encoder_hidden_states[:, half:]
            soft = self._attend(attn, hidden_states, soft_context, attention_mask, grid, adapter.offsets.get(self.layer), "soft")
            hard = self._attend(attn, hidden_states, hard_context, attention_mask, grid, None, "hard")
            hidden_states = adapter.alpha * soft + (1.0 - adapter.alpha) * hard
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        grid: tuple[int, int] | None,
        offsets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
        path: str,
    ) -> torch.Tensor:
        """Projections (plus low-rank offsets), explicit softmax, the controller, output projection."""
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        batch, keys, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        offsets = offsets or {}
        query = _project(attn.to_q, hidden_states, offsets.get("to_q"))
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = _project(attn.to_k, context, offsets.get("to_k"))
        value = _project(attn.to_v, context, offsets.get("to_v"))
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)

        queries = probs.shape[1]
        resolution = grid if grid is not None else self.unet_input.resolution(queries, self.layer)
        call = AttentionCall(
            layer=self.layer,
            is_cross=is_cross,
            resolution=resolution,
            step=int(getattr(self.controller, "step", 0)),
            batch=batch,
            heads=attn.heads,
            cfg=bool(getattr(self.controller, "cfg", False)),
            path=path,
        )
        edited = self.controller(call, probs)
        if edited is not None:
            if edited.shape != probs.shape:
                raise AttentionControlError(
                    f"layer {self.layer}: the controller returned probabilities of shape "
                    f"{tuple(edited.shape)}, expected {tuple(probs.shape)}"
                )
            probs = edited.to(probs.dtype)

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = _project(attn.to_out[0], hidden_states, offsets.get("to_out"))
        return attn.to_out[1](hidden_states)


def _project(linear: torch.nn.Module, x: torch.Tensor, offset: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``linear(x)``, plus the low-rank offset ``up @ down`` applied to ``x`` when given: ``down``
    (rank, in) for every sample, or (batch, rank, in) per sample; ``up`` (out, rank)."""
    out = linear(x)
    if offset is None:
        return out
    down, up = offset
    if down.ndim == 2:
        low = torch.nn.functional.linear(x, down.to(x.dtype))
    else:
        low = torch.bmm(x, down.to(x.dtype).transpose(1, 2))
    return out + torch.nn.functional.linear(low, up.to(low.dtype)).to(out.dtype)


@dataclass
class AttentionAdapter:
    """Weight offsets and dual-path blending applied by the controlled processors (the tuning
    encoder's predicted LoRA offsets and its dual path).

    ``offsets``: {processor key: {"to_q"|"to_k"|"to_v"|"to_out": (down, up)}}, low-rank offsets
    added to those projections (see ``_project``); layers not named run their frozen weights.
    ``alpha``: None for one path; a number for dual path, where every selected layer computes the
    adapted path (offsets; for cross-attention the first half of the text tokens) and the frozen
    path (no offsets; the second half) and returns ``alpha * adapted + (1 - alpha) * frozen``.
    The caller stacks the two paths' text embeddings along the token axis ([soft; hard]).
    Both fields may be changed between UNet calls (per-step or per-batch predictions).
    """

    offsets: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    alpha: float | None = None


def is_cross_attention_layer(layer: str) -> bool:
    """attn2 of SD's transformer blocks is cross-attention (keys = text tokens)."""
    return ".attn2." in layer or layer.endswith("attn2.processor")


def attention_layers(unet: torch.nn.Module) -> list[str]:
    """Processor keys of every attention layer of ``unet``, in diffusers' order."""
    return list(unet.attn_processors)


def _selected(
    layers: list[str], select: Callable[[str], bool] | Iterable[str] | str | None
) -> list[str]:
    if select is None or select == "all":
        return layers
    if select == "cross":
        return [layer for layer in layers if is_cross_attention_layer(layer)]
    if select == "self":
        return [layer for layer in layers if not is_cross_attention_layer(layer)]
    if isinstance(select, str):
        raise AttentionControlError(
            f"attention layer selection {select!r} is not 'all', 'cross', 'self', a list of "
            "processor keys or a predicate"
        )
    if callable(select):
        return [layer for layer in layers if select(layer)]
    wanted = list(select)
    unknown = [layer for layer in wanted if layer not in layers]
    if unknown:
        raise AttentionControlError(
            f"unknown attention layers {unknown}; valid keys look like {layers[:2]} "
            f"(see methods.attention.attention_layers(unet))"
        )
    return [layer for layer in layers if layer in set(wanted)]


@contextlib.contextmanager
def attention_control(
    unet: torch.nn.Module,
    controller: Callable[[AttentionCall, torch.Tensor], torch.Tensor | None],
    select: Callable[[str], bool] | Iterable[str] | str | None = "all",
    adapter: AttentionAdapter | None = None,
) -> Iterator[dict[str, ControlledAttnProcessor]]:
    """Install controlled processors on the selected layers of ``unet`` for the ``with`` body.

    ``select``: "all" (default), "cross", "self", a list of processor keys, or a predicate on the
    key. ``adapter`` (optional) adds weight offsets and dual-path blending (``AttentionAdapter``).
    Yields the installed processors by layer. The original processors come back on exit,
    normal or not.
    """
    original = dict(unet.attn_processors)
    chosen = _selected(list(original), select)
    foreign = {
        layer: type(original[layer]).__name__
        for layer in chosen
        if type(original[layer]).__name__ not in PLAIN_PROCESSORS
    }
    if foreign:
        layer, kind = next(iter(foreign.items()))
        raise AttentionControlError(
            f"layer {layer} runs a {kind}, which attention control would replace and so drop its "
            f"behaviour ({len(foreign)} such layers); deselect them (select=...) or merge their "
            "weights into the UNet first"
        )
    unet_input = _UNetInput()

    def remember_input(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        unet_input.height, unet_input.width = int(sample.shape[-2]), int(sample.shape[-1])

    installed = {layer: ControlledAttnProcessor(layer, controller, unet_input, adapter) for layer in chosen}
    hook = unet.register_forward_pre_hook(remember_input, with_kwargs=True)
    try:
        unet.set_attn_processor({layer: installed.get(layer, original[layer]) for layer in original})
        yield installed
    finally:
        hook.remove()
        unet.set_attn_processor(original)


def step_callback(controller: AttentionController) -> Callable:
    """A ``callback_on_step_end`` for diffusers pipelines that advances ``controller.step``."""

    def advance(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        controller.step = step + 1
        return callback_kwargs

    return advance


def word_token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the padded 77-token sequence, BOS at 0) of ``word``'s tokens in ``prompt``.

    Finds the first occurrence of the word's token sequence; raises naming both when absent.
    """
    prompt_ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(prompt_ids) - len(word_ids) + 1):
        if prompt_ids[start : start + len(word_ids)] == word_ids:
            return list(range(start, start + len(word_ids)))
    raise AttentionControlError(
        f"the word {word!r} does not occur in the prompt {prompt!r} (as tokens); use a prompt "
        "that contains it, or guide all tokens"
    )
