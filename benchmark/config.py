"""Suite configs: YAML suites shipped in ``benchmark/suites``, ``key=value`` overrides, validation.

``load_config(suite, overrides)`` returns a frozen ``RunConfig``; ``RunConfig.to_dict()`` is the
fully resolved config (every method parameter with its default) saved with every run.
Every validation error names the key or value, and the allowed ones.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from benchmark.errors import ConfigError, did_you_mean
from data.subjects import DATASET_SOURCES
from methods.base import SamplerConfig
from metrics.base import CLIP_ARCHS, LPIPS_NETS, VLM_JUDGE_MODEL, MetricInputError, parse_model_ref

SAMPLERS = ("ddim",)
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
METRIC_WEIGHTS = ("pretrained", "random")


@dataclass(frozen=True)
class DatasetConfig:
    source: str = "mini"
    path: str | None = None
    subjects: tuple[str, ...] | None = None  # None: every subject of the dataset


@dataclass(frozen=True)
class ProtocolConfig:
    resolution: int | None = None  # None: the backbone's native resolution
    prompts: str | tuple[int, ...] = "all"  # "all" or prompt indices (0-24)
    images_per_prompt: int = 4
    prior_images: int = 0  # images of "a {class}" per subject and checkpoint (for PRES)
    identifier: str = "sks"
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the first point of any grid
    # Sampler fields given as lists (``protocol.sampler.guidance=[3,5,7.5]``): grid axes over
    # generation only, so every point reuses the same trainings.
    sampler_grid: tuple[tuple[str, tuple], ...] = ()
    # The single-image track (data/single_image.py): "all" trains on every image of a subject;
    # an index trains on that image alone and scores against the others. Several choices form
    # a grid (``single_image=[all,0,1]``): the one-image rows beside the all-images rows, and
    # the sensitivity to which photo is used.
    single_image: tuple[str | int, ...] = ("all",)

    def samplers(self) -> list[tuple[SamplerConfig, dict]]:
        """Every sampler setting of the run, with the grid values that distinguish it."""
        import itertools

        if not self.sampler_grid:
            return [(self.sampler, {})]
        names = [name for name, _ in self.sampler_grid]
        out = []
        for values in itertools.product(*(values for _, values in self.sampler_grid)):
            grid = dict(zip(names, values))
            out.append((dataclasses.replace(self.sampler, **grid), grid))
        return out


@dataclass(frozen=True)
class MethodEntry:
    """One method of the suite; ``params`` may hold lists (grid axes). ``label`` names it in reports."""

    name: str
    label: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsConfig:
    names: tuple[str, ...] = ("clip_t", "clip_i", "dino", "div", "pres", "copy", "copy_nn", "copy_real")
    weights: str = "pretrained"  # or "random": same architectures, random init (tests, offline)
    clip: str = "ViT-B-32"
    lpips_net: str = "alex"
    batch_size: int = 32
    vlm_judge_model: str = VLM_JUDGE_MODEL  # hub id@revision of the vlm_judge metrics' VLM
    # the metric backbones' forwards replayed as CUDA graphs (metrics/replay.py): "auto" = on for
    # CUDA devices, "true" = also the plumbing on a CPU, "false" = plain. The same kernels, so the
    # same values: not part of any fingerprint. H200: identical values, score stage 4.1 s vs 5.3 s
    # plain per 3000 images (benchmarks/results, eighteenth session).
    cuda_graphs: str = "auto"


@dataclass(frozen=True)
class GenerationConfig:
    batch_size: int = 8  # images per sampler call; never changes which images are produced
    # torch.compile of the UNet for sampling (methods/sampling.py::compiled_unet): "auto" = on
    # for CUDA devices when not deterministic, "true" = on everywhere, "false" = eager. Like the
    # batch size it changes kernels, not the algorithm: images move within the fast mode's
    # run-to-run spread (measured in benchmarks/results), so it is not part of any content key.
    compile: str = "auto"


@dataclass(frozen=True)
class TrainingConfig:
    # Subjects trained together in one pass by methods that can (Textual Inversion: frozen UNet,
    # per-subject vectors); each subject's state equals its alone-trained state within the
    # method's stated tolerance, and is stored exactly as alone. 1 trains every subject alone.
    subjects_per_batch: int = 8
    # torch.compile of the frozen UNet in trainings that support it (Textual Inversion): "auto" =
    # on for CUDA devices when not deterministic (H200, 8 subjects per pass: 66 s per subject's
    # 5000 steps vs 94 s eager, after a one-time ~85 s compile; benchmarks/results), "true" = on
    # everywhere, "false" = eager. Kernels change, not the algorithm (losses and vectors within
    # the tolerance tests/test_sampling_compile.py states), so it is not part of any key.
    # DreamBooth and DreamBooth-LoRA compile under "true", and under "auto" when the run gives
    # each GPU >= 6000 of their steps (the compile, ~2-2.5 min cold, is paid by every worker at
    # once; with captured steps it pays back after ~5800-7300 steps on an H200, one process or
    # four; benchmark/units.py::resolve_finetune_compile logs the decision).
    # TI passes are balanced (30 at 8: 8, 8, 7, 7).
    compile: str = "auto"
    # DreamBooth and DreamBooth-LoRA steps captured once as a CUDA graph and replayed
    # (methods.training.CapturedStep): no host work per kernel. "auto" = on for CUDA devices when
    # not deterministic (H200, one process: 63 ms per DreamBooth step captured vs 115 ms plain,
    # 43 ms compiled and captured vs 92-102 ms compiled; losses within 4e-4 relative of the plain
    # loop's; benchmarks/results), "true" = on everywhere (a CPU runs the same plumbing, uncaptured),
    # "false" = the plain loop. A step that cannot be captured (fp16 loss scaling, a trained text
    # encoder or token, a failed capture) runs plain and its state says why. Same algorithm (AdamW
    # keeps its step counters on the device), so it is not part of any key, like compile.
    cuda_graphs: str = "auto"
    # Seconds between a training's resume points (methods.training "resume points"): an interrupted
    # run (Ctrl-C, a killed or preempted worker, a time limit) resumes each training from its last
    # point, taking exactly the steps it would have taken (bit-identical on a CPU). Points hold the
    # trainable tensors and their optimizer state: ~KB for Textual Inversion, ~10 GB for a full
    # DreamBooth UNet (a 1000-step DreamBooth on a GPU never reaches 600 s). 0 turns them off.
    resume_every: float = 600.0


@dataclass(frozen=True)
class RunConfig:
    name: str
    description: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbone: str = "tiny"
    dtype: str = "auto"
    device: str = "auto"
    # Bit-reproducible runs on one GPU and software stack (deterministic kernels, at a measured
    # cost; benchmark/environment.py). The default fast mode has a documented run-to-run spread.
    deterministic: bool = False
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    methods: tuple[MethodEntry, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def to_dict(self) -> dict:
        def plain(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        document = plain(self)
        # a sampler grid is written as the user gives it: list-valued sampler fields
        for name, values in document["protocol"].pop("sampler_grid"):
            document["protocol"]["sampler"][name] = list(values)
        choices = document["protocol"]["single_image"]
        document["protocol"]["single_image"] = choices[0] if len(choices) == 1 else choices
        return document


def available_suites() -> dict[str, str]:
    """Suite name -> its description, for every YAML shipped in ``benchmark/suites``."""
    out = {}
    folder = resources.files("benchmark").joinpath("suites")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            document = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
            out[entry.name[:-5]] = document.get("description", "")
    return out


def read_suite(suite: str) -> tuple[dict, str]:
    """The raw mapping of a suite given by name or by path to a YAML file, and where it came from."""
    path = Path(suite).expanduser()
    if suite.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"suite file {path} does not exist")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    else:
        suites = available_suites()
        if suite not in suites:
            raise ConfigError(
                f"unknown suite {suite!r}{did_you_mean(suite, suites)}; valid: "
                f"{', '.join(suites)}, or a path to a suite YAML file"
            )
        text = resources.files("benchmark").joinpath("suites", f"{suite}.yaml").read_text(encoding="utf-8")
        origin = f"suite {suite!r}"
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{origin}: not valid YAML ({error})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level")
    document.setdefault("name", Path(suite).stem)
    return document, origin


def parse_value(text: str) -> Any:
    """An override value: YAML scalars and lists (``[1, 2]``), with ``5e-3`` read as a number."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _find_method(methods: list, key: str, origin: str) -> dict:
    for entry in methods:
        if key in (entry.get("label"), entry.get("name")):
            return entry
    names = [entry.get("label") or entry.get("name") for entry in methods]
    raise ConfigError(
        f"override methods.{key}...: no method {key!r} in {origin}{did_you_mean(key, names)}; "
        f"methods: {', '.join(map(str, names))}"
    )


