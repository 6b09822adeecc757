"""Published reference figures on the DreamBooth protocol, shown beside our rows, never mixed in.

These are the only numbers in ``reports/`` that do not come from a run directory. Each row
names its source; all are DINO / CLIP-I / CLIP-T on the DreamBooth dataset and protocol
(30 subjects × 25 prompts × 4 images = 3000 images), raw cosines. They are comparable to ours
only when our run uses the full protocol, a real backbone and pretrained metric weights.
"""

from __future__ import annotations

from dataclasses import dataclass

CITATIONS = {
    "dreambooth": (
        "N. Ruiz, Y. Li, V. Jampani, Y. Pritch, M. Rubinstein, K. Aberman. DreamBooth: Fine Tuning "
        "Text-to-Image Diffusion Models for Subject-Driven Generation. CVPR 2023 (arXiv:2208.12242), Table 1."
    ),
    "hifi_tuner": (
        "Z. Wang, W. Wei, Y. Zhao, Z. Xiao, M. Hasegawa-Johnson, H. Shi, T. Hou. HiFi Tuner: High-Fidelity "
        "Subject-Driven Fine-Tuning for Diffusion Models. arXiv:2312.00079, 2023 (DreamBooth-protocol table)."
    ),
    "unverified": (
        "Figure as listed in the project's DESIGN.md anchors for unpersonalized SD 1.4; the primary "
        "table it comes from has not been re-checked by the report's authors — treat with care."
    ),
}


@dataclass(frozen=True)
class Anchor:
    name: str
    dino: float | None
    clip_i: float | None
    clip_t: float | None
    source: str  # a key of CITATIONS

    def value(self, metric: str) -> float | None:
        return getattr(self, metric, None) if metric in ("dino", "clip_i", "clip_t") else None


PUBLISHED = (
    Anchor("Real images (reference set)", 0.774, 0.885, None, "dreambooth"),
    Anchor("Stable Diffusion 1.4, unpersonalized", 0.393, 0.706, 0.337, "unverified"),
    Anchor("Textual Inversion (Stable Diffusion)", 0.569, 0.780, 0.255, "dreambooth"),
    Anchor("DreamBooth (Stable Diffusion)", 0.668, 0.803, 0.305, "dreambooth"),
    Anchor("HiFi Tuner on Textual Inversion", 0.665, 0.807, 0.291, "hifi_tuner"),
    Anchor("HiFi Tuner on DreamBooth", 0.680, 0.809, 0.317, "hifi_tuner"),
)


def citation_numbers() -> dict[str, int]:
    """Footnote numbers in order of first use by PUBLISHED."""
    numbers: dict[str, int] = {}
    for anchor in PUBLISHED:
        numbers.setdefault(anchor.source, len(numbers) + 1)
    return numbers
