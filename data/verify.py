"""Dataset verification: per-subject found / missing / corrupt / checksum-mismatch / extra files.

``verify_dataset`` checks a DreamBooth copy against the sha256 manifest; ``verify_custom`` checks
a user's dataset (subject table, folders, every image decodes). Both collect every problem
instead of stopping at the first, and return a report that prints as text or JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from data.errors import DatasetError
from data.images import IMAGE_SUFFIXES, ImageLoadError, open_image
from data.manifest import file_sha256, manifest_subjects, shipped_manifest
from data.subjects import read_subject_table, validate_subject_row

# Files a DreamBooth copy may hold beside the manifest's: its documentation and our marker.
KNOWN_EXTRA_FILES = frozenset(
    {"references_and_licenses.txt", "LICENSE.md", "LICENSE", "PROVENANCE.md", "README.md",
     "SHA256SUMS"}
)
# Derived data that tools keep beside a copy (subject masks): noted, never checked or failed.
DERIVED_DIRS = ("masks",)


@dataclass
class SubjectReport:
    """What was found for one subject; file entries are paths relative to the dataset root."""

    id: str
    expected: int
    found: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[dict] = field(default_factory=list)  # {"file", "reason"}
    mismatched: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # subject-level: no folder, bad kind...
    notes: list[str] = field(default_factory=list)  # informational, not failures

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.mismatched or self.extra or self.problems)


@dataclass
class VerifyReport:
    """The outcome of verifying one dataset folder."""

    root: str
    kind: str  # "dreambooth" | "custom"
    subjects: list[SubjectReport] = field(default_factory=list)
    other: list[SubjectReport] = field(default_factory=list)  # non-subject manifest files
    extra: list[str] = field(default_factory=list)  # unexpected files outside subject folders
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        groups = [*self.subjects, *self.other]
        return not self.problems and not self.extra and all(g.ok for g in groups)

    def totals(self) -> dict[str, int]:
        groups = [*self.subjects, *self.other]
        return {
            "subjects": len(self.subjects),
            "images_expected": sum(s.expected for s in self.subjects),
            "images_found": sum(s.found for s in self.subjects),
            "missing": sum(len(g.missing) for g in groups),
            "corrupt": sum(len(g.corrupt) for g in groups),
            "checksum_mismatches": sum(len(g.mismatched) for g in groups),
            "extra_files": len(self.extra) + sum(len(g.extra) for g in groups),
            "problems": len(self.problems) + sum(len(g.problems) for g in groups),
        }

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "kind": self.kind,
            "ok": self.ok,
            "totals": self.totals(),
            "subjects": [asdict(s) | {"ok": s.ok} for s in self.subjects],
            "other_files": [asdict(s) | {"ok": s.ok} for s in self.other],
            "extra_files": list(self.extra),
            "problems": list(self.problems),
            "notes": list(self.notes),
        }

    def format_text(self) -> str:
        lines = [f"{'DreamBooth' if self.kind == 'dreambooth' else 'custom'} dataset at {self.root}"]
        lines.extend(f"  problem: {p}" for p in self.problems)
        if self.subjects:
            lines.append(f"  {'subject':22s} {'images':>9s} {'missing':>8s} {'corrupt':>8s} "
                         f"{'mismatch':>9s} {'extra':>6s}  status")
        for s in self.subjects:
            images = f"{s.found}/{s.expected}"
            lines.append(f"  {s.id:22s} {images:>9s} {len(s.missing):>8d} {len(s.corrupt):>8d} "
                         f"{len(s.mismatched):>9d} {len(s.extra):>6d}  {'OK' if s.ok else 'BAD'}")
            lines.extend(_details(s))
        for s in self.other:
            state = "OK" if s.ok else "BAD"
            lines.append(f"  {s.id}: {state}")
            lines.extend(_details(s))
        lines.extend(f"    extra: {name} (not part of the dataset; remove it)" for name in self.extra)
        lines.extend(f"  note: {note}" for note in self.notes)
        t = self.totals()
        verdict = "OK" if self.ok else "FAILED"
        if self.kind != "dreambooth":
            checks = "no checksums (custom dataset)"
        elif t["checksum_mismatches"]:
            checks = f"{t['checksum_mismatches']} checksum mismatches"
        else:
            checks = "all checksums OK"
        lines.append(
            f"total: {t['subjects']} subjects, {t['images_found']}/{t['images_expected']} images, "
            f"{t['missing']} missing, {t['corrupt']} corrupt, {checks}, "
            f"{t['extra_files']} unexpected files, {t['problems']} other problems: {verdict}"
        )
        return "\n".join(lines)


def _details(report: SubjectReport) -> list[str]:
    lines = [f"    problem: {p}" for p in report.problems]
    lines += [f"    missing: {name}" for name in report.missing]
    lines += [f"    corrupt: {c['file']} ({c['reason']})" for c in report.corrupt]
    lines += [f"    checksum mismatch: {name}" for name in report.mismatched]
    lines += [f"    extra: {name} (not part of the dataset; remove it)" for name in report.extra]
    lines += [f"    note: {n}" for n in report.notes]
    return lines


def _decode_problem(path: Path) -> str | None:
    try:
        open_image(path)
    except ImageLoadError as error:
        # The loader's message starts with the path; the report already names the file.
        return str(error).split(": ", 1)[-1]
    return None


def _listing(root: Path) -> list[str]:
    """Every non-hidden file below ``root`` as a relative POSIX path (symlinks listed, not followed)."""
    names = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() or path.is_symlink():
            names.append(relative.as_posix())
    return names


def verify_dataset(
    root: str | Path,
    manifest: Mapping[str, str] | None = None,
    decode_all: bool = False,
) -> VerifyReport:
    """Check a DreamBooth copy against ``manifest`` (the shipped one by default).

    Every file's sha256 is compared; a file whose checksum differs is also decoded, so the report
    tells a corrupt file (does not decode) from a changed one. ``decode_all`` decodes the files
    with a matching checksum too (slower; the checksum already proves they are the originals).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; run `subjectbench data download` or pass "
            "--dataset-dir / set SUBJECTBENCH_DATASET_DIR to your copy"
        )
    manifest = dict(shipped_manifest() if manifest is None else manifest)
    report = VerifyReport(root=str(root), kind="dreambooth")
    by_subject = manifest_subjects(manifest)
    in_subjects = {name for names in by_subject.values() for name in names}
    groups = [(sid, names, True) for sid, names in by_subject.items()]
    groups += [(name, [name], False) for name in sorted(manifest) if name not in in_subjects]
    for group_id, names, is_subject in groups:
        entry = SubjectReport(id=group_id, expected=len(names))
        for name in names:
            path = root / name
            if not path.is_file():
                entry.missing.append(name)
                continue
            entry.found += 1
            try:
                checksum_ok = file_sha256(path) == manifest[name]
            except OSError as error:
                entry.corrupt.append({"file": name, "reason": f"cannot be read ({error})"})
                continue
            is_image = path.suffix.lower() in IMAGE_SUFFIXES
            problem = _decode_problem(path) if is_image and (decode_all or not checksum_ok) else None
            if problem:
                entry.corrupt.append({"file": name, "reason": problem})
            elif not checksum_ok:
                entry.mismatched.append(name)
        (report.subjects if is_subject else report.other).append(entry)

    subject_reports = {s.id: s for s in report.subjects}
    derived: dict[str, int] = {}
    for name in _listing(root):
        if name in manifest:
            continue
        parts = PurePosixPath(name).parts
        if len(parts) > 1 and parts[0] in DERIVED_DIRS:
            derived[parts[0]] = derived.get(parts[0], 0) + 1
            continue
        if len(parts) == 1 and name in KNOWN_EXTRA_FILES:
            continue
        if len(parts) == 2 and parts[0] in subject_reports:
            subject_reports[parts[0]].extra.append(name)
        else:
            report.extra.append(name)
    report.notes.extend(f"{folder}/ holds {count} derived files (e.g. subject masks); not part of "
                        "the dataset, not checked" for folder, count in sorted(derived.items()))
    return report


