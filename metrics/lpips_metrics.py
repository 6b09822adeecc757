"""LPIPS distances and DIV (diversity among sibling images), on the ``lpips`` package's networks.

``lpips.LPIPS.forward(a, b)`` runs the trunk on both images of every pair; for DIV, a group of
n images has n(n-1)/2 pairs, so we run the trunk once per image and form the pairs from the
cached, unit-normalized features with the package's own linear heads — the same arithmetic as
its forward (tested against it), n trunk passes instead of n(n-1).

Inputs are [0, 1]; they are mapped to the [-1, 1] range LPIPS is calibrated for (the range
confusion behind torchmetrics #1214/#1296 cannot happen here: the conversion is internal and
asserted). Images are compared at their native resolution.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from metrics.backbones import LoadedBackbone, get_lpips
from metrics.base import BackboneMetric, MetricInputError, MetricSettings, ScoringInputs
from metrics.inputs import check_image_tensor, check_inputs
from metrics.preprocess import LPIPS_PREPROCESS, take_rows, to_lpips_range
from metrics.replay import run_forward

DIV_METRIC_VERSION = 1
MIN_SIDE = 32  # AlexNet's two stride-2 pools leave no pixel below 31 px (VGG: 16)
SINGLETON_NOTE = "div undefined: the image is alone in its group (DIV needs at least 2 siblings)"


def check_lpips_size(images: torch.Tensor, name: str) -> None:
    if min(images.shape[-2:]) < MIN_SIDE:
        raise MetricInputError(
            f"{name}: LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} px, got "
            f"{images.shape[-2]}x{images.shape[-1]}"
        )


def lpips_features(backbone: LoadedBackbone, images: torch.Tensor, checked: bool = False) -> list[torch.Tensor]:
    """Unit-normalized (over channels) trunk features of N×3×H×W images in [0, 1], float32.

    ``checked``: the caller has validated ``images`` (``check_image_tensor``), so the range check
    of ``to_lpips_range`` (which waits for the GPU) is skipped. The trunk is replayed as a CUDA
    graph when the backbone has ``replays`` (``metrics.cuda_graphs``)."""
    pixels = to_lpips_range(images.to(backbone.device, non_blocking=True), check=not checked)
    if backbone.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return run_forward(backbone.replays, "lpips trunk", lambda value: _trunk(backbone, value), pixels)


def _trunk(backbone: LoadedBackbone, pixels: torch.Tensor) -> list[torch.Tensor]:
    import lpips

    model = backbone.model
    with torch.inference_mode(), backbone.autocast():
        outputs = model.net.forward(model.scaling_layer(pixels))
    return [lpips.normalize_tensor(output.float()) for output in outputs]


def lpips_from_features(
    backbone: LoadedBackbone, first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]
) -> torch.Tensor:
    """LPIPS of feature pairs (row i of ``first`` with row i of ``second``): a float32 vector."""
    model = backbone.model
    total = None
    with torch.inference_mode():
        for layer, (a, b) in enumerate(zip(first, second)):
            value = model.lins[layer]((a - b) ** 2).float().mean(dim=(2, 3))
            total = value if total is None else total + value
    return total.flatten()


def lpips_distance(first: torch.Tensor, second: torch.Tensor, settings: MetricSettings) -> np.ndarray:
    """LPIPS between paired images (N×3×H×W each, [0, 1]): one distance per pair."""
    check_image_tensor(first, "first")
    check_image_tensor(second, "second")
    check_lpips_size(first, "first")
    if first.shape != second.shape:
        raise MetricInputError(
            f"second: expected the shape of first {tuple(first.shape)}, got {tuple(second.shape)}"
        )
    backbone = get_lpips(settings)
    out = []
    for start in range(0, first.shape[0], settings.batch_size):
        end = start + settings.batch_size
        a, b = lpips_features(backbone, first[start:end]), lpips_features(backbone, second[start:end])
        out.append(lpips_from_features(backbone, a, b).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def pairwise_lpips(backbone: LoadedBackbone, images: torch.Tensor, batch_size: int, checked: bool = False) -> torch.Tensor:
    """n×n symmetric matrix of LPIPS among ``images`` (zero diagonal)."""
    count = images.shape[0]
    features = [lpips_features(backbone, images[s : s + batch_size], checked) for s in range(0, count, batch_size)]
    layers = [torch.cat([chunk[layer] for chunk in features]) for layer in range(len(features[0]))]
    matrix = torch.zeros(count, count)
    rows, cols = torch.triu_indices(count, count, offset=1)
    for start in range(0, rows.numel(), batch_size):
        i, j = rows[start : start + batch_size], cols[start : start + batch_size]
        values = lpips_from_features(
            backbone, [layer[i.to(layer.device)] for layer in layers], [layer[j.to(layer.device)] for layer in layers]
        ).cpu()
        matrix[i, j] = values
        matrix[j, i] = values
    return matrix


def group_mean_lpips(backbone: LoadedBackbone, images: torch.Tensor, groups: Sequence[Sequence[int]],
                     batch_size: int, checked: bool = False) -> torch.Tensor:
    """Per image of ``groups`` (lists of row indices of ``images``, each of ≥ 2 rows): its mean
    LPIPS to the other images of its group; rows in no group are NaN.

    Groups are packed into chunks of at most ``batch_size`` images: one trunk pass per chunk and
    its pairs in batches of ``batch_size``, the sums kept on the device until the end (one copy
    to the host), instead of a trunk call, a pair call and a host sync per group; a chunk's pair
    indices cross to the device in one copy that does not wait for it. A group larger than
    ``batch_size`` goes through ``pairwise_lpips`` alone. Same arithmetic as ``pairwise_lpips``
    per group (tested against ``lpips.LPIPS.forward``). ``checked``: as in ``lpips_features``."""
    totals = torch.zeros(images.shape[0], dtype=torch.float32, device=backbone.device)
    counts = torch.zeros(images.shape[0], dtype=torch.float32)
    chunks: list[list[Sequence[int]]] = [[]]
    for group in groups:
        if len(group) > batch_size:
            matrix = pairwise_lpips(backbone, images[list(group)], batch_size, checked)
            totals[list(group)] = matrix.sum(dim=1).to(totals.device)
            counts[list(group)] = len(group) - 1
            continue
        if sum(len(g) for g in chunks[-1]) + len(group) > batch_size:
            chunks.append([])
        chunks[-1].append(group)
    for chunk in chunks:
        if not chunk:
            continue
        rows = [index for group in chunk for index in group]
        features = lpips_features(backbone, take_rows(images, rows), checked)
        first, second, start = [], [], 0  # pairs as positions in ``rows``, each group's as pairwise_lpips's
        for group in chunk:
            a, b = torch.triu_indices(len(group), len(group), offset=1)
            first.append(a + start)
            second.append(b + start)
            start += len(group)
        first_t, second_t = torch.cat(first), torch.cat(second)
        position_to_row = torch.tensor(rows)
        # rows 0-1: pair positions in the chunk's features; rows 2-3: the same pairs as rows of ``totals``
        pairs = torch.stack([first_t, second_t, position_to_row[first_t], position_to_row[second_t]])
        pairs = pairs.to(backbone.device, non_blocking=True)
        for begin in range(0, first_t.numel(), batch_size):
            i, j, row_i, row_j = pairs[:, begin : begin + batch_size]
            values = lpips_from_features(backbone, [f[i] for f in features], [f[j] for f in features])
            totals.index_add_(0, row_i, values)
            totals.index_add_(0, row_j, values)
        for group in chunk:
            counts[list(group)] = len(group) - 1
    means = totals.cpu() / counts
    return torch.where(counts > 0, means, torch.full_like(means, float("nan")))


class Div(BackboneMetric):
    name = "div"
    higher_is_better = True
    description = "diversity: mean pairwise LPIPS among images of the same subject and prompt"
    version = DIV_METRIC_VERSION
    needs_complete_groups = True  # an image's value depends on its siblings

    load_backbone = staticmethod(get_lpips)
    convention = (
        "per image: mean LPIPS to the other images of its group (inputs.groups), so the mean over "
        "a group's images is its mean pairwise LPIPS; an image alone in its group scores NaN with "
        "the reason in notes"
    )

    def preprocessing(self) -> dict:
        return dict(LPIPS_PREPROCESS)

    def score(self, inputs: ScoringInputs) -> np.ndarray:
        check_inputs(inputs, groups=True)
        count = inputs.images.shape[0]
        values = np.full(count, np.nan)
        self.notes = [""] * count
        if count == 0:
            return values
        check_lpips_size(inputs.images, "inputs.images")
        members: dict[str, list[int]] = defaultdict(list)
        for index, group in enumerate(inputs.groups):
            members[group].append(index)
        for indices in members.values():
            if len(indices) < 2:
                self.notes[indices[0]] = SINGLETON_NOTE
        groups = [indices for indices in members.values() if len(indices) >= 2]
        if groups:
            means = group_mean_lpips(self.backbone, inputs.images, groups, self.settings.batch_size,
                                     checked=True).double().numpy()  # check_inputs validated the images
            scored = [index for group in groups for index in group]
            values[scored] = means[scored]
        return values