def apply_overrides(document: dict, overrides: list[str], origin: str) -> dict:
    """Apply ``key=value`` overrides (dotted keys) to a raw suite mapping."""
    document = copy.deepcopy(document)
    document.setdefault("methods", [])
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. protocol.seed=1)")
        value = parse_value(text)
        parts = key.split(".")
        if parts == ["methods"]:
            names = [n.strip() for n in str(text).split(",") if n.strip()]
            if not names:
                raise ConfigError("override methods=...: give one or more method names, comma-separated")
            chosen = []
            for name in names:
                match = [e for e in document["methods"] if name in (e.get("label"), e.get("name"))]
                chosen.append(match[0] if match else {"name": name})
            document["methods"] = chosen
            continue
        if parts == ["subjects"]:
            document.setdefault("dataset", {})["subjects"] = (
                [s.strip() for s in text.split(",") if s.strip()] if isinstance(value, str) else value
            )
            continue
        if parts[0] == "methods":
            if len(parts) < 3:
                raise ConfigError(
                    f"override {key!r}: use methods.<name>.<parameter>=value (e.g. methods.dreambooth.steps=100)"
                )
            entry = _find_method(document["methods"], parts[1], origin)
            target = entry.setdefault("params", {})
            for part in parts[2:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = value
            continue
        target = document
        for part in parts[:-1]:
            existing = target.get(part)
            if existing is None:
                target[part] = existing = {}
            if not isinstance(existing, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            target = existing
        target[parts[-1]] = value
    return document


def _check_keys(mapping: Any, allowed: list[str], where: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {allowed}, got {mapping!r}")
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
            )
    return mapping


def _build(cls: type, mapping: Any, where: str, **converters) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    mapping = dict(_check_keys(mapping, names, where))
    for key, convert in converters.items():
        if key in mapping:
            mapping[key] = convert(mapping[key], f"{where}.{key}")
    for f in dataclasses.fields(cls):
        if f.name in mapping and f.name not in converters:
            mapping[f.name] = _scalar(mapping[f.name], f.type, f"{where}.{f.name}")
    return cls(**mapping)


def _scalar(value: Any, annotation: Any, where: str) -> Any:
    kind = str(annotation)
    if kind.endswith(" | None"):  # optional fields are checked like the others when given
        if value is None:
            return None
        kind = kind[: -len(" | None")]
    if kind in ("int", "<class 'int'>"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif kind in ("float", "<class 'float'>"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif kind in ("str", "<class 'str'>"):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        value = str(value)
    return value


def _choice(choices: tuple[str, ...]):
    def check(value: Any, where: str) -> str:
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not valid{did_you_mean(value, choices)}; allowed: {', '.join(choices)}")
        return value

    return check


def _compile_mode(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return value.lower()
    raise ConfigError(f"{where}: expected auto, true or false, got {value!r}")


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _positive(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == float("inf"):
        raise ConfigError(f"{where}: expected a number of seconds >= 0 (0 turns it off), got {value!r}")
    return float(value)


def _non_negative(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected an integer >= 0, got {value!r}")
    return value


def _resolution(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        raise ConfigError(
            f"{where}: expected a positive multiple of 8 in pixels (e.g. 512), or null for the backbone's own, got {value!r}"
        )
    return value


def _prompts(value: Any, where: str) -> str | tuple[int, ...]:
    if value == "all":
        return "all"
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 25 for v in values):
        raise ConfigError(f"{where}: expected 'all' or a list of prompt indices 0-24, got {value!r}")
    return tuple(values)


def _subjects(value: Any, where: str) -> tuple[str, ...] | None:
    if value in (None, "all"):
        return None
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{where}: expected 'all' or a list of subject ids, got {value!r}")
    return tuple(values)


def _single_image(value: Any, where: str) -> tuple[str | int, ...]:
    """``all`` / false, true (= image 0), an image index, or a list of these (a grid)."""
    values = value if isinstance(value, list) else [value]
    out: list[str | int] = []
    for item in values:
        if item is None or item is False or item == "all":
            choice: str | int = "all"
        elif item is True:
            choice = 0
        elif isinstance(item, int) and item >= 0:
            choice = item
        else:
            raise ConfigError(
                f"{where}: {item!r} is not valid; give 'all' (every image), true or an image index >= 0 "
                "(train on that one image), or a list of these (e.g. [all, 0, 1])"
            )
        if any(type(choice) is type(seen) and choice == seen for seen in out):
            raise ConfigError(f"{where}: {value} repeats {choice!r}")
        out.append(choice)
    if not out:
        raise ConfigError(f"{where}: an empty list; give 'all', an image index or a list of them")
    return tuple(out)


def _sampler(value: Any, where: str) -> SamplerConfig:
    sampler = _build(SamplerConfig, value, where, name=_choice(SAMPLERS), steps=_positive)
    if sampler.guidance < 0 or not 0.0 <= sampler.eta <= 1.0:
        raise ConfigError(f"{where}: guidance must be >= 0 and eta in [0, 1], got {sampler}")
    return sampler


def _sampler_grid(value: Any, where: str) -> tuple[SamplerConfig, tuple[tuple[str, tuple], ...]]:
    """A sampler mapping whose fields may be lists (grid axes): (first point, axes)."""
    mapping = _check_keys(value, [f.name for f in dataclasses.fields(SamplerConfig)], where)
    for key, values in mapping.items():
        if isinstance(values, list) and not values:
            raise ConfigError(f"{where}.{key}: an empty list; give one value or a list of values to sweep")
        if isinstance(values, list) and len(set(map(str, values))) != len(values):
            raise ConfigError(f"{where}.{key}: {values} repeats a value")
    first = {key: (values[0] if isinstance(values, list) else values) for key, values in mapping.items()}
    axes = []
    for key, values in mapping.items():
        if isinstance(values, list):  # each point is validated as a whole sampler
            axes.append((key, tuple(getattr(_sampler({**first, key: v}, where), key) for v in values)))
    return _sampler(first, where), tuple(axes)


def _methods(value: Any, where: str) -> tuple[MethodEntry, ...]:
    from methods.base import ParamsError, expand_params
    from methods.registry import UnknownMethodError, get_method

    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of methods (e.g. [{{name: dreambooth}}])")
    entries, labels = [], set()
    for number, item in enumerate(value):
        if isinstance(item, str):
            item = {"name": item}
        item = _check_keys(item, ["name", "label", "params"], f"{where}[{number}]")
        name = item.get("name")
        if not name:
            raise ConfigError(f"{where}[{number}]: a method entry needs a 'name'")
        try:
            cls = get_method(str(name))
        except UnknownMethodError as error:
            raise ConfigError(f"{where}[{number}]: {error}") from None
        # a method may name its default label (two_stage: "… (reconstructed)", so reports say so)
        label = str(item.get("label") or getattr(cls, "default_label", None) or name)
        if label in labels:
            raise ConfigError(f"{where}: two methods labelled {label!r}; give each a distinct 'label'")
        labels.add(label)
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.{label}.params: expected a mapping of hyper-parameters")
        try:
            expand_params(cls.Params, params, f"methods.{label}.params")
        except ParamsError as error:
            raise ConfigError(str(error)) from None
        entries.append(MethodEntry(name=str(name), label=label, params=params))
    return tuple(entries)


def _model_ref(value: Any, where: str) -> str:
    try:
        parse_model_ref(value, where)
    except MetricInputError as error:
        raise ConfigError(str(error)) from None
    return value


def _metric_names(value: Any, where: str) -> tuple[str, ...]:
    from metrics.registry import METRIC_GROUPS, available_metrics, expand_metric_names

    names = value if isinstance(value, list) else [value]
    valid = {**available_metrics(), **METRIC_GROUPS}
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{where}: expected metric names (e.g. [clip_t, dino]), got {value!r}")
        if name not in valid:
            raise ConfigError(f"{where}: unknown metric {name!r}{did_you_mean(name, valid)}; valid: {', '.join(valid)}")
    return expand_metric_names(names)


def _protocol(value: Any) -> ProtocolConfig:
    mapping = dict(_check_keys(value, [f.name for f in dataclasses.fields(ProtocolConfig) if f.name != "sampler_grid"], "protocol"))
    sampler, grid = _sampler_grid(mapping.pop("sampler", None), "protocol.sampler")
    protocol = _build(
        ProtocolConfig, mapping, "protocol",
        prompts=_prompts, images_per_prompt=_positive, prior_images=_non_negative, resolution=_resolution,
        single_image=_single_image,
    )
    return dataclasses.replace(protocol, sampler=sampler, sampler_grid=grid)


def validate(document: dict, origin: str = "config") -> RunConfig:
    names = [f.name for f in dataclasses.fields(RunConfig)]
    document = _check_keys(document, names, origin)
    from methods.backbones import BackboneError, resolve_backbone

    backbone = str(document.get("backbone", "tiny"))
    try:
        resolve_backbone(backbone)
    except BackboneError as error:
        raise ConfigError(f"{origin}: backbone: {error}") from None
    config = RunConfig(
        name=str(document.get("name", "custom")),
        description=_scalar(document.get("description", ""), "str", "description"),
        dataset=_build(
            DatasetConfig, document.get("dataset"), "dataset",
            source=_choice(DATASET_SOURCES), subjects=_subjects,
        ),
        backbone=backbone,
        dtype=_choice(DTYPES)(document.get("dtype", "auto"), "dtype"),
        device=_choice(DEVICES)(document.get("device", "auto"), "device"),
        deterministic=_boolean(document.get("deterministic", False), "deterministic"),
        protocol=_protocol(document.get("protocol")),
        methods=_methods(document.get("methods"), "methods"),
        metrics=_build(
            MetricsConfig, document.get("metrics"), "metrics",
            names=_metric_names, weights=_choice(METRIC_WEIGHTS), batch_size=_positive,
            clip=_choice(CLIP_ARCHS), lpips_net=_choice(LPIPS_NETS), vlm_judge_model=_model_ref,
            cuda_graphs=_compile_mode,
        ),
        generation=_build(
            GenerationConfig, document.get("generation"), "generation", batch_size=_positive, compile=_compile_mode
        ),
        training=_build(
            TrainingConfig, document.get("training"), "training", subjects_per_batch=_positive, compile=_compile_mode,
            cuda_graphs=_compile_mode, resume_every=_seconds,
        ),
    )
    refused = (  # (key, its value, what it changes): outside the bit-reproducibility guarantee
        ("training.compile", config.training.compile, "compiled kernels are outside the"),
        ("training.cuda_graphs", config.training.cuda_graphs, "captured steps are outside the measured"),
        ("generation.compile", config.generation.compile, "compiled kernels are outside the"),
    )
    for key, value, what in refused:
        if config.deterministic and value == "true":
            raise ConfigError(
                f"{origin}: deterministic=true with {key}=true: {what} "
                f"bit-reproducibility guarantee; drop {key} (auto turns it off) or set it to false"
            )
    return config


def load_config(suite: str = "default", overrides: list[str] | None = None) -> RunConfig:
    document, origin = read_suite(suite)
    document = apply_overrides(document, list(overrides or []), origin)
    return validate(document, origin)


def config_from_dict(document: dict) -> RunConfig:
    """Rebuild a RunConfig from a saved resolved config."""
    return validate(copy.deepcopy(document), "saved config")
