"""GPU cost of the local VLM judge (``vlm_judge_cp`` + ``vlm_judge_pf``): seconds per 1000 images.

Builds Qwen3-VL-8B-Instruct's architecture with random weights from its published config values
(``metrics.vlm_judge.QWEN3_VL_8B_TEXT`` / ``QWEN3_VL_8B_VISION``, from the model's config.json:
36 layers, hidden 4096, MLP 12288, 32 heads / 8 KV heads, vocabulary 151,936; vision tower 27
layers, hidden 1152, patch 16, merge 2, DeepStack at 8/16/24) directly on the GPU in bf16, no
download. It then judges N random 512-px images the way the metrics do (same conversations, the
same processor class with Qwen3-VL's published image-processor values, one call per batch):
concept preservation with 3 reference photos + the generated image, prompt following with the
image and a DreamBooth-style prompt.

What the numbers mean:
- Random weights answer noise and never stop early, so the answer length is fixed:
  ``min_new_tokens = max_new_tokens`` (16 for CP, 96 for PF), the metric's own budget. Real
  answers stop at the end token (CP ~4 tokens, PF ~30–60), so decoding time here is an upper bound.
- Qwen's tokenizer cannot be loaded offline; the text is tokenized by CLIP's 49k English BPE
  (built from open_clip's vocabulary, as ``methods/backbones.py`` does) plus Qwen's special tokens,
  a stand-in with a similar number of tokens per English word. The JSON gives the mean text and
  image tokens per prompt; the image tokens (256 per 512-px image) are exact.

Usage (from the repository root):
    python benchmarks/gpu_vlm_judge.py --out gpu_vlm_judge.json           # H200: ~3-4 min
    python benchmarks/gpu_vlm_judge.py --tiny --device cpu --n 4         # same code path, tiny dims
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.gpu_metrics import write_result  # noqa: E402
from metrics import vlm_judge  # noqa: E402
from metrics.base import VLM_JUDGE_MODEL, MetricSettings, ScoringInputs  # noqa: E402
from metrics.registry import build_metric  # noqa: E402

PROMPTS = ("a dog on the beach", "a dog in the jungle", "a dog with a city in the background",
           "a dog wearing a red hat", "a purple dog", "a cube shaped dog")
REFERENCES = 4  # a DreamBooth subject has 4-6 photos; the judge shows the first 3


def stand_in_tokenizer():
    """CLIP's BPE (49,408 tokens, offline) with Qwen's chat and vision tokens added."""
    from methods.backbones import build_clip_tokenizer

    tokenizer = vlm_judge.add_special_tokens(build_clip_tokenizer())
    tokenizer.model_max_length = 1_000_000
    tokenizer.padding_side = "left"
    return tokenizer


def build_judge(tiny: bool, device: torch.device, dtype: torch.dtype) -> vlm_judge.LoadedJudge:
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = stand_in_tokenizer()
    text, vision = (vlm_judge.TINY_TEXT, vlm_judge.TINY_VISION) if tiny else (
        vlm_judge.QWEN3_VL_8B_TEXT, vlm_judge.QWEN3_VL_8B_VISION)
    config = vlm_judge.qwen3_vl_config(tokenizer, text, vision)
    torch.manual_seed(0)
    with torch.device(device):  # allocated and initialized on the device, in the target dtype
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return vlm_judge.LoadedJudge(model, vlm_judge.judge_processor(tokenizer), device, dtype,
                                 {"source": "built", "weights_tag": "random-init (benchmark)"})


def subject_inputs(n: int, size: int, seed: int) -> ScoringInputs:
    generator = torch.Generator().manual_seed(seed)
    return ScoringInputs(
        images=torch.rand(n, 3, size, size, generator=generator),
        image_keys=[f"image-{i}" for i in range(n)],
        texts=[PROMPTS[i % len(PROMPTS)] for i in range(n)],
        references=[torch.rand(3, size, size, generator=generator) for _ in range(REFERENCES)],
        reference_key="subject",
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def token_counts(judge, conversations, images) -> dict:
    texts = [judge.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    batch = judge.processor(text=texts, images=images, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    image_tokens = (ids == judge.model.config.image_token_id) & mask
    return {"prompt_tokens_mean": round(float(mask.sum(1).float().mean()), 1),
            "image_tokens_mean": round(float(image_tokens.sum(1).float().mean()), 1),
            "text_tokens_mean": round(float((mask & ~image_tokens).sum(1).float().mean()), 1)}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "architecture": "Qwen3VLForConditionalGeneration, " + ("tiny dims (code-path check)" if args.tiny else
                        "Qwen3-VL-8B-Instruct published config"),
        "default_model": VLM_JUDGE_MODEL,
        "weights": "random init (cost only; answers are noise)",
        "dtype": str(dtype).removeprefix("torch."),
        "n_images": args.n, "image_size": args.size, "batch_size": args.batch_size,
        "answer_tokens": "forced: min_new_tokens = max_new_tokens (upper bound of a real answer's decoding)",
        "tokenizer": "CLIP 49k BPE + Qwen special tokens (stand-in for Qwen's tokenizer)",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    for package in ("transformers", "open_clip_torch"):
        try:
            result["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            result["versions"][package] = None
    t0 = time.perf_counter()
    judge = build_judge(args.tiny, device, dtype)
    synchronize(device)
    result["build_seconds"] = round(time.perf_counter() - t0, 2)
    result["parameters"] = sum(p.numel() for p in judge.model.parameters())
    print(f"built {result['parameters'] / 1e9:.2f} B parameters in {result['build_seconds']} s", flush=True)

    settings = MetricSettings(weights="random", device=args.device, batch_size=args.batch_size)
    inputs = subject_inputs(args.n, args.size, args.seed)
    warm = subject_inputs(min(args.batch_size, args.n), args.size, args.seed + 1)
    for name in ("vlm_judge_cp", "vlm_judge_pf"):
        metric = build_metric(name, settings)
        tokens = vlm_judge.MAX_NEW_TOKENS[metric.aspect]
        conversations, images = metric.conversations(inputs)
        warm_conversations, warm_images = metric.conversations(warm)
        judge.answer(warm_conversations, warm_images, tokens, args.batch_size, min_new_tokens=tokens)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        t0 = time.perf_counter()
        answers = judge.answer(conversations, images, tokens, args.batch_size, min_new_tokens=tokens)
        synchronize(device)
        seconds = time.perf_counter() - t0
        assert len(answers) == args.n
        entry = {
            "new_tokens_per_answer": tokens,
            "seconds": round(seconds, 2),
            "seconds_per_1000_images": round(seconds / args.n * 1000, 1),
            "images_per_second": round(args.n / seconds, 2),
            **token_counts(judge, conversations[: args.batch_size], images[: args.batch_size]),
            "cpu_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
        if device.type == "cuda":
            entry["gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            entry["gpu_max_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        result[name] = entry
        print(name, json.dumps(entry), flush=True)
    result["both_seconds_per_1000_images"] = round(
        result["vlm_judge_cp"]["seconds_per_1000_images"] + result["vlm_judge_pf"]["seconds_per_1000_images"], 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=640, help="images judged per aspect (default 640)")
    parser.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument("--batch-size", type=int, default=32, help="conversations per generate call (default 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions of the same architecture (code-path check)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_vlm_judge.json, else ./gpu_vlm_judge.json)")
    args = parser.parse_args(argv)
    write_result(run(args), args.out, "gpu_vlm_judge.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
