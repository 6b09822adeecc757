"""The local VLM judge: ``vlm_judge_cp`` (concept preservation) and ``vlm_judge_pf`` (prompt
following), an integer 0–4 per image from an open vision-language model run through transformers.

DreamBench++ (Peng et al., "DreamBench++", arXiv 2406.16855) showed that a multimodal LLM asked
for a 0–4 rating tracks human judgement of personalization better than DINO / CLIP. It used
GPT-4o, which costs money per image and changes under the user's feet; this judge runs a pinned
open model locally, so a score is a function of the images, the rubric and the weights alone.

| step | DreamBench++ (official code) | here | source |
|---|---|---|---|
| judge | GPT-4o (gpt-4o-2024-05-13) through the API | Qwen3-VL-8B-Instruct at a pinned commit (``metrics.vlm_judge_model``, default ``metrics.base.VLM_JUDGE_MODEL``), local, transformers | ours: the strongest open VLM of the ≤ 8 B class that transformers ships (8.8 B parameters counted from its config: 8.2 B text, 0.6 B vision) |
| aspects | concept preservation (reference vs generated image) and prompt following (image vs text), asked in separate conversations | the same, as two metrics; ``vlm_judge`` in a config names both | DreamBench++ |
| scale | integer 0–4, five named levels; tables report the mean score / 4 over 3 independent GPT-4o runs, and CP × PF | integer 0–4 from one deterministic run, stored as is (mean / 4 is DreamBench++'s column) | DreamBench++ scale (``benchmarking.py``) |
| rubric | shape, colour, texture, face (CP); relevance, accuracy, completeness, context (PF) | ``RUBRICS``: our own wording and level definitions, hashed into the fingerprint | ours, informed by DreamBench++ |
| references | one reference image per concept | the first ``MAX_REFERENCES`` = 3 of ``inputs.references`` (the held-out photos in the single-image track), in the subject's order, in one conversation | ours: DreamBooth subjects have 4–6 photos; several views pin the identity down |
| image size | both squashed to 512 × 512 | longer side resized to ``IMAGE_SIZE`` = 512 (bicubic, antialiased), aspect kept; the processor then rounds to its 32-px grid | ours: a squash distorts the proportions the rubric asks about |
| conversation | the instructions in a user turn, a canned assistant turn restating them, then the images | one user turn: rubric, images (and prompt), answer format | ours: simpler; no words put in the model's mouth |
| answer | "Score: N"; CP the score alone, PF a brief analysis first | the same | DreamBench++ |
| decoding | temperature 1, a random seed, up to 3 retries until exactly one score parses | greedy, one attempt, ``MAX_NEW_TOKENS`` = 16 (CP) / 96 (PF) | ours: deterministic; retrying until an answer parses would select answers |
| parsing | regex ``score: N``, exactly one match | ``parse_score``: one distinct integer 0–4 after "score" (or a bare integer answer); anything else is NaN with the raw answer kept in ``notes`` | DreamBench++'s rule, made strict |
| PF text | the prompt | ``inputs.texts``: the prompt with the identifier removed, class noun kept (CLIP-T's text) | ours: the judge cannot know a rare-token identifier |

Determinism: greedy decoding with fixed settings gives the same answer for the same inputs and
batch. In bf16 on a GPU the logits of a padded batch can differ in the last bits from those of
the same image in another batch, so an answer can (rarely) flip between batch compositions;
``MetricSettings(precision="fp32")`` narrows that (on the CPU, fp32, a padded batch answers
exactly as one prompt at a time: tested). Batch size is ``settings.batch_size``
(``metrics.batch_size``).

``weights="random"`` builds a tiny random-init Qwen3-VL (same classes, tiny dimensions) with a
byte-level tokenizer built offline: it exercises the whole path (smoke runs, tests) and its
answers are noise, so nearly every value is NaN with the raw text noted. A random-init model of
the full architecture is built only by ``benchmarks/gpu_vlm_judge.py`` (cost per 1000 images).

The pinned commit of the default model was read from public repositories that pin it; it has
not been checked against the hub from here (no network), like the hub files of
``metrics/backbones.py``. The fingerprint records the commit actually loaded and the sha256 of
every weight file (the hub cache names blobs by it).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from data.common import hub_reachable
from metrics.backbones import (
    MetricWeightsError,
    _seeded,
    hub_source,
    offline_message,
    resolve_precision,
)
from metrics.base import Metric, MetricSettings, ScoringInputs, parse_model_ref
from metrics.inputs import check_inputs

log = logging.getLogger(__name__)

VLM_JUDGE_VERSION = 1
PARSER_VERSION = 1
IMAGE_SIZE = 512  # longer side, pixels
MAX_REFERENCES = 3
MAX_NEW_TOKENS = {"concept": 16, "prompt": 96}
SCORE_RANGE = (0, 4)

RUBRICS = {
    "concept": (
        "You are rating a subject-driven text-to-image model. The reference photos show one specific "
        "subject (an object, an animal or a person). The generated image should show this same "
        "individual subject, possibly in a new scene, pose or style.\n"
        "Rate how well the generated image keeps the identity of the subject. Judge the subject only: "
        "ignore the background, the scene, the pose and the image quality. Compare the overall shape "
        "and proportions, the colours and where they are, the materials and surface patterns, "
        "distinctive details (logos, text, markings, accessories) and, for animals and people, the face.\n"
        "0: no subject, or a different kind of thing.\n"
        "1: the same kind of thing, but clearly another individual.\n"
        "2: similar, but several distinctive features are wrong or missing.\n"
        "3: the same individual with small differences.\n"
        "4: the same individual, no visible difference in identity."
    ),
    "prompt": (
        "You are rating a text-to-image model. Rate how well the image follows the text prompt: are "
        "the objects, their attributes and number, the actions, the setting and the style that the "
        "prompt asks for present and correct? Ignore image quality unless the prompt asks for it. "
        "The subject may be one specific individual; judge only that it is the kind of thing the "
        "prompt names.\n"
        "0: the image has nothing to do with the prompt.\n"
        "1: only the main subject or the general theme matches; most of the prompt is missing or wrong.\n"
        "2: the main elements are there, but an important part is missing or wrong.\n"
        "3: everything important is there; a minor detail is missing or off.\n"
        "4: every part of the prompt is depicted correctly."
    ),
}
ANSWER_FORMATS = {
    "concept": "Answer with one line and nothing else: Score: N (N an integer from 0 to 4).",
    "prompt": (
        "First write one short sentence of analysis. Then, on the last line, write: Score: N "
        "(N an integer from 0 to 4)."
    ),
}

# ----------------------------------------------------------------------------- parsing

_SCORE = re.compile(
    r"\bscore\b[\s*_#`\[\]]*(?::|=|\bis\b)?[\s*_`\[]*(-?\d+(?:\.\d+)?)(?:\s*(?:/|out\s+of)\s*(\d+))?",
    re.IGNORECASE,
)
_BARE = re.compile(r"^[\s*`\[]*(-?\d+(?:\.\d+)?)[\s*`\]\.]*$")


def parse_score(answer: str) -> tuple[float, str]:
    """(score, "") for an answer holding one rubric score, else (NaN, why it was refused).

    Accepted: "Score: 3", "score = 3", "The score is 3", "**Score:** 3/4", an answer that is a
    bare integer ("3"); a score repeated with the same value. Refused: an empty answer, no
    score, several different scores, a non-integer, a value outside 0–4, a scale other than /4.
    """
    text = (answer or "").strip()
    if not text:
        return math.nan, "empty answer"
    found = [(value, scale) for value, scale in _SCORE.findall(text)]
    if not found:
        bare = _BARE.match(text)
        if not bare:
            return math.nan, "no 'Score: N' in the answer"
        found = [(bare.group(1), "")]
    if any(scale not in ("", str(SCORE_RANGE[1])) for _, scale in found):
        return math.nan, "a score on another scale than 0-4"
    values = {float(value) for value, _ in found}
    if len(values) > 1:
        return math.nan, f"several different scores ({', '.join(sorted(v for v, _ in found))})"
    value = values.pop()
    if not value.is_integer() or not SCORE_RANGE[0] <= value <= SCORE_RANGE[1]:
        return math.nan, f"score {value:g} is not an integer from 0 to 4"
    return value, ""


# ----------------------------------------------------------------------------- model specs

# Qwen3-VL-8B-Instruct's published config.json (hf.co/Qwen/Qwen3-VL-8B-Instruct; the same values
# appear in the transformers tests and independent ports); ids of the special tokens come from
# the tokenizer in use.
QWEN3_VL_8B_TEXT = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6, vocab_size=151936,
    max_position_embeddings=262144, attention_bias=False, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                     "mrope_section": [24, 20, 20]},
)
QWEN3_VL_8B_VISION = dict(
    depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
    hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
    in_channels=3, deepstack_visual_indexes=[8, 16, 24], num_position_embeddings=2304,
)
# The same family at tiny dimensions (tests, weights=random); vocab_size is the tokenizer's.
TINY_TEXT = dict(
    QWEN3_VL_8B_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=8192, vocab_size=None,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                     "mrope_section": [2, 1, 1]},
)
TINY_VISION = dict(
    QWEN3_VL_8B_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
    deepstack_visual_indexes=[0, 1], num_position_embeddings=64,
)
# Qwen3-VL's published preprocessor_config.json.
QWEN3_VL_IMAGE_PROCESSOR = dict(
    patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    size={"shortest_edge": 65536, "longest_edge": 16777216},
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# ChatML with Qwen-VL's image placeholder, as the Qwen3-VL template renders a user turn of images
# and texts (no system prompt, no tools, no video); used only for models built here.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer():
    """A Qwen2 tokenizer of the 256 byte symbols and Qwen's special tokens, no merges: offline."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = bytes_to_unicode()
    vocab = {symbols[byte]: byte for byte in range(256)}
    vocab.update({token: 256 + index for index, token in enumerate(SPECIAL_TOKENS)})
    return Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens=list(SPECIAL_TOKENS[1:]))