def verify_custom(root: str | Path) -> VerifyReport:
    """Check a custom dataset: its subject table, each subject's folder, every image decodes."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"custom dataset folder {root} does not exist; give a folder holding subjects.yaml "
            "(or subjects.csv) and one image folder per subject"
        )
    report = VerifyReport(root=str(root), kind="custom")
    table = read_subject_table(root)  # an unreadable table stops here, with its own message
    listed = {row["id"] for row in table}
    for row in table:
        subject_id = row["id"]
        folder = root / subject_id
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) \
            if folder.is_dir() else []
        images = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        entry = SubjectReport(id=subject_id, expected=len(images), found=len(images))
        try:
            class_noun, kind = validate_subject_row(subject_id, row["class"], row["kind"])
            inferred = " (inferred from the class: no 'kind' given)" if row["kind_inferred"] else ""
            entry.notes.append(f"class {class_noun!r}, kind {kind}{inferred}")
        except DatasetError as error:
            entry.problems.append(str(error))
        if not folder.is_dir():
            entry.problems.append(f"folder {folder} does not exist; add the subject's images there")
        elif not images:
            entry.problems.append(
                f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); add at least one"
            )
        for path in images:
            problem = _decode_problem(path)
            if problem:
                entry.corrupt.append({"file": path.relative_to(root).as_posix(), "reason": problem})
        for path in files:
            if path not in images:
                entry.notes.append(f"ignored (not an image file): {path.relative_to(root).as_posix()}")
        report.subjects.append(entry)
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and path.name not in listed:
            if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
                report.problems.append(
                    f"folder {path.name}/ holds images but is not listed in the subject table; "
                    "add it to subjects.yaml/csv or move it out"
                )
    return report
