"""Issue 17 item 1: how many bytes the UNet's memory-bound kernels must move, counted on a CPU.

A compiled sampling UNet forward runs three kinds of kernels: library kernels (cuDNN convolutions,
cuBLAS matmuls, fused attention), which inductor calls as they are, and inductor's own fused Triton
kernels for everything between them (GroupNorm, SiLU, LayerNorm, GEGLU, residual adds, copies).
The library kernels' rates are measured by ``gpu_unet_kernels.py``; this script gives the other
part a floor to be compared with, from one forward's op log (``TorchDispatchMode``, real
``sd15-random`` architecture, one latent, fp32 on the CPU), scaled to ``--latents`` latents and
``--bytes-per-element`` (2: bf16):

- ``eager_gb``: every non-library op reads its inputs and writes its outputs (op-by-op traffic);
- ``fused_floor_gb``: the non-library ops between two library calls form one segment, fused
  perfectly: a segment reads each tensor made outside it once (per distinct view) and writes each
  tensor it makes that is used outside it (by a library call or a later segment) once; nothing
  else moves. Inductor cannot fuse across a library call, so no compiled forward of this graph
  moves fewer bytes in these kernels (weights and the graph's inputs left out: small);
  ``fused_floor_gb_by_segment_kind`` splits it by the set of ops a segment holds;
- ``norm_second_pass_gb``: one more read of every GroupNorm/LayerNorm input, for a norm whose
  statistics are computed in a pass of their own (inductor's split reductions do that).

``ms_at_tb_s`` divides them by a memory bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s by
specification; streaming kernels reach ~90 % of it). ``--profile-json`` puts a
``gpu_unet_kernels.py`` result's measured ``inductor_triton`` ms beside the floor (same latents).
CPU check (tiny, seconds): ``python benchmarks/unet_memory_traffic.py --backbone tiny --resolution 8``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_metrics import write_result  # noqa: E402
from methods.backbones import load_backbone, resolve_backbone  # noqa: E402

# aten ops a compiled forward hands to a library kernel (cuDNN, cuBLAS, fused attention)
LIBRARY_OPS = frozenset({
    "convolution", "mm", "addmm", "bmm", "baddbmm", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
})
NORM_OPS = frozenset({"native_group_norm", "native_layer_norm"})
NO_TRAFFIC_OPS = frozenset({"_unsafe_view", "alias", "detach"})  # views whose schema does not say so
BANDWIDTHS_TB_S = {"H100 SXM (3.35 TB/s)": 3.35, "H200 (4.8 TB/s)": 4.8}


def _key(tensor: torch.Tensor) -> tuple:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride())


class OpLog(TorchDispatchMode):
    """Every aten op of a forward, in order: name, whether it only makes a view, and the storage,
    view and element count of each tensor it reads and writes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        view = bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        name = func.overloadpacket.__name__
        tensors = lambda tree: [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]  # noqa: E731
        self.ops.append({
            "name": name,
            "view": view or name in NO_TRAFFIC_OPS,
            "reads": [(_key(t), t.numel()) for t in tensors((args, kwargs))],
            "writes": [(_key(t), t.numel()) for t in tensors(out)],
        })
        return out