def add_special_tokens(tokenizer):
    """``tokenizer`` with Qwen's chat and vision tokens (for a stand-in tokenizer, e.g. CLIP's BPE)."""
    missing = [t for t in SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.pad_token, tokenizer.eos_token = "<|endoftext|>", "<|im_end|>"
    return tokenizer


def judge_processor(tokenizer):
    """A Qwen3-VL processor around ``tokenizer`` with the published image-processor values."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN3_VL_IMAGE_PROCESSOR), tokenizer=tokenizer,
                            video_processor=video, chat_template=CHAT_TEMPLATE)


def qwen3_vl_config(tokenizer, text: dict = QWEN3_VL_8B_TEXT, vision: dict = QWEN3_VL_8B_VISION):
    """A Qwen3VLConfig of the given dimensions whose token ids are ``tokenizer``'s (a vocabulary
    of ``None`` size is the tokenizer's)."""
    from transformers import Qwen3VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(text, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                vocab_size=max(text["vocab_size"] or 0, len(tokenizer)))
    return Qwen3VLConfig(text_config=text, vision_config=dict(vision), tie_word_embeddings=False, **ids)


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedJudge:
    """One VLM + processor on one device and dtype, with what identifies its weights."""

    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    identity: dict = field(default_factory=dict)

    def answer(self, conversations: list[list[dict]], images: list[list[torch.Tensor]], max_new_tokens: int,
               batch_size: int, min_new_tokens: int = 0) -> list[str]:
        """Greedy answers to ``conversations`` (one user turn each; ``images[i]`` fill its image slots)."""
        from transformers import GenerationConfig

        tokenizer = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id or tokenizer.eos_token_id
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                  min_new_tokens=min_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        answers: list[str] = []
        for start in range(0, len(conversations), batch_size):
            chunk = slice(start, start + batch_size)
            texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                     for c in conversations[chunk]]
            batch = self.processor(text=texts, images=images[chunk], return_tensors="pt", padding=True)
            batch = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                     for k, v in batch.items() if isinstance(v, torch.Tensor)}
            with torch.inference_mode():
                output = self.model.generate(**batch, generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1]:].cpu()
            answers += self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return answers


