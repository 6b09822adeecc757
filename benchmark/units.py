"""Expansion: config -> method cells (grids) × subjects × checkpoints × prompts × k -> run units.

A ``WorkGroup`` is one *training* of one subject: one prepare unit and the image units of every
method cell that shares it. Cells share a training when their training fingerprints are equal:
grid points that differ only in generation-only params (``param(..., generation=True)``) or in
the protocol's sampler grid, and entries of methods that train as another (``trains_as``, e.g.
DreamBlend on DreamBooth). Keys hash everything that changes an output (DESIGN.md "Run unit and
store"); seeds follow the protocol's seed rule, so the same config gives the same units however
the work is split, and grid points of one subject see the same seeds (paired comparisons).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from benchmark.config import MethodEntry, RunConfig
from benchmark.hashing import stable_hash
from data.protocol import PRIOR_PROMPT, Prompt, image_seed, training_seed
from data.single_image import ALL_IMAGES, GRID_NAME, TrainingView, training_views
from data.subjects import Subject, load_subjects
from methods.backbones import resolve_backbone
from methods.base import Method, MethodContext, SamplerConfig, expand_params
from methods.registry import get_method

ROLES = ("eval", "prior")


@dataclass(frozen=True)
class MethodCell:
    """One method entry at one grid point."""

    label: str  # the suite entry's label
    method: str  # registry name
    params: Any  # the Params dataclass instance
    grid: dict  # the grid parameters that vary across this entry's cells
    cell_id: str  # label + grid, e.g. "dreambooth[lr=1e-05]"
    fingerprint: dict
    fingerprint_hash: str
    training_fingerprint: dict  # what prepare writes depends on this alone
    trainer: str  # name of the method whose training this is; names the state folder
    generation_fingerprint: dict

    def build(self, context: MethodContext) -> Method:
        return get_method(self.method)(self.params, context)

    @property
    def trainer_class(self) -> type[Method]:
        """The class whose ``prepare`` trains this cell's state (DreamBlend trains as DreamBooth)."""
        method = get_method(self.method)
        return method.trains_as or method

    @property
    def generation_key_part(self) -> dict | None:
        """What image keys add to the prepare key: None for a method generating as it trains
        (keeps the keys of methods without generation-only params as they always were)."""
        if self.method == self.trainer and not self.generation_fingerprint.get("params"):
            return None
        return self.generation_fingerprint


@dataclass(frozen=True)
class PrepareUnit:
    cell: MethodCell  # the first cell that needs this training (any sharing cell prepares alike)
    subject: Subject
    seed: int
    key: str

    @property
    def trainer(self) -> str:
        return self.cell.trainer


@dataclass(frozen=True)
class ImageUnit:
    prepare_key: str
    cell_id: str
    label: str
    subject_id: str
    checkpoint: str
    checkpoint_index: int
    prompt: Prompt
    role: str  # "eval": protocol prompts; "prior": class-prior images for PRES
    k: int
    seed: int
    prompt_text: str  # what the model is given
    eval_text: str  # what CLIP-T compares to: identifier removed, class kept
    key: str
    sampler: SamplerConfig = SamplerConfig()
    grid: tuple = ()  # (name, value) pairs: the method cell's grid, then the sampler grid
    method_cell_id: str = ""  # the MethodCell generating it (cell_id without the sampler grid)
    train_image: str = ALL_IMAGES  # the single-image track's choice ("all" or the image index)
    reference_sha: str = ""  # the reference set scored against ("" = the subject's data_sha)


@dataclass(frozen=True)
class WorkGroup:
    """One training of one subject and every image generated from it (possibly by several cells)."""

    prepare: PrepareUnit
    images: tuple[ImageUnit, ...]
    cells: tuple[MethodCell, ...] = ()

    def cell(self, method_cell_id: str) -> MethodCell:
        for cell in self.cells or (self.prepare.cell,):
            if cell.cell_id == method_cell_id:
                return cell
        raise KeyError(method_cell_id)


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    context: MethodContext
    subjects: tuple[Subject, ...]
    cells: tuple[MethodCell, ...]
    groups: tuple[WorkGroup, ...]

    @property
    def image_units(self) -> list[ImageUnit]:
        return [unit for group in self.groups for unit in group.images]


