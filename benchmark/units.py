"""Expansion: config -> method cells (grids) × subjects × checkpoints × prompts × k -> run units.

A ``WorkGroup`` is one (method cell, subject): one prepare unit and its image units. Keys hash
everything that changes an output (DESIGN.md "Run unit and store"); seeds follow the protocol's
seed rule, so the same config gives the same units however the work is split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from benchmark.config import MethodEntry, RunConfig
from benchmark.hashing import stable_hash
from data.protocol import PRIOR_PROMPT, Prompt, image_seed, training_seed
from data.subjects import Subject, load_subjects
from methods.backbones import resolve_backbone
from methods.base import Method, MethodContext, expand_params
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

    def build(self, context: MethodContext) -> Method:
        return get_method(self.method)(self.params, context)


@dataclass(frozen=True)
class PrepareUnit:
    cell: MethodCell
    subject: Subject
    seed: int
    key: str


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


@dataclass(frozen=True)
class WorkGroup:
    prepare: PrepareUnit
    images: tuple[ImageUnit, ...]


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
    cell, subject = group.prepare.cell, group.prepare.subject
    return {
        "key": unit.key,
        "prepare_key": unit.prepare_key,
        "label": cell.label,
        "method": cell.method,
        "cell_id": cell.cell_id,
        "grid": cell.grid,
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
        cells.append(
            MethodCell(
                label=entry.label,
                method=entry.name,
                params=params,
                grid=grid,
                cell_id=entry.label + _grid_suffix(grid),
                fingerprint=fingerprint,
                fingerprint_hash=stable_hash(fingerprint),
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
    )


def select_prompts(config: RunConfig, subject: Subject) -> tuple[Prompt, ...]:
    prompts = subject.prompts()
    if config.protocol.prompts == "all":
        return prompts
    return tuple(prompts[i] for i in config.protocol.prompts)


def expand(config: RunConfig, context: MethodContext, subjects: list[Subject] | None = None) -> Plan:
    """All work of ``config``: one WorkGroup per (method cell, subject), in config order."""
    if subjects is None:
        subjects = load_subjects(config.dataset.source, config.dataset.path, config.dataset.subjects)
    protocol = config.protocol
    sampler = dataclasses.asdict(protocol.sampler)
    device_type = context.device.split(":")[0]
    cells = [cell for entry in config.methods for cell in expand_cells(entry, context)]
    groups = []
    for cell in cells:
        method = cell.build(context)
        checkpoints = list(method.checkpoints())
        for subject in subjects:
            train_seed = training_seed(protocol.seed, subject.id)
            prepare_key = stable_hash(
                {
                    "method": cell.fingerprint,
                    "subject": [subject.id, subject.class_noun, subject.kind, subject.data_sha],
                    "seed": train_seed,
                    "device_type": device_type,
                }
            )
            prepare = PrepareUnit(cell=cell, subject=subject, seed=train_seed, key=prepare_key)
            jobs = [(p, "eval", k) for p in select_prompts(config, subject) for k in range(protocol.images_per_prompt)]
            jobs += [(PRIOR_PROMPT, "prior", k) for k in range(protocol.prior_images)]
            images = []
            for checkpoint_index, checkpoint in enumerate(checkpoints):
                for prompt, role, k in jobs:
                    seed = image_seed(protocol.seed, subject.id, prompt.template, k)
                    prompt_text = (
                        prompt.render("", subject.class_noun) if role == "prior" else method.render_prompt(prompt, subject)
                    )
                    key = stable_hash(
                        {
                            "prepare": prepare_key,
                            "checkpoint": checkpoint,
                            "prompt": prompt_text,
                            "seed": seed,
                            "sampler": sampler,
                            "resolution": context.resolution,
                        }
                    )
                    images.append(
                        ImageUnit(
                            prepare_key=prepare_key,
                            cell_id=cell.cell_id,
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
                            key=key,
                        )
                    )
            groups.append(WorkGroup(prepare=prepare, images=tuple(images)))
    return Plan(config, context, tuple(subjects), tuple(cells), tuple(groups))


def shard(groups: tuple[WorkGroup, ...], index: int, count: int) -> tuple[WorkGroup, ...]:
    """Shard ``index`` of ``count`` (by position): a unit's output never depends on its shard."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    return tuple(g for i, g in enumerate(groups) if i % count == index)
