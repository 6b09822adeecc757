"""The DreamBooth protocol as shipped: prompts, classes, categories and the seed rule.

The expected values are re-derived here from the dataset's own prompts_and_classes.txt with a
different parser (regexes over the raw text), not through data.protocol.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from importlib import resources

import pytest

from data.protocol import (
    KINDS,
    PRIOR_PROMPT,
    derive_seed,
    dreambooth_classes,
    image_seed,
    parse_prompts_and_classes,
    prompt_templates,
    training_seed,
)


@pytest.fixture(scope="module")
def original_text(dreambooth_dir) -> str:
    return (dreambooth_dir / "prompts_and_classes.txt").read_text(encoding="utf-8")


def raw_prompts(text: str, heading: str) -> list[str]:
    section = text.split(heading, 1)[1].split("]", 1)[0]
    return re.findall(r"^'(.*)'\.format\(unique_token, class_token\)", section, flags=re.M)


def test_shipped_resource_is_byte_identical(dreambooth_dir):
    shipped = resources.files("data").joinpath("resources", "prompts_and_classes.txt").read_bytes()
    assert shipped == (dreambooth_dir / "prompts_and_classes.txt").read_bytes()


@pytest.mark.parametrize(("kind", "heading"), [("object", "Object Prompts"), ("live", "Live Subject Prompts")])
def test_25_prompts_per_kind_verbatim(original_text, kind, heading):
    expected = raw_prompts(original_text, heading)
    assert len(expected) == 25
    templates = prompt_templates(kind)
    assert [p.template for p in templates] == expected
    assert [p.index for p in templates] == list(range(25))


def test_classes_match_the_original(original_text):
    block = original_text.split("subject_name,class\n", 1)[1].split("\n\n", 1)[0]
    expected = dict(line.split(",", 1) for line in block.splitlines())
    assert dreambooth_classes() == expected
    assert len(expected) == 30
    live = sorted(s for s, c in expected.items() if c in ("cat", "dog"))
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def test_prompt_categories():
    object_categories = [p.category for p in prompt_templates("object")]
    assert object_categories == ["recontextualization"] * 20 + ["property"] * 5
    live_categories = [p.category for p in prompt_templates("live")]
    assert live_categories == (["recontextualization"] * 10 + ["accessorization"] * 10
                               + ["property"] * 5)
    assert prompt_templates("live")[10].template == "a {0} {1} wearing a red hat"
    assert prompt_templates("object")[24].template == "a cube shaped {0} {1}"


def test_rendering_and_evaluation_text():
    prompt = prompt_templates("object")[0]
    assert prompt.render("sks", "backpack") == "a sks backpack in the jungle"
    assert prompt.evaluation_text("backpack") == "a backpack in the jungle"
    assert PRIOR_PROMPT.render("sks", "dog") == "a dog"
    with pytest.raises(ValueError, match="unknown subject kind 'animal'"):
        prompt_templates("animal")
    assert KINDS == ("object", "live")


def test_parser_rejects_a_short_prompt_list(original_text):
    damaged = original_text.replace("'a cube shaped {0} {1}'.format(unique_token, class_token)", "", 1)
    with pytest.raises(ValueError, match="expected 25 object prompts, found 24"):
        parse_prompts_and_classes(damaged)


def test_seed_rule_is_independent_of_order():
    subjects, prompts = ["dog", "teapot", "can"], [p.template for p in prompt_templates("object")[:4]]
    cells = list(itertools.product(subjects, prompts, range(4)))
    in_order = {cell: image_seed(0, *cell) for cell in cells}
    shuffled = cells[:]
    random.Random(1).shuffle(shuffled)
    in_shards = {}
    for shard in (shuffled[::3], shuffled[1::3], shuffled[2::3]):
        for cell in reversed(shard):
            in_shards[cell] = image_seed(0, *cell)
    assert in_shards == in_order
    assert len(set(in_order.values())) == len(cells)  # every image its own seed
    assert image_seed(1, "dog", prompts[0], 0) != image_seed(0, "dog", prompts[0], 0)
    assert all(0 <= seed < 2**63 for seed in in_order.values())


def test_seed_values_are_pinned():
    # A change here silently changes every generated image of every stored result set.
    template = "a {0} {1} in the jungle"
    digest = hashlib.sha256("\x1f".join(["image", "0", "dog", template, "0"]).encode()).digest()
    assert image_seed(0, "dog", template, 0) == int.from_bytes(digest[:8], "big") >> 1
    assert image_seed(0, "dog", template, 0) == 114575276063835421
    assert training_seed(0, "dog") == derive_seed("train", 0, "dog") == 554356908881428972
    assert training_seed(0, "dog") != training_seed(0, "dog2")