def traffic(ops: list[dict]) -> dict:
    """Element counts (one latent) of the non-library ops: op by op, and the fused floor (module docstring)."""
    tensors: list[dict] = []  # per tensor written by an op: maker, its segment, size, readers
    by_storage: dict[int, int] = {}  # storage -> the tensor last written there
    segment, previous_library = 0, None
    eager, by_op = 0, Counter()
    segment_ops: dict[int, set] = defaultdict(set)
    for op in ops:
        if op["view"]:
            continue
        library = op["name"] in LIBRARY_OPS
        if previous_library and not library:
            segment += 1  # a new run of non-library ops after a library call
        previous_library = library
        if not library:
            segment_ops[segment].add(op["name"])
            moved = sum(n for _, n in op["reads"]) + sum(n for _, n in op["writes"])
            eager += moved
            by_op[op["name"]] += moved
        for key, numel in op["reads"]:
            index = by_storage.get(key[0])
            if index is None:
                continue  # a weight or an input of the graph
            record = tensors[index]
            if library:
                record["library_read"] = True
            else:
                record["views"][segment][key[1:]] = numel
                if op["name"] in NORM_OPS:
                    record["norm_read"] = max(record["norm_read"], numel)
        for key, numel in op["writes"]:
            by_storage[key[0]] = len(tensors)
            tensors.append({"library": library, "segment": segment, "numel": numel, "library_read": False,
                            "views": defaultdict(dict), "norm_read": 0})
    per_segment: Counter = Counter()  # floor elements by the segment that reads or writes them
    norm_second_pass = 0
    for record in tensors:
        reads = {s: min(sum(v.values()), record["numel"]) for s, v in record["views"].items()}
        if not record["library"]:
            reads.pop(record["segment"], None)  # made and used in one segment: stays on chip
            if record["library_read"] or reads:
                per_segment[record["segment"]] += record["numel"]  # written once
        for s, n in reads.items():
            per_segment[s] += n  # read once by each segment that uses it
        norm_second_pass += record["norm_read"]
    by_kind: Counter = Counter()
    for s, n in per_segment.items():
        by_kind["+".join(sorted(segment_ops[s]))] += n
    return {"segments": segment, "eager": eager, "fused_floor": sum(per_segment.values()),
            "norm_second_pass": norm_second_pass, "eager_by_op": dict(by_op.most_common()),
            "fused_floor_by_segment_kind": dict(by_kind.most_common())}


def unet_op_log(unet: torch.nn.Module, resolution: int) -> list[dict]:
    sample = torch.randn(1, unet.config.in_channels, resolution, resolution)
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), OpLog() as log:
        unet(sample, torch.tensor([500]), encoder_hidden_states=context)
    return log.ops


def run(args) -> dict:
    unet = load_backbone(resolve_backbone(args.backbone), "cpu", torch.float32).unet.eval()
    counts = traffic(unet_op_log(unet, args.resolution))
    scale = args.latents * args.bytes_per_element / 1e9
    gb = {name: round(counts[name] * scale, 2) for name in ("eager", "fused_floor", "norm_second_pass")}
    result = {
        "benchmark": "unet_memory_traffic",
        "settings": {"backbone": args.backbone, "latent_resolution": args.resolution, "latents": args.latents,
                     "bytes_per_element": args.bytes_per_element, "torch": torch.__version__},
        "library_ops": sorted(LIBRARY_OPS),
        "segments_per_forward": counts["segments"],
        "elements_per_latent": {name: counts[name] for name in ("eager", "fused_floor", "norm_second_pass")},
        "eager_gb": gb["eager"],
        "fused_floor_gb": gb["fused_floor"],
        "norm_second_pass_gb": gb["norm_second_pass"],
        "eager_gb_by_op": {name: round(n * scale, 2) for name, n in counts["eager_by_op"].items()},
        "fused_floor_gb_by_segment_kind": {kind: round(n * scale, 2) for kind, n in counts["fused_floor_by_segment_kind"].items()},
        "ms_at_tb_s": {
            device: {"fused_floor": round(gb["fused_floor"] / bandwidth, 2),
                     "fused_floor_two_pass_norms": round((gb["fused_floor"] + gb["norm_second_pass"]) / bandwidth, 2),
                     "eager": round(gb["eager"] / bandwidth, 2)}
            for device, bandwidth in BANDWIDTHS_TB_S.items()},
    }
    if args.profile_json:
        measured = json.loads(Path(args.profile_json).read_text())
        arm = measured["arms"][args.profile_arm]
        latents = measured["settings"]["latents_per_forward"]
        if latents != args.latents:
            raise SystemExit(f"{args.profile_json} timed {latents} latents per forward; run with --latents {latents}")
        result["measured"] = {"file": Path(args.profile_json).name, "arm": args.profile_arm, "gpu": measured["environment"].get("gpu"),
                              "ms_per_forward": arm["ms_per_forward"], "ms_by_kind": arm["kernels"]["ms_by_kind"]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--latents", type=int, default=64, help="latents per forward (32 images x CFG)")
    parser.add_argument("--bytes-per-element", type=int, default=2, help="2 = bf16")
    parser.add_argument("--profile-json", help="a gpu_unet_kernels.py result to put beside the floor")
    parser.add_argument("--profile-arm", default="compiled")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "unet_memory_traffic.json"))
    args = parser.parse_args(argv)
    write_result(run(args), args.out, "unet_memory_traffic.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