_JUDGES: dict[tuple, LoadedJudge] = {}
_LOCK = threading.RLock()


def clear_judge_cache() -> None:
    with _LOCK:
        _JUDGES.clear()


def judge_dtype(settings: MetricSettings) -> torch.dtype:
    return torch.bfloat16 if resolve_precision(settings) == "bf16" else torch.float32


def get_judge(settings: MetricSettings) -> LoadedJudge:
    """The process-shared judge for ``settings`` (weights, model, device, precision)."""
    device, dtype = torch.device(settings.device), judge_dtype(settings)
    model_ref = settings.vlm_judge_model if settings.weights == "pretrained" else "tiny"
    key = (settings.weights, model_ref, str(device), str(dtype))
    with _LOCK:
        if key not in _JUDGES:
            if settings.weights == "pretrained":
                _JUDGES[key] = _load_pretrained(model_ref, device, dtype)
            else:
                _JUDGES[key] = build_tiny_judge(device, dtype)
        return _JUDGES[key]


def _snapshot(model_ref: str) -> tuple[str, str | None, Path]:
    from huggingface_hub import snapshot_download

    repo, revision = parse_model_ref(model_ref)
    what = f"VLM judge {repo}"
    try:
        return repo, revision, Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: download when the hub is reachable
        if not hub_reachable():
            raise MetricWeightsError(offline_message(what, f"hf.co/{repo}@{revision or 'main'}")) from None
    try:
        return repo, revision, Path(snapshot_download(repo, revision=revision))
    except Exception as error:  # noqa: BLE001
        raise MetricWeightsError(f"{what}: could not download revision {revision or 'main'}: {error}") from None


