"""The one method protocol every adapter implements, and the context the harness gives it.

A method is built from validated hyper-parameters (its ``Params`` dataclass) and a
``MethodContext`` (backbone spec, device, dtype, cache dir). Construction is cheap: models load
lazily in ``prepare``/``generate`` so that the harness can fingerprint methods without loading
anything.

Contract (the harness relies on each point):
- ``fingerprint()`` holds everything that changes the method's output except the subject and the
  seed: name, ``version`` (bump it when a change alters outputs), all params, backbone, dtype.
- ``training_fingerprint()`` holds everything that changes what ``prepare`` writes: the same
  minus the *generation-only* params (fields declared with ``param(..., generation=True)``),
  under the name of the method whose training it is (``trains_as``). The harness keys states by
  it, so grid cells (and suite entries, e.g. ``dreamblend`` on ``dreambooth``) whose training
  fingerprints are equal share one training per subject; image keys add the generation part.
- ``checkpoints()`` is a function of the params alone (so runs can be planned before training).
- ``prepare(subject, workdir, seed)`` writes the learned state into ``workdir`` (safetensors and
  JSON only); it may assume ``workdir`` is empty and private. The harness makes it atomic.
- ``prepare_many(subjects, workdirs, seeds)`` (optional; only where ``prepares_many()`` is true)
  trains several subjects with equal training fingerprints in one pass and writes into each
  ``workdirs[i]`` exactly what ``prepare(subjects[i], workdirs[i], seeds[i])`` writes: same
  files, same keys, values equal within the tolerance the method states (each subject's draws
  come from its own seed, never from its position in the pass). It raises if any subject fails;
  the harness then prepares each subject alone, so one subject's failure is its own.
- ``load_state(workdir)`` reads it back; the harness always generates from a reloaded state, so
  an interrupted and an uninterrupted run produce the same images.
- ``generate(state, checkpoint, prompts, seeds, sampler)`` returns one PIL image per
  (prompt, seed) pair, image ``i`` depending only on ``prompts[i]`` and ``seeds[i]``.
"""

from __future__ import annotations

import dataclasses
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from data.protocol import Prompt
from data.subjects import Subject
from methods.backbones import BackboneSpec


@dataclass(frozen=True)
class SamplerConfig:
    """How images are sampled: DDIM by default, as the DreamBooth protocol does."""

    name: str = "ddim"
    steps: int = 50
    guidance: float = 7.5
    eta: float = 0.0


@dataclass(frozen=True)
class MethodContext:
    """What the harness gives every method: backbone, device, dtype, caches, protocol bits."""

    backbone: BackboneSpec
    device: str = "cpu"
    dtype: str = "float32"
    resolution: int = 64
    identifier: str = "sks"
    cache_dir: Path | None = None  # shared caches (class-prior images, ...) across runs
    deterministic: bool = False  # deterministic kernels (benchmark.environment.apply_determinism)
    compile_unet: bool = False  # sample through a torch.compile'd UNet (methods.sampling.compiled_unet)
    compile_training: bool = False  # train through it where the UNet is frozen (training.compile)
    # fine-tunes (DreamBooth, its LoRA) train through it too: training.compile=true only (auto leaves
    # them eager; benchmarks/results says when it pays)
    compile_finetune: bool = False
    # fine-tunes capture their training step as a CUDA graph (training.cuda_graphs; methods.training.CapturedStep)
    graph_finetune: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass
class State:
    """A prepared method for one subject: the folder it lives in, plus what was loaded from it."""

    path: Path
    subject: Subject
    data: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """Base class of all adapters (see the module docstring for the contract)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type]  # a frozen dataclass with a default for every field
    description: ClassVar[str] = ""
    # The method whose ``prepare`` output this one's equals (None: itself). A method that reuses
    # another's training (DreamBlend on DreamBooth) names it and gives the same training params,
    # so both entries share one state per subject.
    trains_as: ClassVar[type[Method] | None] = None
    # True where ``generate`` samples through ``build_pipeline(..., compile_unet=context.compile_unet)``:
    # the image records' ``compile`` field says what sampling actually did, not just the setting.
    samples_compiled: ClassVar[bool] = False
    # True where ``prepare`` fine-tunes UNet weights through ``torch.compile`` when
    # ``context.compile_finetune`` (DreamBooth, DreamBooth-LoRA); ``training.compile=auto`` counts
    # such methods' steps to decide it (``benchmark.units.resolve_finetune_compile``).
    compiles_finetune: ClassVar[bool] = False

    def __init__(self, params: Any, context: MethodContext):
        if not isinstance(params, self.Params):
            raise TypeError(f"{self.name}: params must be {self.Params.__name__}, got {type(params).__name__}")
        self.params = params
        self.context = context

    def fingerprint(self) -> dict:
        return self._identity(self.name, self.version, params_to_dict(self.params))

    def training_fingerprint(self) -> dict:
        """The fingerprint of what ``prepare`` writes: generation-only params left out."""
        trainer = self.trains_as or type(self)
        return self._identity(trainer.name, trainer.version, training_params_dict(self.params))

    def _identity(self, name: str, version: str, params: dict) -> dict:
        fingerprint = {
            "method": name,
            "version": version,
            "params": params,
            "backbone": self.context.backbone.fingerprint(),
            "dtype": self.context.dtype,
            "resolution": self.context.resolution,
            "identifier": self.context.identifier,
        }
        # Deterministic kernels give other low bits than the fast ones: their states and images
        # are keyed apart (and fast-mode keys stay as they were).
        if self.context.deterministic:
            fingerprint["deterministic"] = True
        return fingerprint

    def generation_fingerprint(self) -> dict:
        """What changes images beyond the training state: method identity and generation params."""
        return {"method": self.name, "version": self.version, "params": generation_params_dict(self.params)}

    def checkpoints(self) -> Sequence[str]:
        return ["final"]

    def render_prompt(self, prompt: Prompt, subject: Subject) -> str:
        """The text given to the model: by default '{identifier} {class}' in the template."""
        return prompt.render(self.context.identifier, subject.class_noun)

    @abstractmethod
    def prepare(self, subject: Subject, workdir: Path, seed: int) -> None:
        """Train/encode for ``subject``, writing the state into ``workdir``."""

    def prepares_many(self) -> bool:
        """Whether ``prepare_many`` may train several subjects in one pass with these params and
        context (a frozen backbone and per-subject parameters; see the module docstring)."""
        return False

    def prepare_many(self, subjects: Sequence[Subject], workdirs: Sequence[Path], seeds: Sequence[int]) -> None:
        """Train ``subjects`` together, writing each state into its workdir (as ``prepare`` would)."""
        raise NotImplementedError(f"{self.name} prepares one subject at a time (prepares_many() is false)")

    @abstractmethod
    def load_state(self, workdir: Path, subject: Subject) -> State:
        """Read a state written by ``prepare``."""

    @abstractmethod
    def generate(
        self,
        state: State,
        checkpoint: str,
        prompts: Sequence[str],
        seeds: Sequence[int],
        sampler: SamplerConfig,
    ) -> list[Image.Image]:
        """One image per (prompt, seed)."""

    def release(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Drop per-subject GPU memory between subjects (models shared per worker stay)."""
        return None


