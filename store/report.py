"""What `dfkd store info` and `dfkd store verify` report: summary, class counts, integrity problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .access import open as open_store
from .schema import unchecked_error
from .toolbox.errors import StoreError
from .toolbox.progress import progress


def info(path: str) -> dict[str, Any]:
    """Shape, classes, per-class counts (labels and teacher argmax), provenance and completeness."""
    reader = open_store(path)
    m = reader.meta
    done = reader.done_units()
    by_label = np.zeros(m.num_classes + 1, np.int64)  # last slot: label -1
    by_argmax = np.zeros(m.num_classes, np.int64)
    for u in progress(done, desc="counting classes", unit="unit"):
        logits, labels = reader.backend.read_targets(u, check=reader.backend.checked)  # unchecked: said, not refused
        by_label += np.bincount(np.where(labels < 0, m.num_classes, labels), minlength=m.num_classes + 1)
        by_argmax += np.bincount(np.asarray(logits, np.float32).argmax(1), minlength=m.num_classes)
    return {
        "path": path, "backend": reader.backend_name, "layout": reader.options(),
        "schema_version": m.schema_version, "num_samples": m.num_samples, "readable_samples": len(reader),
        "image_shape": list(m.image_shape), "num_classes": m.num_classes, "logits_dtype": m.logits_dtype,
        "unit_size": m.unit_size, "units_done": len(done), "units_total": m.num_units,
        "complete": len(done) == m.num_units, "base_seed": m.base_seed, "mean": m.mean, "std": m.std,
        "label_counts": by_label[:-1].tolist(), "unlabelled": int(by_label[-1]),
        "teacher_argmax_counts": by_argmax.tolist(), "provenance": m.provenance,
        "views": m.views, "view_recipe": m.view_recipe,
        "units_with_views": int((reader.backend.views_done_mask() & reader.done_mask()).sum()),
        "checksums": reader.backend.checked,
    }


@dataclass
class VerifyReport:
    """Problems make a store unusable or unfinished; notes are harmless findings."""

    path: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    units_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _ranges(units: list[int]) -> str:
    """Compact '0-3, 7, 9-10' form of a sorted unit list (first few runs)."""
    runs: list[list[int]] = []
    for u in units:
        if runs and runs[-1][1] == u - 1:
            runs[-1][1] = u
        else:
            runs.append([u, u])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:8])
    return text + (", ..." if len(runs) > 8 else "")


def verify(path: str, allow_unchecked: bool = False) -> VerifyReport:
    """Open, audit and decode every finished unit: schema, dtypes, shapes, finite logits, label range. A store
    written without checksums is a problem (its content cannot be verified) unless `allow_unchecked`, where it is
    a note and its units are checked for everything but their bytes."""
    report = VerifyReport(path)
    try:
        reader = open_store(path)
    except StoreError as exc:
        report.problems.append(str(exc))
        return report
    m = reader.meta
    for is_problem, msg in reader.backend.audit():
        (report.problems if is_problem else report.notes).append(msg)
    try:
        done = reader.done_mask()
        views_done = reader.backend.views_done_mask() if m.views else None
    except StoreError as exc:  # the flags themselves are damaged: nothing more can be said unit by unit
        report.problems.append(str(exc))
        return report
    missing = np.flatnonzero(~done).tolist()
    if missing:
        report.problems.append(f"{len(missing)} of {m.num_units} units are not finished (units {_ranges(missing)}); "
                               "finish the store by rerunning its synthesis with --resume")
    if m.views:
        unlabelled = np.flatnonzero(done & ~views_done).tolist()
        if unlabelled:
            report.problems.append(f"{len(unlabelled)} finished units lack their {m.views} view labels (units "
                                   f"{_ranges(unlabelled)}); add them with `dfkd store label {path} --resume`")
    check = reader.backend.checked
    if not check:
        text = str(unchecked_error(path)).replace(f"{path} carries", "unverifiable: it carries")
        (report.notes if allow_unchecked else report.problems).append(
            text if allow_unchecked else text + " (or pass --allow-unchecked to check the rest)")
    c, h, w = m.image_shape
    for u in progress(np.flatnonzero(done).tolist(), desc="verifying", unit="unit"):
        lo, hi = m.unit_range(u)
        try:
            rec = reader.backend.read_unit(u, check=check)
        except StoreError as exc:
            report.problems.append(str(exc))
            try:  # a checksum mismatch: still say what the unit's content holds
                rec = reader.backend.read_unit(u, check=False)
            except StoreError:
                continue
        report.units_checked += 1
        where = f"unit {u} (samples {lo}..{hi - 1})"
        if rec.images.dtype != np.uint8 or rec.images.shape != (hi - lo, c, h, w):
            report.problems.append(f"{where}: images are {rec.images.dtype}{rec.images.shape}, expected uint8{(hi - lo, c, h, w)}")
        if rec.logits.shape != (hi - lo, m.num_classes):
            report.problems.append(f"{where}: logits have shape {rec.logits.shape}, expected {(hi - lo, m.num_classes)}")
        bad = int((~np.isfinite(rec.logits)).any(axis=1).sum())
        if bad:
            report.problems.append(f"{where}: {bad} samples have NaN or inf logits; re-synthesize the unit")
        if len(rec.labels) and (rec.labels.min() < -1 or rec.labels.max() >= m.num_classes):
            report.problems.append(f"{where}: labels outside [-1, {m.num_classes})")
        if rec.views is not None and not np.isfinite(rec.views).all():
            report.problems.append(f"{where}: view labels hold NaN or inf; label them again with "
                                   "`dfkd store label --overwrite`")
    return report