def pretrained_identity(model_ref: str) -> dict:
    """Hub id, requested revision, the commit in the cache and the sha256 of each weight file."""
    repo, revision, path = _snapshot(model_ref)
    if revision is None:
        log.warning("vlm_judge: %s is not pinned to a revision; using the cached main (%s)", repo, path.name)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MetricWeightsError(f"VLM judge {repo}: no .safetensors weights in {path}")
    return {"source": f"hf:{repo}", "revision": revision or "main (unpinned)", "commit": path.name,
            "files": [hub_source(repo, str(f)) for f in files], "path": str(path)}


def _load_pretrained(model_ref: str, device: torch.device, dtype: torch.dtype) -> LoadedJudge:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    identity = pretrained_identity(model_ref)
    path = identity.pop("path")
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, device_map={"": str(device)})
    except Exception as error:  # noqa: BLE001
        raise MetricWeightsError(f"VLM judge {model_ref}: could not load {path}: {error}") from None
    processor.tokenizer.padding_side = "left"
    return LoadedJudge(model.eval().requires_grad_(False), processor, device, dtype, identity)


def state_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(f"{name}|{tuple(array.shape)}\n".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def build_tiny_judge(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedJudge:
    """Tiny random-init Qwen3-VL (``TINY_TEXT`` / ``TINY_VISION``), seed 0, byte-level tokenizer."""
    from transformers import Qwen3VLForConditionalGeneration

    from metrics.backbones import RANDOM_INIT_SEED

    tokenizer = byte_level_tokenizer()
    tokenizer.padding_side = "left"
    processor = judge_processor(tokenizer)
    config = qwen3_vl_config(tokenizer, TINY_TEXT, TINY_VISION)
    model = _seeded(lambda: Qwen3VLForConditionalGeneration(config)).eval().requires_grad_(False)
    identity = {"source": "built", "arch": "Qwen3VLForConditionalGeneration (tiny: TINY_TEXT, TINY_VISION)",
                "weights_tag": f"random-init-seed-{RANDOM_INIT_SEED}", "weights_sha256": state_sha256(model),
                "tokenizer": "byte-level, no merges, Qwen special tokens"}
    return LoadedJudge(model.to(device, dtype), processor, torch.device(device), dtype, identity)


# ----------------------------------------------------------------------------- images


def judge_pixels(image: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """3×H×W in [0, 1] -> 3×h×w uint8 with the longer side ``size`` (default ``IMAGE_SIZE``;
    bicubic, antialiased)."""
    size = size or IMAGE_SIZE
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        target = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(image[None].float(), size=target, mode="bicubic", antialias=True, align_corners=False)[0]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# ----------------------------------------------------------------------------- metrics


def concept_conversation(references: int, aspect: str = "concept") -> list[dict]:
    reference_items = [{"type": "image"} for _ in range(references)]
    return [{"role": "user", "content": [
        {"type": "text", "text": RUBRICS[aspect] + "\n\nReference photos of the subject:\n"},
        *reference_items,
        {"type": "text", "text": "\nGenerated image:\n"},
        {"type": "image"},
        {"type": "text", "text": "\n" + ANSWER_FORMATS[aspect]},
    ]}]


def prompt_conversation(text: str, aspect: str = "prompt") -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "text", "text": RUBRICS[aspect] + f'\n\nText prompt: "{text}"\nImage:\n'},
        {"type": "image"},
        {"type": "text", "text": "\n" + ANSWER_FORMATS[aspect]},
    ]}]