def unit_spec(group: WorkGroup, unit: ImageUnit) -> dict:
    """The identity of an image unit, as the plan and every manifest row record it."""
    cell, subject = group.cell(unit.method_cell_id or unit.cell_id), group.prepare.subject
    return {
        "key": unit.key,
        "prepare_key": unit.prepare_key,
        "trainer": group.prepare.trainer,
        "label": cell.label,
        "method": cell.method,
        "cell_id": unit.cell_id,
        "grid": dict(unit.grid) if unit.grid else cell.grid,
        "subject": subject.id,
        "class_noun": subject.class_noun,
        "kind": subject.kind,
        "data_sha": subject.data_sha,
        "checkpoint": unit.checkpoint,
        "checkpoint_index": unit.checkpoint_index,
        "role": unit.role,
        "prompt_index": unit.prompt.index,
        "category": unit.prompt.category,
        "template": unit.prompt.template,
        "prompt_text": unit.prompt_text,
        "eval_text": unit.eval_text,
        "k": unit.k,
        "seed": unit.seed,
        "train_image": unit.train_image,
        "reference_sha": unit.reference_sha or subject.data_sha,
    }


def _grid_suffix(grid: dict) -> str:
    if not grid:
        return ""
    return "[" + ",".join(f"{k}={v}" for k, v in grid.items()) + "]"


def expand_cells(entry: MethodEntry, context: MethodContext) -> list[MethodCell]:
    cls = get_method(entry.name)
    cells = []
    for params, grid in expand_params(cls.Params, entry.params, f"methods.{entry.label}.params"):
        method = cls(params, context)
        fingerprint = method.fingerprint()
        training = method.training_fingerprint()
        cells.append(
            MethodCell(
                label=entry.label,
                method=entry.name,
                params=params,
                grid=grid,
                cell_id=entry.label + _grid_suffix(grid),
                fingerprint=fingerprint,
                fingerprint_hash=stable_hash(fingerprint),
                training_fingerprint=training,
                trainer=training.get("method", entry.name),
                generation_fingerprint=method.generation_fingerprint(),
            )
        )
    return cells


def method_context(config: RunConfig, device: str, dtype: str, cache_dir=None) -> MethodContext:
    backbone = resolve_backbone(config.backbone)
    return MethodContext(
        backbone=backbone,
        device=device,
        dtype=dtype,
        resolution=config.protocol.resolution or backbone.resolution,
        identifier=config.protocol.identifier,
        cache_dir=cache_dir,
        deterministic=config.deterministic,
        compile_unet=compile_enabled(config, device),
        compile_training=compile_enabled(config, device, config.training.compile),
        compile_finetune=config.training.compile == "true",
        graph_finetune=compile_enabled(config, device, config.training.cuda_graphs),
    )


def compile_enabled(config: RunConfig, device: str, mode: str | None = None) -> bool:
    """An auto/true/false speed setting resolved (``generation.compile`` unless ``mode`` is given,
    e.g. ``training.compile`` or ``training.cuda_graphs``): auto is on for CUDA devices unless the
    run is deterministic."""
    mode = config.generation.compile if mode is None else mode
    if mode == "auto":
        return str(device).startswith("cuda") and not config.deterministic
    return mode == "true"


# ``training.compile=auto`` compiles the fine-tunes (DreamBooth, DreamBooth-LoRA) only when the run
# gives each GPU at least this many of their steps. With captured steps (training.cuda_graphs, on
# by default on a GPU) a step is bound by the GPU's kernels, so what a compile saves is GPU time,
# shared by every worker on that GPU, while the compile (~2-2.5 min cold, ~14 s on a warm inductor
# cache) is paid by all of them at once, at the start. H200 break-evens, benchmarks/results: one
# process ~5 800 DreamBooth / ~7 300 LoRA steps (20 ms of a 63 ms / 51 ms step saved; eleventh and
# twelfth sessions); four workers under MPS ~6 700 DreamBooth steps on the GPU (43.7 -> 27.8 s per
# 1000-step training, amortized, for 106 s more warm-up; twelfth session). Before capture, one
# process broke even at ~3 100 / ~4 400 steps (fifth and sixth sessions) and the rule counted
# steps per worker, which with four workers asked for 16 000 steps on the GPU. The 30-subject
# protocol (45 000 fine-tune steps) is far above the threshold, one subject (1500) below.
FINETUNE_COMPILE_STEPS = 6000


