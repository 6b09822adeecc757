"""Backbone input pipelines on tensors, step for step those of each backbone's reference code.

The references work on PIL images (torchvision ``Resize`` + ``CenterCrop`` + ``Normalize``); we
work on float tensors already on the scoring device so that a GPU batch never leaves it. The
differences that remain are documented and bounded by tests: PIL resamples uint8 with its own
fixed-point bicubic (a = -0.5) and rounds the output; torch's antialiased bicubic uses the same
kernel in float, and we clamp to [0, 1] as PIL's uint8 output saturates.

- CLIP (open_clip ``image_transform``, OpenAI weights): shortest side to 224, bicubic with
  antialias, center crop 224, OpenAI mean/std.
- DINO (timm ``pretrained_cfg`` of ``vit_small_patch16_224.dino``: crop_pct 0.9, crop_mode
  center, bicubic): shortest side to floor(224 / 0.9) = 248, center crop 224, ImageNet mean/std.
- DINO ViT-S/8 and DINOv2 ViT-S/14 "crop" (DreamBench++'s code: torchvision ``Resize(256)`` +
  ``CenterCrop(224)``, and the ``facebook/dinov2-small`` image processor: shortest edge 256, crop
  224; timm's default crop_pct 0.875): shortest side to 256, center crop 224, ImageNet mean/std.
- "squash" (any ViT metric variant): the whole image resized to 224 × 224 (aspect ratio not
  kept, nothing cropped), bicubic with antialias, the model's mean/std; torchvision
  ``Resize((224, 224))``.
- LPIPS: no resize; [0, 1] is mapped to [-1, 1], the range the ``lpips`` networks expect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after torchvision ``Resize(size)`` (shortest side to ``size``, ratio kept)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop_offsets(height: int, width: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision ``CenterCrop(crop)`` (which rounds half to even)."""
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as 1×3×1×1 float32 tensors on ``device``, made once per device: a tensor made
    from a Python list on a GPU is a host-to-device copy that waits for every queued kernel, and
    these were made twice per batch. Never modified in place (the arithmetic reads them)."""
    key = (mean, std, str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (torch.tensor(mean, device=device).view(1, 3, 1, 1),
                           torch.tensor(std, device=device).view(1, 3, 1, 1))
    return _CONSTANTS[key]


@dataclass(frozen=True)
class ResizeCropNormalize:
    """Resize the shortest side, center crop, normalize: one backbone's reference input pipeline."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reference: str  # where the numbers come from

    def describe(self) -> dict:
        return {
            "resize": f"shortest side to {self.resize}, bicubic, antialias, clamp to [0, 1]",
            "crop": f"center {self.crop}x{self.crop}",
            "mean": list(self.mean),
            "std": list(self.std),
            "input_range": [0.0, 1.0],
            "reference": self.reference,
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×H×W float in [0, 1] (any device) to the normalized N×3×crop×crop model input."""
        images = images.float()
        height, width = images.shape[-2:]
        new_height, new_width = shortest_side_size(height, width, self.resize)
        if (new_height, new_width) != (height, width):
            images = F.interpolate(
                images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        top, left = center_crop_offsets(new_height, new_width, self.crop)
        images = images[..., top : top + self.crop, left : left + self.crop]
        mean, std = _constants(self.mean, self.std, images.device)
        return (images - mean) / std


@dataclass(frozen=True)
class SquashNormalize:
    """Resize the whole image to size × size (aspect ratio not kept), normalize: the "squash" input."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reference: str

    def describe(self) -> dict:
        return {
            "resize": f"whole image to {self.size}x{self.size} (aspect ratio not kept), bicubic, antialias, clamp to [0, 1]",
            "crop": "none",
            "mean": list(self.mean),
            "std": list(self.std),
            "input_range": [0.0, 1.0],
            "reference": self.reference,
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """N×3×H×W float in [0, 1] (any device) to the normalized N×3×size×size model input."""
        images = images.float()
        if tuple(images.shape[-2:]) != (self.size, self.size):
            images = F.interpolate(
                images, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        mean, std = _constants(self.mean, self.std, images.device)
        return (images - mean) / std


CLIP_PREPROCESS = ResizeCropNormalize(
    resize=224,
    crop=224,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    reference="open_clip image_transform(224, is_train=False, resize_mode='shortest')",
)

DINO_CROP_PCT = 0.9  # timm pretrained_cfg of vit_small_patch16_224.dino
DINO_PREPROCESS = ResizeCropNormalize(
    resize=math.floor(224 / DINO_CROP_PCT),
    crop=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    reference="timm create_transform(resolve_data_config(vit_small_patch16_224.dino)): crop_pct 0.9",
)


TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.DEFAULT_CROP_PCT; 224 / 0.875 = 256
DREAMBENCH_PLUS_CROP = ResizeCropNormalize(
    resize=math.floor(224 / TIMM_DEFAULT_CROP_PCT),
    crop=224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    reference="torchvision Resize(256, bicubic) + CenterCrop(224) (DreamBench++ dino_score.py; "
    "facebook/dinov2-small image processor; timm crop_pct 0.875)",
)
IMAGENET_SQUASH = SquashNormalize(
    size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, reference="torchvision Resize((224, 224), bicubic)"
)


def take_rows(images: torch.Tensor, rows) -> torch.Tensor:
    """``images[rows]``: a slice (no copy) when the rows are consecutive and ascending, else
    gathered by an index that crosses to the device without waiting for it."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return images[rows[0] : rows[0] + len(rows)]
    return images.index_select(0, torch.tensor(rows, dtype=torch.long).to(images.device, non_blocking=True))


def to_lpips_range(images: torch.Tensor, check: bool = True) -> torch.Tensor:
    """[0, 1] images to the [-1, 1] range the ``lpips`` networks are calibrated for.

    ``check`` asserts the range (a pass over the pixels that waits for the GPU); a caller whose
    images were validated in [0, 1] skips it: 2x - 1 of a float32 x in [0, 1] lies in [-1, 1]."""
    scaled = images.float() * 2.0 - 1.0
    if check:
        low, high = (float(v) for v in torch.aminmax(scaled))
        assert low >= -1.0 and high <= 1.0, f"LPIPS input outside [-1, 1]: [{low}, {high}]"
    return scaled


LPIPS_PREPROCESS = {
    "resize": "none (native resolution)",
    "input_range": [0.0, 1.0],
    "network_range": [-1.0, 1.0],
    "scaling": "2x - 1, then lpips ScalingLayer",
}