class _VlmJudge(Metric):
    aspect: ClassVar[str]
    layout: ClassVar[str]
    higher_is_better = True
    version: ClassVar[int] = VLM_JUDGE_VERSION

    def __init__(self, settings: MetricSettings) -> None:
        self.settings = settings
        self.notes: list[str] = []
        self.answers: list[str] = []  # raw answers of the last ``score`` call

    @property
    def judge(self) -> LoadedJudge:
        return get_judge(self.settings)

    def identity(self) -> dict:
        if self.settings.weights == "pretrained":
            # Cheap: the cache's file names; the model itself loads only when something is scored.
            return {k: v for k, v in pretrained_identity(self.settings.vlm_judge_model).items() if k != "path"}
        return self.judge.identity

    def fingerprint(self) -> dict:
        import transformers

        return {
            "metric": self.name,
            "version": self.version,
            "role": self.role,
            "higher_is_better": self.higher_is_better,
            "aspect": self.aspect,
            "weights": self.settings.weights,
            "judge": self.identity(),
            "dtype": str(judge_dtype(self.settings)).removeprefix("torch."),
            "transformers": transformers.__version__,
            "rubric": RUBRICS[self.aspect],
            "answer_format": ANSWER_FORMATS[self.aspect],
            "conversation": self.layout,
            "images": {"longer_side": IMAGE_SIZE, "resize": "bicubic antialias, aspect kept",
                       **({"max_references": MAX_REFERENCES} if self.aspect == "concept" else {})},
            "decoding": {"greedy": True, "num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS[self.aspect]},
            "parser": {"version": PARSER_VERSION, "accepts": "one distinct integer 0-4 after 'score' or a bare "
                       "integer answer; otherwise NaN with the raw answer in the note"},
            "scale": "integer 0-4 as answered (DreamBench++ tables show score/4)",
        }

    def conversations(self, inputs: ScoringInputs) -> tuple[list[list[dict]], list[list[torch.Tensor]]]:
        raise NotImplementedError

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        conversations, images = self.conversations(inputs)
        if not conversations:
            self.notes, self.answers = [], []
            return np.zeros(0)
        self.answers = self.judge.answer(conversations, images, MAX_NEW_TOKENS[self.aspect], self.settings.batch_size)
        values, self.notes = [], []
        for raw in self.answers:
            value, problem = parse_score(raw)
            values.append(value)
            self.notes.append(f"judge answer: {raw!r}" if not problem else f"unparsed ({problem}): {raw!r}")
        unparsed = sum(math.isnan(v) for v in values)
        if unparsed:
            log.warning("%s: %d of %d answers could not be parsed; stored as NaN with the raw text in the notes",
                        self.name, unparsed, len(values))
        return np.asarray(values, dtype=np.float64)


class VlmJudgeConcept(_VlmJudge):
    name = "vlm_judge_cp"
    aspect = "concept"
    description = "local VLM judge (default Qwen3-VL-8B), concept preservation vs the reference photos, 0-4"
    layout = "one user turn: rubric, up to 3 reference photos, the generated image, answer format"

    def conversations(self, inputs):
        check_inputs(inputs, references=True)
        references = [judge_pixels(r) for r in inputs.references[:MAX_REFERENCES]]
        count = inputs.images.shape[0]
        return ([concept_conversation(len(references)) for _ in range(count)],
                [[*references, judge_pixels(image)] for image in inputs.images])


class VlmJudgePrompt(_VlmJudge):
    name = "vlm_judge_pf"
    aspect = "prompt"
    description = "local VLM judge (default Qwen3-VL-8B), prompt following of the prompt without identifier, 0-4"
    layout = "one user turn: rubric, the prompt without identifier in quotes, the image, answer format"

    def conversations(self, inputs):
        check_inputs(inputs, texts=True)
        return ([prompt_conversation(text) for text in inputs.texts],
                [[judge_pixels(image)] for image in inputs.images])
