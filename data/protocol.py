"""The DreamBooth evaluation protocol: prompt templates per subject kind, prompt categories, seeds.

The templates are parsed from the dataset's own ``prompts_and_classes.txt`` (shipped verbatim
in ``data/resources``), so the 25 prompts per kind are exactly the paper's.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

KINDS = ("object", "live")
# DreamBooth, Sec. 4.1: prompts 0-19 of objects re-contextualize; for live subjects 0-9
# re-contextualize and 10-19 accessorize; the last 5 of both change a property.
_CATEGORY_RANGES = {
    "object": ((0, 20, "recontextualization"), (20, 25, "property")),
    "live": ((0, 10, "recontextualization"), (10, 20, "accessorization"), (20, 25, "property")),
}
# The identifier and class noun slots of the templates, as the dataset writes them.
_SLOTS = ("{0}", "{1}")


@dataclass(frozen=True)
class Prompt:
    """One prompt template: ``{0}`` is the unique identifier, ``{1}`` the class noun."""

    template: str
    category: str
    index: int

    def render(self, identifier: str, class_noun: str) -> str:
        """The prompt text; an empty identifier drops it (and its space), keeping the class."""
        text = self.template.replace("{0}", identifier).replace("{1}", class_noun)
        # the scene + instance task's slot: plain "scene" unless a method bound words to it
        text = text.replace("{scene}", "scene")
        return re.sub(r"\s+", " ", text).strip()

    def evaluation_text(self, class_noun: str) -> str:
        """CLIP-T text: the prompt with the unique identifier removed and the class noun kept."""
        return self.render("", class_noun)


PRIOR_PROMPT = Prompt(template="a {1}", category="prior", index=-1)


def _resource_text(name: str) -> str:
    return resources.files("data").joinpath("resources", name).read_text(encoding="utf-8")


def parse_prompts_and_classes(text: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Parse ``prompts_and_classes.txt``: ({subject: class noun}, {kind: 25 templates}).

    The prompt lists are Python literals of ``'...'.format(unique_token, class_token)`` calls;
    they are read as string literals, never executed.
    """
    classes: dict[str, str] = {}
    lines = text.splitlines()
    try:
        start = lines.index("subject_name,class") + 1
    except ValueError:
        raise ValueError("prompts_and_classes.txt: no 'subject_name,class' header line") from None
    for line in lines[start:]:
        if not line.strip():
            break
        subject, class_noun = line.split(",", 1)
        classes[subject.strip()] = class_noun.strip()

    prompts: dict[str, tuple[str, ...]] = {}
    sections = {"Object Prompts": "object", "Live Subject Prompts": "live"}
    current: str | None = None
    for line in lines:
        if line.strip() in sections:
            current = sections[line.strip()]
            prompts[current] = ()
            continue
        match = re.match(r"\s*('(?:[^'\\]|\\.)*')\.format\(unique_token, class_token\),?\s*$", line)
        if match and current is not None:
            prompts[current] += (ast.literal_eval(match.group(1)),)
    for kind in KINDS:
        if len(prompts.get(kind, ())) != 25:
            raise ValueError(
                f"prompts_and_classes.txt: expected 25 {kind} prompts, found "
                f"{len(prompts.get(kind, ()))}"
            )
    return classes, prompts


@lru_cache(maxsize=1)
def _dreambooth_tables() -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    return parse_prompts_and_classes(_resource_text("prompts_and_classes.txt"))


def dreambooth_classes() -> dict[str, str]:
    """The 30 DreamBooth subjects and their class nouns, in the dataset's order."""
    return dict(_dreambooth_tables()[0])


def prompt_templates(kind: str) -> tuple[Prompt, ...]:
    """The 25 DreamBooth prompts for subjects of ``kind`` ('object' or 'live')."""
    if kind not in KINDS:
        raise ValueError(f"unknown subject kind {kind!r}; expected one of {KINDS}")
    templates = _dreambooth_tables()[1][kind]
    out = []
    for index, template in enumerate(templates):
        category = next(c for lo, hi, c in _CATEGORY_RANGES[kind] if lo <= index < hi)
        out.append(Prompt(template=template, category=category, index=index))
    return tuple(out)


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from its parts alone (never from batch position, shard or call order)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def image_seed(protocol_seed: int, subject_id: str, prompt_template: str, k: int) -> int:
    """DESIGN.md seed rule: image ``k`` of prompt ``p`` of subject ``s``."""
    return derive_seed("image", protocol_seed, subject_id, prompt_template, k)


def training_seed(protocol_seed: int, subject_id: str) -> int:
    """Seed for a method's preparation (training) on one subject."""
    return derive_seed("train", protocol_seed, subject_id)