# ----------------------------------------------------------------------------- params


class ParamsError(ValueError):
    """A hyper-parameter that is unknown or of the wrong type, naming it and the valid ones."""


def param(default: Any, *, source: str = "", doc: str = "", generation: bool = False) -> Any:
    """A ``Params`` field with its provenance: where the default comes from ("paper",
    "official code", "diffusers example", "ours: <why>") and what it does. ``generation=True``
    marks a knob that changes only how images are generated from a trained state (guidance
    weights, which checkpoints to blend, reference guidance on/off): grids over it reuse one
    training per subject."""
    metadata = {"source": source, "doc": doc, "generation": generation}
    if isinstance(default, (list, dict, set)):
        raise TypeError("param defaults must be immutable (use a tuple)")
    return field(default=default, metadata=metadata)


def is_generation_param(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("generation", False))


def generation_param_names(params_class: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(params_class) if is_generation_param(f))


def params_to_dict(params: Any) -> dict:
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def training_params_dict(params: Any) -> dict:
    generation = set(generation_param_names(type(params)))
    return {k: v for k, v in params_to_dict(params).items() if k not in generation}


def generation_params_dict(params: Any) -> dict:
    generation = set(generation_param_names(type(params)))
    return {k: v for k, v in params_to_dict(params).items() if k in generation}


def _is_sequence_type(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (tuple, list, Sequence, typing.Sequence) or annotation in (tuple, list)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        last_error = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ParamsError as error:
                last_error = error
        raise last_error or ParamsError(f"{where}: invalid value {value!r}")
    if _is_sequence_type(annotation):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, where) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ParamsError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            try:
                if isinstance(value, str) and float(value).is_integer():
                    return int(float(value))
            except ValueError:
                pass
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ParamsError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def expand_params(params_class: type, raw: dict | None, where: str) -> list[tuple[Any, dict]]:
    """Validate ``raw`` against ``params_class`` and expand list values into a cartesian grid.

    A list given to a scalar field is a grid axis; a sequence-typed field (e.g. checkpoint
    steps) takes a list as its value, and a list of lists as a grid axis. Returns
    [(params instance, {grid field: value})] in grid order.
    """
    import itertools

    from data.common import did_you_mean

    raw = dict(raw or {})
    hints = typing.get_type_hints(params_class)
    fields = {f.name: f for f in dataclasses.fields(params_class)}
    for key in raw:
        if key not in fields:
            raise ParamsError(
                f"{where}: unknown parameter {key!r}{did_you_mean(key, fields)}; "
                f"valid: {', '.join(fields)}"
            )
    axes: list[tuple[str, list]] = []
    fixed: dict[str, Any] = {}
    for key, value in raw.items():
        annotation = hints[key]
        is_grid = (
            isinstance(value, list)
            and value
            and (not _is_sequence_type(annotation) or all(isinstance(v, list) for v in value))
        )
        if is_grid:
            axes.append((key, [_coerce(v, annotation, f"{where}.{key}") for v in value]))
        else:
            fixed[key] = _coerce(value, annotation, f"{where}.{key}")
    out = []
    for combination in itertools.product(*(values for _, values in axes)):
        grid = {key: value for (key, _), value in zip(axes, combination)}
        try:
            instance = params_class(**fixed, **grid)
        except (TypeError, ValueError) as error:
            raise ParamsError(f"{where}: {error}") from None
        out.append((instance, {k: (list(v) if isinstance(v, tuple) else v) for k, v in grid.items()}))
    return out
