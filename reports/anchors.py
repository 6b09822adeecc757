"""Published reference figures on the DreamBooth protocol, shown beside our rows, never mixed in.

These are the only numbers in ``reports/`` that do not come from a run directory. Each row
names its source (paper and table) and the metric convention its figures use (``CONVENTIONS``);
all are DINO / CLIP-I / CLIP-T on the DreamBooth dataset and protocol (30 subjects × 25 prompts
× 4 images = 3000 images), raw cosines. They are comparable to ours only when our run uses the
full protocol, a real backbone and pretrained metric weights. A figure that has not been checked
against its paper here says so in its source.
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
        "Subject-Driven Fine-Tuning for Diffusion Models. arXiv:2312.00079, 2023, Table 1."
    ),
    "hifi_tuner_sd14": (
        "Z. Wang et al. HiFi Tuner (arXiv:2312.00079), Table 1, unpersonalized Stable Diffusion 1.4 row; "
        "figure as cited in issue 15 — our notes of the paper do not list this row, so it has not been "
        "re-checked against the table here."
    ),
    "custom_diffusion_issue15": (
        "N. Kumari, B. Zhang, R. Zhang, E. Shechtman, J.-Y. Zhu. Multi-Concept Customization of "
        "Text-to-Image Diffusion (Custom Diffusion). CVPR 2023 (arXiv:2212.04488). Figure as quoted in "
        "issue 15; neither it nor the table it comes from has been checked against the paper here "
        "(no network access) — treat with care."
    ),
    "blip_diffusion": (
        "D. Li, J. Li, S. C. H. Hoi. BLIP-Diffusion: Pre-trained Subject Representation for Controllable "
        "Text-to-Image Generation and Editing. NeurIPS 2023 (arXiv:2305.14720), Table 1, zero-shot row. The "
        "primary table was not read here; the figures are those quoted identically, and attributed to it, by "
        "summaries of Subject-Diffusion (arXiv:2307.11410) Table 1 and Kosmos-G (arXiv:2310.02992), and by "
        "DreamCache (arXiv:2411.17786) Table 2 — not checked against the paper here."
    ),
    "ip_adapter_issue13": (
        "H. Ye, J. Zhang, S. Liu, X. Han, W. Yang. IP-Adapter: Text Compatible Image Prompt Adapter for "
        "Text-to-Image Diffusion Models. arXiv:2308.06721, 2023. Re-run figure for IP-Adapter on SD 1.5 as "
        "quoted in issue 13; the paper and table it comes from were not found with the search tools available "
        "here, so it is not checked against the paper here — treat with care."
    ),
    "ip_adapter_dreamcache": (
        "E. Aiello et al. DreamCache: Finetuning-Free Lightweight Personalized Image Generation via Feature "
        "Caching. arXiv:2411.17786, 2024, Table 2 (quantitative results on DreamBooth), IP-Adapter SD 1.5 row, "
        "one reference image; read from a third-party rendering of the paper's arXiv HTML tables, not the PDF. A "
        "summary of Subject-Diffusion (arXiv:2307.11410) Table 1 lists the same figures."
    ),
}

DREAMBOOTH_CONVENTION = (
    "DreamBooth protocol: DINO ViT-S/16 and CLIP-I mean pairwise cosine to the subject's real "
    "images, CLIP-T cosine to the prompt without the identifier; CLIP ViT-B/32 (the paper does "
    "not name the CLIP variant; ViT-B/32 is what the Textual Inversion and Custom Diffusion code use)"
)
CONVENTIONS = {
    "dreambooth": DREAMBOOTH_CONVENTION,
    "hifi_tuner": DREAMBOOTH_CONVENTION + "; HiFi Tuner compares against DreamBooth's Table 1 rows",
    "hifi_tuner_sd14": DREAMBOOTH_CONVENTION + " (as for HiFi Tuner's other Table 1 rows)",
    "custom_diffusion_issue15": "stated by issue 15 to be on the DreamBooth protocol ("
    + DREAMBOOTH_CONVENTION.removeprefix("DreamBooth protocol: ") + "); not verified here",
    "blip_diffusion": DREAMBOOTH_CONVENTION + "; zero-shot: one model for all subjects, no per-subject "
    "training; images per prompt and the CLIP variant of this table not verified here",
    "ip_adapter_issue13": "stated by issue 13 to be on the DreamBooth protocol ("
    + DREAMBOOTH_CONVENTION.removeprefix("DreamBooth protocol: ") + "); zero-shot; not verified here",
    "ip_adapter_dreamcache": DREAMBOOTH_CONVENTION + "; zero-shot, one reference image per subject; whether "
    "DreamCache re-ran IP-Adapter, and at which scale, not verified here",
}


@dataclass(frozen=True)
class Anchor:
    name: str
    dino: float | None
    clip_i: float | None
    clip_t: float | None
    source: str  # a key of CITATIONS and CONVENTIONS

    @property
    def convention(self) -> str:
        return CONVENTIONS[self.source]

    def value(self, metric: str) -> float | None:
        return getattr(self, metric, None) if metric in ("dino", "clip_i", "clip_t") else None


PUBLISHED = (
    Anchor("Real images (reference set)", 0.774, 0.885, None, "dreambooth"),
    Anchor("Stable Diffusion 1.4, unpersonalized", 0.393, 0.706, 0.337, "hifi_tuner_sd14"),
    Anchor("Textual Inversion (Stable Diffusion)", 0.569, 0.780, 0.255, "dreambooth"),
    Anchor("DreamBooth (Imagen)", 0.696, 0.812, 0.306, "dreambooth"),
    Anchor("DreamBooth (Stable Diffusion)", 0.668, 0.803, 0.305, "dreambooth"),
    Anchor("Custom Diffusion", 0.643, 0.790, 0.305, "custom_diffusion_issue15"),
    Anchor("HiFi Tuner on Textual Inversion", 0.665, 0.807, 0.291, "hifi_tuner"),
    Anchor("HiFi Tuner on DreamBooth", 0.680, 0.809, 0.317, "hifi_tuner"),
    Anchor("BLIP-Diffusion, zero-shot", 0.594, 0.779, 0.300, "blip_diffusion"),
    Anchor("IP-Adapter SD 1.5 (re-run quoted in issue 13)", 0.629, 0.827, 0.264, "ip_adapter_issue13"),
    Anchor("IP-Adapter SD 1.5 (DreamCache's table)", 0.667, 0.813, 0.289, "ip_adapter_dreamcache"),
)


def citation_numbers() -> dict[str, int]:
    """Footnote numbers in order of first use by PUBLISHED."""
    numbers: dict[str, int] = {}
    for anchor in PUBLISHED:
        numbers.setdefault(anchor.source, len(numbers) + 1)
    return numbers


def reference(key: str) -> str:
    """One line of the leaderboard's source list: the citation, then the convention it uses."""
    return f"{CITATIONS[key]} Convention: {CONVENTIONS[key]}."