def resolve_finetune_compile(
    config: RunConfig, context: MethodContext, groups, devices: int | None, trained=lambda group: False
) -> tuple[MethodContext, str]:
    """``context`` with ``compile_finetune`` decided, and one line saying why (for the run log).

    ``true``/``false`` are kept as given. ``auto`` (off on a CPU and under ``deterministic``)
    compiles when the untrained groups (``trained(group)`` False) of methods that compile their
    fine-tune add up to ``FINETUNE_COMPILE_STEPS`` or more steps per GPU (``devices``: the GPUs
    the executor's workers share, however many workers each); ``devices=None`` (an executor that
    does not know them, e.g. Ray) keeps them eager.
    """
    mode = config.training.compile
    if mode != "auto":
        return context, f"fine-tunes {'compiled' if mode == 'true' else 'eager'} (training.compile={mode})"
    if not compile_enabled(config, context.device, "auto"):
        return context, "fine-tunes eager (training.compile=auto: CPU or deterministic run)"
    steps = 0
    for group in groups:
        cell = group.prepare.cell
        if cell.trainer_class.compiles_finetune and not trained(group):
            steps += int(cell.training_fingerprint.get("params", {}).get("steps") or 0)
    if not steps:
        return context, "fine-tunes: none to train"
    if not devices:
        return context, f"fine-tunes eager (training.compile=auto: {steps} steps, GPU count unknown to this executor)"
    per_device = steps / devices
    if per_device < FINETUNE_COMPILE_STEPS:
        return context, (f"fine-tunes eager (training.compile=auto: {per_device:.0f} steps per GPU < "
                         f"{FINETUNE_COMPILE_STEPS}, where a compile pays back; training.compile=true forces it)")
    return dataclasses.replace(context, compile_finetune=True), (
        f"fine-tunes compiled (training.compile=auto: {per_device:.0f} steps per GPU >= {FINETUNE_COMPILE_STEPS})")


def select_prompts(config: RunConfig, subject: Subject) -> tuple[Prompt, ...]:
    prompts = subject.prompts()
    if config.protocol.prompts == "all" or subject.scene:  # a scene pair has its one prompt
        return prompts
    return tuple(prompts[i] for i in config.protocol.prompts)


def expand(config: RunConfig, context: MethodContext, subjects: list[Subject] | None = None) -> Plan:
    """All work of ``config``: one WorkGroup per (training, subject), in config order."""
    if subjects is None:
        subjects = load_subjects(config.dataset.source, config.dataset.path, config.dataset.subjects)
    protocol = config.protocol
    samplers = protocol.samplers()
    device_type = context.device.split(":")[0]
    cells = [cell for entry in config.methods for cell in expand_cells(entry, context)]
    by_training: dict[str, tuple[PrepareUnit, list[ImageUnit], list[MethodCell]]] = {}
    choices = protocol.single_image
    views: dict[str, list[TrainingView]] = {s.id: training_views(s, choices) for s in subjects}
    for cell in cells:
        method = cell.build(context)
        checkpoints = list(method.checkpoints())
        for subject, view in ((v.subject, v) for s in subjects for v in views[s.id]):
            # the track's choice is a grid axis whenever a run asks for anything but "all"
            view_grid = {GRID_NAME: view.choice} if choices != (ALL_IMAGES,) else {}
            train_seed = training_seed(protocol.seed, subject.id)
            prepare_key = stable_hash(
                {
                    "method": cell.training_fingerprint,
                    "subject": [subject.id, subject.class_noun, subject.kind, subject.data_sha],
                    "seed": train_seed,
                    "device_type": device_type,
                }
            )
            if prepare_key not in by_training:
                prepare = PrepareUnit(cell=cell, subject=subject, seed=train_seed, key=prepare_key)
                by_training[prepare_key] = (prepare, [], [])
            _, images, group_cells = by_training[prepare_key]
            group_cells.append(cell)
            jobs = [(p, "eval", k) for p in select_prompts(config, subject) for k in range(protocol.images_per_prompt)]
            jobs += [(PRIOR_PROMPT, "prior", k) for k in range(protocol.prior_images)]
            for sampler, sampler_grid in samplers:
                grid = {**cell.grid, **view_grid, **sampler_grid}
                cell_id = cell.label + _grid_suffix(grid)
                for checkpoint_index, checkpoint in enumerate(checkpoints):
                    for prompt, role, k in jobs:
                        seed = image_seed(protocol.seed, subject.id, prompt.template, k)
                        prompt_text = (
                            prompt.render("", subject.class_noun) if role == "prior" else method.render_prompt(prompt, subject)
                        )
                        identity = {
                            "prepare": prepare_key,
                            "checkpoint": checkpoint,
                            "prompt": prompt_text,
                            "seed": seed,
                            "sampler": dataclasses.asdict(sampler),
                            "resolution": context.resolution,
                        }
                        if cell.generation_key_part is not None:
                            identity["generation"] = cell.generation_key_part
                        images.append(
                            ImageUnit(
                                prepare_key=prepare_key,
                                cell_id=cell_id,
                                label=cell.label,
                                subject_id=subject.id,
                                checkpoint=checkpoint,
                                checkpoint_index=checkpoint_index,
                                prompt=prompt,
                                role=role,
                                k=k,
                                seed=seed,
                                prompt_text=prompt_text,
                                eval_text=prompt.evaluation_text(subject.class_noun),
                                key=stable_hash(identity),
                                sampler=sampler,
                                grid=tuple(grid.items()),
                                method_cell_id=cell.cell_id,
                                train_image=str(view.choice),
                                reference_sha=view.reference_sha,
                            )
                        )
    groups = tuple(
        WorkGroup(prepare=prepare, images=tuple(images), cells=tuple(group_cells))
        for prepare, images, group_cells in by_training.values()
    )
    _refuse_duplicate_cells(groups)
    return Plan(config, context, tuple(subjects), tuple(cells), groups)


