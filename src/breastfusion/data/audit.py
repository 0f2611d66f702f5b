"""Dataset audit: unreadable files, mask problems, exact and near-duplicate images, label conflicts, class
balance, clinical column types and missing values, screen and burnt-in marks.

:func:`audit_cases` reads every image once, never stops on one bad file, and returns an :class:`AuditResult`;
:func:`write_audit` writes it as ``audit.json`` (for programs) and ``audit.md`` (for people). The checks on files,
images, masks and marks, the class balance and the column summary are here; the rest lives beside it:

* exact and near-duplicate images and their groups (which a split must keep on one side):
  :mod:`breastfusion.data.duplicates`;
* the Markdown report: :mod:`breastfusion.data.audit_report`;
* how each clinical column is typed (the same reading as training): :mod:`breastfusion.data.column_types`.

Screen and burnt-in marks
-------------------------
Each image also goes through :mod:`breastfusion.data.cleaning` (field of view, burnt-in marks; detection only,
nothing painted): how many images had a margin or scanner panel cropped away, coloured overlays, grey marks, and
marks on the scan itself (calipers, dotted lines, text; not corner icons or frame lines along the edge), with
example case ids, the share per class (a class that carries marks far more often than another is a shortcut a
network can learn) and the seconds per image. Colour files are decoded a second time, in colour.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from breastfusion.data.audit_report import render_markdown
from breastfusion.data.cases import (
    CASE_ID,
    IMAGE_PATH,
    LABEL,
    MASK_PATH,
    feature_columns,
    mask_list,
)
from breastfusion.data.column_types import infer_column_type, report_ambiguous
from breastfusion.data.duplicates import (
    MIN_OVERLAP,
    NEAR_DUP_THRESHOLD,
    Signature,
    exact_groups,
    find_duplicates,
    group_duplicates,
    pixel_hash,
    progress_bar,
    signature,
)
from breastfusion.data.images import image_size, read_image, read_mask
from breastfusion.errors import DataError
from breastfusion.missing import ABSENT, is_missing
from breastfusion.utils import write_json, write_text

log = logging.getLogger(__name__)

NO_LESION_CLASSES = ("normal",)
_MARK_KINDS = ("fov_cropped", "colour_marks", "grey_marks", "inner_marks", "with_marks")
_MARK_EXAMPLES = 10
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class AuditResult:
    """What :func:`audit_cases` found. ``dup_group`` maps every case_id to its duplicate-group id."""

    root: Path
    n_cases: int
    class_counts: dict
    unreadable: list = field(default_factory=list)        # {case_id, path, error}
    mask_issues: list = field(default_factory=list)       # {case_id, kind, path, detail}
    exact_groups: list = field(default_factory=list)      # [case_id, ...] with identical pixels
    dup_groups: list = field(default_factory=list)        # {group, case_ids, paths, labels, exact}
    pairs: list = field(default_factory=list)             # verified near-duplicate pairs with scores
    borderline: list = field(default_factory=list)        # rejected pairs closest to the threshold
    label_conflicts: list = field(default_factory=list)   # dup groups holding several labels
    suspicious: list = field(default_factory=list)        # dup groups to check by eye (see duplicates.STRONG_LINK)
    missing_values: dict = field(default_factory=dict)    # clinical column -> {missing, fraction}
    column_types: dict = field(default_factory=dict)      # clinical column -> ColumnType.to_dict()
    image_stats: dict = field(default_factory=dict)
    dup_group: dict = field(default_factory=dict)         # case_id -> group id
    paths: dict = field(default_factory=dict)             # case_id -> image path relative to root
    params: dict = field(default_factory=dict)
    marks: dict = field(default_factory=dict)             # screen and burnt-in marks (see the module docstring)
    seconds: float = 0.0

    @property
    def groups(self) -> pd.Series:
        """The duplicate-group id of each case as a Series indexed by case_id (for make_splits)."""
        return pd.Series(self.dup_group, name="dup_group", dtype=object).rename_axis(CASE_ID)

    @property
    def summary(self) -> dict:
        """Counts of each finding (the ``summary`` block of audit.json)."""
        return self.to_dict()["summary"]

    @property
    def n_near_dup_images(self) -> int:
        return sum(len(g["case_ids"]) for g in self.dup_groups)

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "n_cases": self.n_cases,
            "seconds": round(self.seconds, 2),
            "params": self.params,
            "class_counts": self.class_counts,
            "image_stats": self.image_stats,
            "missing_values": self.missing_values,
            "column_types": self.column_types,
            "unreadable": self.unreadable,
            "mask_issues": self.mask_issues,
            "summary": {
                "unreadable": len(self.unreadable),
                "mask_issues": dict(Counter(m["kind"] for m in self.mask_issues)),
                "exact_duplicate_groups": len(self.exact_groups),
                "duplicate_groups": len(self.dup_groups),
                "images_in_duplicate_groups": self.n_near_dup_images,
                "label_conflict_groups": len(self.label_conflicts),
                "suspicious_groups": len(self.suspicious),
                "ambiguous_columns": sum(bool(t["flags"]) for t in self.column_types.values()),
                **({f"images_{k}": self.marks[k]["n"] for k in _MARK_KINDS} if self.marks else {}),
            },
            "marks": self.marks,
            "exact_duplicate_groups": [[self.paths.get(c, c) for c in g] for g in self.exact_groups],
            "near_duplicate_groups": self.dup_groups,
            "label_conflicts": self.label_conflicts,
            "suspicious_groups": self.suspicious,
            "near_duplicate_pairs": self.pairs,
            "borderline_pairs": self.borderline,
            "cases": [{"case_id": c, "image": self.paths.get(c), "group": g} for c, g in self.dup_group.items()],
        }


def _default_root(paths: list[str]) -> Path:
    parents = [str(Path(p).resolve().parent) for p in paths if not is_missing(p, ABSENT)]
    if not parents:
        return Path.cwd()
    try:
        return Path(os.path.commonpath(parents))
    except ValueError:  # different drives
        return Path(parents[0])


def _rel(path, root: Path) -> str:
    if is_missing(path, ABSENT):
        return ""
    p = Path(str(path))
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def _image_mode(path) -> str | None:
    try:
        with Image.open(path) as im:
            return im.mode
    except Exception:  # reported as unreadable elsewhere
        return None


def audit_for_config(cases: pd.DataFrame, data, *, input_columns: list[str] | None = None,
                     progress: bool = True) -> AuditResult:
    """:func:`audit_cases` reading the clinical columns as ``data`` (the config's ``data`` section) says, as
    training will: the same call for ``breastfusion audit --config`` and a run's audit stage."""
    return audit_cases(cases, no_lesion_classes=tuple(data.no_lesion_labels), progress=progress,
                       missing_values=data.missing_values, column_types=data.column_types,
                       separator=data.multi_value_separator, ordinal_levels=data.ordinal_levels,
                       input_columns=input_columns)


def audit_cases(
    cases: pd.DataFrame,
    root: Path | str | None = None,
    *,
    near_dup_threshold: float = NEAR_DUP_THRESHOLD,
    no_lesion_classes: tuple[str, ...] | list[str] = NO_LESION_CLASSES,
    check_duplicates: bool = True,
    progress: bool = True,
    missing_values: list[str] | None = None,
    column_types: dict[str, str] | None = None,
    separator: str = "&",
    ordinal_levels: dict[str, list[str]] | None = None,
    input_columns: list[str] | None = None,
    check_marks: bool = True,
) -> AuditResult:
    """Audit a cases table: files, masks, duplicates, label conflicts, class balance, missing values.

    Never stops on one bad file: unreadable images and masks are recorded and the audit goes on.
    ``root`` is the folder paths are reported relative to (default: the common parent of the images).
    ``no_lesion_classes`` are labels whose masks must be empty; every other label must have a lesion.
    ``missing_values`` / ``column_types``: as ``data.missing_values`` / ``data.column_types``; each clinical
    column's type is read the way training will read it, and an ambiguous one is listed and logged.
    ``separator`` / ``ordinal_levels``: as ``data.multi_value_separator`` / ``data.ordinal_levels`` (an undeclared
    column whose cells hold the separator is listed as 'looks multi-valued', not split). ``input_columns``: the
    model inputs, when known: every column is still typed and listed, but only inputs' ambiguities are warned about
    in the log (an excluded column that looks multi-valued is not a problem of the run). ``check_marks``: look for
    scanner margins and burnt-in marks in every image (:mod:`breastfusion.data.cleaning`).
    """
    if not isinstance(cases, pd.DataFrame):
        raise TypeError(f"The cases table must be a pandas DataFrame. Got {type(cases).__name__} instead.")
    for col in (CASE_ID, IMAGE_PATH):
        if col not in cases.columns:
            raise DataError(f"The cases table has no '{col}' column; cannot audit it.")
    if not 0.0 < float(near_dup_threshold) <= 1.0:
        raise ValueError(
            f"The 'near_dup_threshold' parameter of audit_cases must be a float in the range (0, 1]. "
            f"Got {near_dup_threshold!r} instead."
        )
    t0 = time.perf_counter()
    df = cases.reset_index(drop=True)
    ids = df[CASE_ID].astype(str).tolist()
    if len(set(ids)) != len(ids):
        dup = next(c for c, n in Counter(ids).items() if n > 1)
        raise DataError(f"case_id '{dup}' appears more than once in the cases table.")
    root = Path(root) if root is not None else _default_root(df[IMAGE_PATH].tolist())
    labels = df[LABEL].tolist() if LABEL in df.columns else [None] * len(df)
    labels = [None if is_missing(v, ABSENT) or str(v).strip() == "" else str(v) for v in labels]
    no_lesion = {str(c) for c in no_lesion_classes}
    res = AuditResult(root=root, n_cases=len(df), class_counts={})
    res.paths = {c: _rel(p, root) for c, p in zip(ids, df[IMAGE_PATH])}

    sigs: list[Signature | None] = [None] * len(df)
    hashes: list[str | None] = [None] * len(df)
    modes: Counter = Counter()
    sizes = []
    mask_col = df[MASK_PATH].tolist() if MASK_PATH in df.columns else [float("nan")] * len(df)
    mark_rows: list[dict] = []
    mark_seconds = 0.0
    for k in progress_bar(range(len(df)), len(df), "reading images", progress):
        cid, path = ids[k], df.at[k, IMAGE_PATH]
        if is_missing(path, ABSENT):
            res.unreadable.append({"case_id": cid, "path": "", "error": "no image path"})
            continue
        try:
            gray = read_image(path, mode="gray")
        except DataError as exc:
            res.unreadable.append({"case_id": cid, "path": res.paths[cid], "error": str(exc)})
            continue
        file_mode = _image_mode(path) or "?"
        modes[file_mode] += 1
        if check_marks:
            tm = time.perf_counter()
            mark_rows.append(_mark_row(cid, labels[k], path, gray, file_mode, res.paths[cid]))
            mark_seconds += time.perf_counter() - tm
        sizes.append(gray.shape)
        hashes[k] = pixel_hash(gray)
        if check_duplicates:
            sigs[k] = signature(gray)
        _check_masks(res, cid, mask_col[k], gray.shape, labels[k], no_lesion, root)
    t_read = time.perf_counter() - t0
    if check_marks:
        res.marks = _marks_summary([r for r in mark_rows if r is not None], mark_seconds)

    # Duplicates -----------------------------------------------------------------------------------
    exact, pairs, n_cand = ([], [], 0)
    if check_duplicates:
        exact, pairs, n_cand = find_duplicates(sigs, hashes, threshold=near_dup_threshold, progress=progress)
    else:
        exact = exact_groups(hashes)
    dup = group_duplicates(ids, labels, res.paths, exact, pairs)
    res.dup_group, res.dup_groups, res.exact_groups = dup.dup_group, dup.dup_groups, dup.exact_groups
    res.label_conflicts, res.suspicious = dup.label_conflicts, dup.suspicious
    res.pairs, res.borderline = dup.pairs, dup.borderline

    # Tables ---------------------------------------------------------------------------------------
    known = [lab for lab in labels if lab is not None]
    counts = Counter(known)
    res.class_counts = {
        str(c): {"n": n, "fraction": round(n / max(len(known), 1), 4)} for c, n in sorted(counts.items())
    }
    if len(known) < len(labels):
        res.class_counts["<missing>"] = {"n": len(labels) - len(known), "fraction": None}
    res.column_types, res.missing_values = _column_summary(
        df, ids, missing_values=missing_values, column_types=column_types, separator=separator,
        ordinal_levels=ordinal_levels, input_columns=input_columns)
    if sizes:
        hs = np.array([s[0] for s in sizes])
        ws = np.array([s[1] for s in sizes])
        res.image_stats = {
            "n_read": len(sizes),
            "modes": dict(modes.most_common()),
            "height": {"min": int(hs.min()), "median": float(np.median(hs)), "max": int(hs.max())},
            "width": {"min": int(ws.min()), "median": float(np.median(ws)), "max": int(ws.max())},
            "distinct_sizes": len(set(sizes)),
            "most_common_sizes": [{"height": h, "width": w, "n": n} for (h, w), n in Counter(sizes).most_common(5)],
        }
    res.params = {
        "near_dup_threshold": float(near_dup_threshold),
        "min_overlap": MIN_OVERLAP,
        "no_lesion_classes": sorted(no_lesion),
        "check_duplicates": bool(check_duplicates),
        "candidate_pairs": n_cand,
        "read_seconds": round(t_read, 2),
        "check_marks": bool(check_marks),
    }
    res.seconds = time.perf_counter() - t0
    return res


def _mark_row(cid: str, label, path, gray: np.ndarray, file_mode: str, rel: str) -> dict | None:
    """What :mod:`breastfusion.data.cleaning` finds in one image (field of view, marks; nothing painted)."""
    from breastfusion.data.cleaning import (
        burnt_in_marks,
        field_of_view,
        read_for_cleaning,
    )

    try:
        image = gray if file_mode in _GREY_MODES else read_for_cleaning(path, "fov_marks")
        box, flags = field_of_view(gray)
        _, counts = burnt_in_marks(image)
    except (DataError, ValueError) as exc:  # logged and left out; the audit goes on
        log.warning("audit: marks of '%s' not checked (%s)", rel, exc)
        return None
    h, w = gray.shape
    cut = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(h * w)
    return {"case_id": cid, "image": rel, "label": label, "fov_cropped": "fov_cropped" in flags,
            "fov_refused": "fov_refused" in flags, "cropped_fraction": round(cut, 4),
            "colour_px": counts["colour"], "grey_px": counts["grey"], "inner_px": counts["inner"]}


def _marks_summary(rows: list[dict], seconds: float) -> dict:
    """Counts, example case ids and per-class shares of the images with a cropped margin or marks."""
    from breastfusion.data.cleaning import CLEANING_VERSION

    tests = {"fov_cropped": lambda r: r["fov_cropped"], "colour_marks": lambda r: r["colour_px"] > 0,
             "grey_marks": lambda r: r["grey_px"] > 0, "inner_marks": lambda r: r["inner_px"] > 0,
             "with_marks": lambda r: r["colour_px"] + r["grey_px"] > 0}
    n = len(rows)
    out: dict = {"n_checked": n, "cleaning_version": CLEANING_VERSION,
                 "seconds_per_image": round(seconds / max(n, 1), 4)}
    for kind, test in tests.items():
        hit = [r for r in rows if test(r)]
        out[kind] = {"n": len(hit), "fraction": round(len(hit) / max(n, 1), 4),
                     "examples": [r["case_id"] for r in hit[:_MARK_EXAMPLES]]}
    cropped = [r["cropped_fraction"] for r in rows if r["fov_cropped"]]
    out["fov_cropped"]["mean_area_cut"] = round(float(np.mean(cropped)), 4) if cropped else 0.0
    out["fov_refused"] = [r["case_id"] for r in rows if r["fov_refused"]]
    by: dict = {}
    for r in rows:
        by.setdefault(str(r["label"]) if r["label"] is not None else "<missing>", []).append(r)
    out["by_class"] = {c: {"n": len(rs), **{k: round(sum(map(tests[k], rs)) / len(rs), 4)
                                           for k in ("inner_marks", "with_marks", "fov_cropped")}}
                       for c, rs in sorted(by.items())}
    out["cases"] = [r for r in rows if r["fov_cropped"] or r["colour_px"] or r["grey_px"]]
    return out


def _check_masks(res: AuditResult, cid: str, mask_value, shape, label, no_lesion: set, root: Path) -> None:
    if is_missing(mask_value, ABSENT):
        return  # no mask information: nothing to check
    paths = mask_list(mask_value)
    lesion_class = label is not None and label not in no_lesion
    if not paths:
        if lesion_class:
            res.mask_issues.append({"case_id": cid, "kind": "empty_mask_in_lesion_class", "path": "",
                                    "detail": f"label '{label}' but no mask file (no lesion outlined)"})
        return
    ok = True
    for p in paths:
        try:
            h, w = image_size(p)
        except DataError as exc:
            res.mask_issues.append({"case_id": cid, "kind": "unreadable_mask", "path": _rel(p, root),
                                    "detail": str(exc)})
            ok = False
            continue
        if (h, w) != tuple(shape):
            res.mask_issues.append({
                "case_id": cid, "kind": "mask_size_mismatch", "path": _rel(p, root),
                "detail": f"mask is {w}x{h} (WxH), image is {shape[1]}x{shape[0]}",
            })
            ok = False
    if not ok:
        return
    try:
        mask = read_mask(paths, shape)
    except DataError as exc:
        res.mask_issues.append({"case_id": cid, "kind": "unreadable_mask", "path": _rel(paths[0], root),
                                "detail": str(exc)})
        return
    area = int(mask.sum())
    if lesion_class and area == 0:
        res.mask_issues.append({"case_id": cid, "kind": "empty_mask_in_lesion_class", "path": _rel(paths[0], root),
                                "detail": f"label '{label}' but the mask is empty"})
    elif label is not None and label in no_lesion and area > 0:
        res.mask_issues.append({"case_id": cid, "kind": "lesion_mask_in_no_lesion_class", "path": _rel(paths[0], root),
                                "detail": f"label '{label}' but the mask marks {area} pixels "
                                          f"({100.0 * area / mask.size:.2f} % of the image)"})


def _column_summary(df: pd.DataFrame, ids: list[str], *, missing_values, column_types, separator: str,
                    ordinal_levels, input_columns) -> tuple[dict, dict]:
    """(column -> type as :meth:`ColumnType.to_dict`, column -> {missing, fraction}) for every clinical column of
    ``df`` (its rows are the cases ``ids``); the arguments are those of :func:`audit_cases`."""
    types: dict = {}
    missing: dict = {}
    # Column types: the same reading as training (data.column_types), reported so that no type is decided
    # silently. A declared type the values contradict is recorded here (the audit goes on) and refused in training.
    declared = dict(column_types or {})
    for col in feature_columns(df):
        s = pd.Series(df[col].to_numpy(), index=pd.Index(ids, name=CASE_ID), name=col)
        try:
            ct = infer_column_type(s, str(col), missing_values, declared=declared.get(col), source="cases table",
                                   separator=separator, levels=(ordinal_levels or {}).get(col))
        except DataError as exc:
            types[str(col)] = {"kind": declared.get(col), "declared": True, "error": str(exc),
                                          "flags": ["declared_type_contradicted"], "missing": None,
                                          "missing_tokens_seen": {}, "note": str(exc)}
            log.warning("%s", exc)
            miss = int(df[col].isna().sum())
        else:
            quiet = input_columns is not None and str(col) not in set(map(str, input_columns))
            report_ambiguous(ct, level=logging.INFO if quiet else None)
            types[str(col)] = ct.to_dict()
            if ct.kind == "multi":
                types[str(col)]["separator"] = separator
            miss = ct.n_missing
        missing[str(col)] = {"missing": miss, "fraction": round(miss / len(df), 4)}
    for col in sorted(set(declared) - set(map(str, feature_columns(df)))):
        log.warning("data.column_types names column '%s', which the cases table lacks.", col)
    return types, missing


def duplicate_groups(
    cases: pd.DataFrame,
    *,
    near_dup_threshold: float = NEAR_DUP_THRESHOLD,
    progress: bool = False,
    audit: AuditResult | None = None,
) -> pd.Series:
    """Duplicate-group id of every case (exact or near-duplicate images share one), indexed by case_id.

    Cases without a duplicate get a group of their own (``solo:<case_id>``). Pass an existing ``audit``
    to reuse its result instead of reading the images again.
    """
    if audit is None:
        audit = audit_cases(cases, near_dup_threshold=near_dup_threshold, progress=progress)
    ids = cases[CASE_ID].astype(str)
    missing = ids[~ids.isin(list(audit.dup_group))]
    if len(missing):
        raise DataError(f"The audit does not cover case '{missing.iloc[0]}'; audit this cases table again.")
    return pd.Series([audit.dup_group[c] for c in ids], index=pd.Index(ids, name=CASE_ID), name="dup_group")


def write_audit(result: AuditResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``audit.md`` (for people) and ``audit.json`` (for programs) into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    md = write_text(render_markdown(result), out_dir / "audit.md")
    js = write_json(result.to_dict(), out_dir / "audit.json")
    return md, js
