"""Image embeddings of CLIP and DINO, computed once: per process in memory, across runs on disk.

A store is named by the backbone's key (fingerprint with weights sha256, precision, and the
input pipeline), so an embedding can never be read back for another backbone or preprocessing;
inside a store, rows are keyed by the harness's image key, which must change whenever the
pixels do (the harness uses the run-unit key). On disk a store is a folder of safetensors
shards under ``<cache_dir>/embeddings/<store key>/``: each ``score`` call that computed
something writes one new shard (temp file + ``os.replace``), so concurrent processes never
write the same file and a killed process leaves no half-written shard behind.

Reference embeddings (a subject's real images) are kept in memory per ``reference_key``; text
embeddings per text.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.common import atomic_write_bytes, atomic_write_json
from metrics.backbones import LoadedBackbone
from metrics.preprocess import take_rows
from metrics.replay import run_forward

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".safetensors"


class EmbeddingStore:
    """Embeddings of one backbone + pipeline keyed by image key; optionally persisted."""

    def __init__(self, key: str, folder: Path | None, description: dict | None = None) -> None:
        self.key = key
        self.folder = folder
        self.description = description or {}
        self._rows: dict[str, np.ndarray] = {}
        self._loaded_shards: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def _scan_disk(self) -> None:
        if self.folder is None or not self.folder.is_dir():
            return
        from safetensors import safe_open

        for path in sorted(self.folder.glob(f"*{SHARD_SUFFIX}")):
            if path.name in self._loaded_shards:
                continue
            try:
                with safe_open(str(path), framework="np") as shard:
                    keys = json.loads(shard.metadata()["keys"])
                    rows = shard.get_tensor("embeddings")
            except Exception as error:  # noqa: BLE001 - an unreadable shard is recomputed, not fatal
                log.warning("embedding cache: ignoring unreadable shard %s (%s)", path, error)
                self._loaded_shards.add(path.name)
                continue
            for key, row in zip(keys, rows):
                self._rows.setdefault(key, row)
            self._loaded_shards.add(path.name)

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored rows among ``keys`` (reading shards other processes wrote meanwhile)."""
        with self._lock:
            if any(key not in self._rows for key in keys):
                self._scan_disk()
            return {key: self._rows[key] for key in keys if key in self._rows}

    def add(self, keys: Sequence[str], rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        with self._lock:
            for key, row in zip(keys, rows):
                self._rows[key] = row
            if self.folder is not None and len(keys):
                self._write_shard(list(keys), rows)

    def _write_shard(self, keys: list[str], rows: np.ndarray) -> None:
        from safetensors.numpy import save

        description = self.folder / "backbone.json"
        if not description.is_file():
            atomic_write_json(description, self.description)
        name = f"{os.getpid()}-{uuid.uuid4().hex}{SHARD_SUFFIX}"
        atomic_write_bytes(self.folder / name, save({"embeddings": rows}, metadata={"keys": json.dumps(keys)}))
        self._loaded_shards.add(name)


_STORES: dict[tuple[str, str], EmbeddingStore] = {}
_REFERENCES: dict[tuple[str, str], torch.Tensor] = {}
_TEXTS: dict[str, dict[str, torch.Tensor]] = {}
_LOCK = threading.Lock()


def embedding_store(backbone: LoadedBackbone, cache_dir: Path | None) -> EmbeddingStore:
    """The process-wide store of ``backbone`` (+ its pipeline) for ``cache_dir`` (None: memory only)."""
    pipeline = backbone.pipeline.describe() if backbone.pipeline else None
    key = backbone.key(pipeline)
    folder = Path(cache_dir) / "embeddings" / key if cache_dir is not None else None
    with _LOCK:
        index = (key, str(folder))
        if index not in _STORES:
            description = {"backbone": backbone.fingerprint(), "pipeline": pipeline}
            _STORES[index] = EmbeddingStore(key, folder, description)
        return _STORES[index]


def clear_embedding_caches() -> None:
    """Forget every in-memory embedding (the disk shards stay)."""
    with _LOCK:
        _STORES.clear()
        _REFERENCES.clear()
        _TEXTS.clear()


def encode_batch(backbone: LoadedBackbone, images: torch.Tensor, to_host: bool = True) -> torch.Tensor:
    """L2-normalized float32 embeddings (on the CPU, or left on the device: ``to_host=False``) of
    N×3×H×W images in [0, 1]. The model's part (after the input pipeline) is replayed as a CUDA
    graph when the backbone has ``replays`` (``metrics.cuda_graphs``)."""
    pixels = backbone.pipeline(images.to(backbone.device, non_blocking=True))
    if backbone.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    rows = run_forward(backbone.replays, "encode", lambda value: _encode(backbone, value), pixels)
    return rows.cpu() if to_host else rows


def _encode(backbone: LoadedBackbone, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode(), backbone.autocast():
        features = backbone.encode_image(pixels)
    return F.normalize(features.float(), dim=-1)


def image_embeddings(
    backbone: LoadedBackbone,
    images: torch.Tensor,
    keys: Sequence[str],
    batch_size: int,
    cache_dir: Path | None,
) -> torch.Tensor:
    """N×D normalized embeddings of ``images``; only those not cached under ``keys`` are computed.

    The chunks' embeddings stay on the device until the last one is done (one copy to the host
    per call instead of one per chunk: each copy waits for every queued kernel); chunks of
    consecutive rows are slices of ``images``, not copies gathered by an index."""
    store = embedding_store(backbone, cache_dir)
    known = store.lookup(keys)
    missing = [index for index, key in enumerate(keys) if key not in known]
    chunks = []
    for start in range(0, len(missing), batch_size):
        chunks.append(encode_batch(backbone, take_rows(images, missing[start : start + batch_size]), to_host=False))
    computed: dict[str, np.ndarray] = {}
    if chunks:
        computed = dict(zip((keys[i] for i in missing), torch.cat(chunks).cpu().numpy()))
        store.add(list(computed), np.stack(list(computed.values())))
    known.update(computed)
    if not keys:
        return torch.zeros(0, 0)
    return torch.from_numpy(np.stack([known[key] for key in keys]))


def reference_embeddings(
    backbone: LoadedBackbone, references: Sequence[torch.Tensor], reference_key: str
) -> torch.Tensor:
    """R×D normalized embeddings of a subject's real images, computed once per reference_key."""
    index = (backbone.key(backbone.pipeline.describe()), reference_key)
    with _LOCK:
        cached = _REFERENCES.get(index)
    if cached is not None and cached.shape[0] == len(references):
        return cached
    # References come in their own sizes: those of one size are encoded as one batch (the
    # pipeline resizes per batch), then put back in the given order.
    by_size: dict[tuple, list[int]] = {}
    for position, reference in enumerate(references):
        by_size.setdefault(tuple(reference.shape), []).append(position)
    rows_at: dict[int, torch.Tensor] = {}
    for indices in by_size.values():
        encoded = encode_batch(backbone, torch.stack([references[i] for i in indices]))
        rows_at.update(zip(indices, encoded))
    rows = torch.stack([rows_at[i] for i in range(len(references))]) if references else torch.zeros(0, 0)
    with _LOCK:
        _REFERENCES[index] = rows
    return rows


def text_store(backbone: LoadedBackbone) -> dict[str, torch.Tensor]:
    """The process-wide text -> normalized embedding map of ``backbone`` (texts repeat per prompt)."""
    with _LOCK:
        return _TEXTS.setdefault(backbone.key(None), {})