def _refuse_duplicate_cells(groups: tuple[WorkGroup, ...]) -> None:
    """Two entries (or grid points) that would make the very same images: one is redundant, and
    scoring them twice under two names would double-count. Say which and how to fix it."""
    from benchmark.errors import ConfigError

    owner: dict[str, str] = {}
    for group in groups:
        for unit in group.images:
            other = owner.setdefault(unit.key, unit.cell_id)
            if other != unit.cell_id:
                raise ConfigError(
                    f"methods: {other!r} and {unit.cell_id!r} are the same method with the same "
                    "parameters, so they would produce identical images; drop one or change a "
                    "parameter of one (a label alone does not make a different method)"
                )


def training_passes(
    groups: tuple[WorkGroup, ...], context: MethodContext, subjects_per_batch: int
) -> list[tuple[int, ...]]:
    """Indices of ``groups`` by training pass, in plan order.

    Groups whose trainings differ only in the subject (same method, trainer and training
    fingerprint) go into passes of at most ``subjects_per_batch`` when their method
    ``prepares_many()`` (Textual Inversion); every other group is a pass of its own. The passes of
    one training are as equal in size as the limit allows (30 subjects at 8 make 8, 8, 7, 7, not
    8, 8, 8, 6; at 16, two of 15): a compiled pass compiles once per batch shape, so fewer shapes
    cost fewer compiles, and no short last pass idles the GPU. Which groups share a pass changes
    only the speed: each state is stored as if prepared alone, equal within the method's stated
    tolerance. Passes are ordered by their first group's place in the plan.
    """
    members: dict[str, list[int]] = {}
    singles: list[list[int]] = []
    batchable: dict[str, bool] = {}
    for index, group in enumerate(groups):
        cell = group.prepare.cell
        key = stable_hash([cell.method, cell.trainer, cell.training_fingerprint])
        if key not in batchable:
            batchable[key] = subjects_per_batch > 1 and cell.build(context).prepares_many()
        if batchable[key]:
            members.setdefault(key, []).append(index)
        else:
            singles.append([index])
    passes = singles + [chunk for indices in members.values() for chunk in balanced_chunks(indices, subjects_per_batch)]
    passes.sort(key=lambda indices: indices[0])
    return [tuple(indices) for indices in passes]


def balanced_chunks(items: list, limit: int) -> list[list]:
    """``items`` in order, cut into the fewest chunks of at most ``limit``, sizes differing by ≤ 1."""
    count = -(-len(items) // limit)
    size, extra = divmod(len(items), count) if count else (0, 0)
    chunks, start = [], 0
    for number in range(count):
        end = start + size + (number < extra)  # the first ``extra`` chunks take one more
        chunks.append(items[start:end])
        start = end
    return chunks


def shard(groups: tuple[WorkGroup, ...], index: int, count: int) -> tuple[WorkGroup, ...]:
    """Shard ``index`` of ``count`` (by position): a unit's output never depends on its shard."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return tuple(g for i, g in enumerate(groups) if i % count == index)
