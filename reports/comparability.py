"""When two result sets may be ranked together: their protocol and metric signatures.

Two runs (or bundles) are comparable when they evaluated the same thing the same way:
  protocol  dataset checksums (subject -> data_sha), the prompt templates per subject kind,
            images per prompt, prior images, identifier, the seed rule (protocol seed and a hash
            of every (subject, role, template, k, seed) unit), sampler and resolution;
  metrics   the fingerprint hash of every metric scored (backbone weights and their sha256,
            preprocessing, convention, version).
Both signatures come from the plan and ``scores/current.json`` of the run, so a bundle and the
run directory it was exported from have the same signatures.
"""

from __future__ import annotations

import json

import pandas as pd

from benchmark.hashing import stable_hash
from reports.rundata import RunData

PROTOCOL_FIELDS = ("dataset", "prompts", "images_per_prompt", "prior_images", "identifier", "seed_rule", "sampler", "resolution")


def protocol_signature(run: RunData) -> dict:
    """What the protocol of ``run`` is, as plain JSON values (see the module docstring)."""
    protocol = run.config.get("protocol") or {}
    plan = run.plan
    if plan.empty:
        dataset, prompts, units = {}, {}, []
    else:
        dataset = {s: str(d) for s, d in plan.drop_duplicates("subject")[["subject", "data_sha"]].itertuples(index=False)}
        evaluated = plan[plan["role"] == "eval"]
        prompts = {kind: sorted(set(frame["template"])) for kind, frame in evaluated.groupby("kind")}
        units = sorted({(s, r, t, int(k), int(seed)) for s, r, t, k, seed in
                        plan[["subject", "role", "template", "k", "seed"]].itertuples(index=False)})
    return {
        "dataset": dict(sorted(dataset.items())),
        "prompts": prompts,
        "images_per_prompt": protocol.get("images_per_prompt"),
        "prior_images": protocol.get("prior_images"),
        "identifier": protocol.get("identifier"),
        "seed_rule": {"protocol_seed": protocol.get("seed"), "units": stable_hash(units)},
        "sampler": protocol.get("sampler"),
        "resolution": protocol.get("resolution"),
    }


def metric_signature(run: RunData) -> dict[str, str]:
    """metric -> fingerprint hash of the scores behind the numbers."""
    return {metric: str(info.get("hash")) for metric, info in sorted(run.fingerprints.items())}


def signature_key(protocol: dict, metrics: dict) -> str:
    return stable_hash({"protocol": protocol, "metrics": metrics})


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _dataset_difference(mine: dict, theirs: dict) -> str:
    only_mine, only_theirs = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    changed = sorted(s for s in set(mine) & set(theirs) if mine[s] != theirs[s])
    parts = []
    if only_mine:
        parts.append(f"subjects only here: {', '.join(only_mine)}")
    if only_theirs:
        parts.append(f"subjects missing here: {', '.join(only_theirs)}")
    if changed:
        parts.append(f"other image checksums (data_sha) for {', '.join(changed)}")
    return "dataset differs (" + "; ".join(parts) + ")"


def _prompt_difference(mine: dict, theirs: dict) -> str:
    parts = []
    for kind in sorted(set(mine) | set(theirs)):
        a, b = set(mine.get(kind, [])), set(theirs.get(kind, []))
        if a != b:
            extra, missing = sorted(a - b), sorted(b - a)
            detail = []
            if extra:
                detail.append(f"{len(extra)} of its {len(a)} templates are not in the reference, e.g. {extra[0]!r}")
            if missing:
                detail.append(f"{len(missing)} of the reference's {len(b)} are missing, e.g. {missing[0]!r}")
            parts.append(f"{kind}: {'; '.join(detail)}")
    return "prompts differ (" + "; ".join(parts) + ")"


def _metric_fields(fingerprint: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in (fingerprint or {}).items():
        if isinstance(value, dict):
            flat.update(_metric_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def metric_differences(mine: RunData, theirs: RunData) -> list[str]:
    """One line per metric whose fingerprint differs, naming the fields that differ."""
    lines = []
    for metric in sorted(set(mine.fingerprints) | set(theirs.fingerprints)):
        if metric not in theirs.fingerprints:
            lines.append(f"metric {metric} is scored here but not in the reference")
        elif metric not in mine.fingerprints:
            lines.append(f"metric {metric} is not scored here")
        elif mine.fingerprints[metric].get("hash") != theirs.fingerprints[metric].get("hash"):
            a = _metric_fields(mine.fingerprints[metric].get("fingerprint"))
            b = _metric_fields(theirs.fingerprints[metric].get("fingerprint"))
            fields = [f"{k}: {_short(a.get(k))} vs {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            lines.append(f"metric {metric} fingerprint differs ({'; '.join(fields) or 'hash only'})")
    return lines


def differences(mine: RunData, theirs: RunData) -> list[str]:
    """Why ``mine`` cannot be ranked with ``theirs``: one readable line per difference (empty when comparable)."""
    a, b = protocol_signature(mine), protocol_signature(theirs)
    lines = []
    for name in PROTOCOL_FIELDS:
        if a[name] == b[name]:
            continue
        if name == "dataset":
            lines.append(_dataset_difference(a[name], b[name]))
        elif name == "prompts":
            lines.append(_prompt_difference(a[name], b[name]))
        elif name == "seed_rule" and a[name]["protocol_seed"] == b[name]["protocol_seed"]:
            # Other prompts or subjects make other units, hence other seeds: already said above.
            if not lines:
                lines.append("seeds differ (same protocol seed, other per-image seeds: the seed rule changed)")
        else:
            lines.append(f"{name.replace('_', ' ')}: {_short(a[name])} vs {_short(b[name])}")
    return lines + metric_differences(mine, theirs)


def entry_fingerprints(images: pd.DataFrame) -> dict[str, str]:
    """cell_id -> the method fingerprint hash(es) of its images, joined (identifies a submission)."""
    if images.empty or "method_fingerprint" not in images:
        return {}
    return {cell: "+".join(sorted(set(frame["method_fingerprint"].dropna().astype(str)))) for cell, frame in images.groupby("cell_id")}
