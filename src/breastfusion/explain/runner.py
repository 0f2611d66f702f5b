"""Explain a trained bundle's predictions without retraining (``breastfusion explain``).

Ultrasound bundles (FusionClassifier; fusion, image-only or tabular-only): the input is an image, a folder of
images or a cases table, read exactly as :class:`~breastfusion.inference.predictor.Predictor` reads it (grey →
3 channels, the bundle's size, mean and std; clinical columns plus radiomics recomputed from masks). Per case:
Grad-CAM, Grad-CAM++ and occlusion maps, the modality deltas and the tabular SHAP values; one PNG per case.

Histology bundles (MultiScaleGrader): the input is a tiles table (or a ``breastfusion tile`` output or a
folder of tiles), read as :class:`~breastfusion.inference.grading.GradingPredictor` reads it (pathomics
recomputed). Per stack (at most ``max_stacks`` per case): one map per magnification and backbone, the
cross-scale attention and the scale weights, one PNG per stack; per case (stacks averaged, as cases are
scored): modality deltas and SHAP.

Writes into ``out_dir``: ``cases/<case>.png`` (or ``stacks/<case>__<stack>.png``), ``explanations.csv`` (one row
per case: prediction, modality deltas, top-k features with their values and SHAP values),
``shap_values.csv`` (every case x input column), ``shap_summary.png`` (mean |SHAP|) and ``skipped.csv`` when
cases could not be explained. Each file is written atomically.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL
from breastfusion.errors import DataError
from breastfusion.explain.gradcam import (
    METHOD_LABELS,
    METHODS,
    _shap_bars,
    cam_maps,
    occlusion,
    plot_image_explanation,
    plot_stack_explanation,
)
from breastfusion.explain.modality import grey_in_model_space, modality_contributions
from breastfusion.explain.tabular import (
    decode_values,
    explain_tabular,
    missing_row,
    plot_shap_summary,
    top_features,
)
from breastfusion.models.registry import kind_name
from breastfusion.utils import atomic_path

log = logging.getLogger(__name__)

ALL_METHODS = ("gradcam", "gradcam++", "occlusion")


@dataclass
class ExplainResult:
    table: pd.DataFrame
    csv: Path
    shap_summary: Path | None
    shap_values: Path | None
    figures: list[Path]
    skipped: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)  # mean seconds per case (or per stack) per part


def parse_methods(method: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(method, str):
        method = ALL_METHODS if method == "all" else [m.strip() for m in method.split(",") if m.strip()]
    bad = [m for m in method if m not in ALL_METHODS]
    if bad:
        raise DataError(f"unknown explanation method(s) {bad}; use {', '.join(ALL_METHODS)} or all")
    return tuple(dict.fromkeys(method))


def _safe_name(s: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("._") or "case"
    name, k = base, 1
    while name in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name)
    return name


def _background_rows(background, pre, *, size: int, seed: int, predictor=None) -> np.ndarray | None:
    """Encoded background rows: an array as is, or a sample of ``size`` rows of a cases table (its columns
    transformed directly when it holds every input column, else rebuilt like prediction rows: clinical
    columns plus radiomics from the masks)."""
    if background is None or pre is None:
        return None
    if isinstance(background, np.ndarray):
        return background.astype(np.float32)
    if not isinstance(background, pd.DataFrame):
        from breastfusion.data.cases import read_cases

        background = read_cases(background, require_labels=False, require_images=False, check_files=False)
    df = background.reset_index(drop=True)
    if len(df) > size:
        df = df.sample(n=size, random_state=seed).reset_index(drop=True)
    if CASE_ID not in df.columns:
        df[CASE_ID] = [f"background_{i}" for i in range(len(df))]
    df[CASE_ID] = df[CASE_ID].astype(str)
    if all(c in df.columns for c in pre.columns_) or predictor is None or IMAGE_PATH not in df.columns:
        absent = [c for c in pre.columns_ if c not in df.columns]
        if absent:
            log.warning("background table lacks %d input column(s) (e.g. %s); they count as missing there",
                        len(absent), absent[:3])
        rows = pre.transform(df.set_index(CASE_ID), row_ids=list(df[CASE_ID]), source="background table")
    else:
        skipped: dict[str, str] = {}
        rows = predictor._tabular_rows(df, skipped)
        rows = rows[~df[CASE_ID].isin(skipped).to_numpy()]
    if len(rows) == 0:
        raise DataError("the background table gave no usable rows")
    return rows.astype(np.float32)


def _top_columns(row: dict, top: list[dict], k: int) -> None:
    for j in range(k):
        t = top[j] if j < len(top) else {"feature": "", "value": "", "shap": np.nan}
        row[f"top{j + 1}_feature"] = t["feature"]
        row[f"top{j + 1}_value"] = t["value"]
        row[f"top{j + 1}_shap"] = t["shap"]


def quoted_probability(bundle, probs, target: int) -> str:
    """The explained class's probability as ``predict`` quotes it: temperature-scaled with the bundle's calibration
    when it has a fitted one (labelled calibrated), else the network's softmax (labelled uncalibrated)."""
    from breastfusion.evaluation.calibration import (
        apply_bundle_calibration,
        calibration_status,
    )

    cal = bundle.meta.get("calibration")
    if calibration_status(cal)[0]:
        pc = apply_bundle_calibration(np.asarray(probs, dtype=float)[None], cal, bundle.classes)[0][0]
        return f"p = {pc[target]:.3f}, calibrated"
    return f"p = {float(probs[target]):.3f}, uncalibrated"


def _prob_title(case_id: str, classes: list[str], target: int, p: str, mod: dict, synthetic: bool) -> str:
    parts = [f"{case_id}: predicted {classes[target]} ({p})"]
    if np.isfinite(mod["delta_image"]):
        parts.append(f"image Δ {mod['delta_image']:+.3f}")
    if np.isfinite(mod["delta_tabular"]):
        parts.append(f"tabular Δ {mod['delta_tabular']:+.3f}")
    return "  |  ".join(parts) + ("  [SYNTHETIC model]" if synthetic else "")


def _plot_tabular_only(top: list[dict], path: Path, title: str) -> Path:
    from breastfusion.evaluation.plots import _new_figure, _save, _short

    fig = _new_figure(7.2, 0.3 * max(len(top), 1) + 1.6)
    _shap_bars(fig.add_subplot(1, 1, 1), top, "tabular features (SHAP)")
    fig.suptitle(_short(title, 140), fontsize=10)
    return _save(fig, path)


class _Timer:
    def __init__(self):
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, key: str, seconds: float) -> None:
        self.total[key] = self.total.get(key, 0.0) + seconds
        self.count[key] = self.count.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.total[k] / self.count[k] for k in self.total}


def explain_bundle(bundle, source, out_dir: str | Path, *, methods="all", top_k: int = 10, cases=None,
                   background=None, background_size: int = 32, max_cases: int | None = None, max_stacks: int = 4,
                   shap_method: str = "auto", n_permutations: int = 64, threads: int | None = None,
                   occlusion_patch: int | None = None, seed: int = 0, progress: bool = False) -> ExplainResult:
    """Explain the predictions of ``bundle`` (a path or a loaded :class:`~breastfusion.bundles.bundle.Bundle`)
    on ``source``; see the module docstring for inputs and outputs."""
    from breastfusion.bundles.bundle import Bundle, load_bundle

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    methods = parse_methods(methods)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = {"methods": methods, "top_k": top_k, "background": background, "background_size": background_size,
          "max_cases": max_cases, "shap_method": shap_method, "n_permutations": n_permutations, "threads": threads,
          "occlusion_patch": occlusion_patch, "seed": seed, "progress": progress}
    explain = _EXPLAINERS.get(kind_name(bundle.meta))
    if explain is None:
        raise DataError(f"Bundle '{bundle.path}' holds a network of kind '{kind_name(bundle.meta)}', which "
                        "'explain' does not handle yet.")
    rows, shap_rows, figures, skipped, timer = explain(bundle, source, out_dir, cases=cases, max_stacks=max_stacks,
                                                       **kw)
    table = pd.DataFrame(rows)
    csv = out_dir / "explanations.csv"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    summary = values_csv = None
    if shap_rows:
        names = list(shap_rows[0][1].names)
        mat = np.stack([r.values for _, r in shap_rows])
        summary = plot_shap_summary(names, mat, out_dir / "shap_summary.png", top=20,
                                    title=f"Tabular feature importance (mean |SHAP|) over {len(shap_rows)} case(s)"
                                          + ("  [SYNTHETIC model]" if bundle.synthetic else ""))
        values_csv = out_dir / "shap_values.csv"
        sv = pd.DataFrame(mat, columns=names)
        sv.insert(0, CASE_ID, [cid for cid, _ in shap_rows])
        with atomic_path(values_csv) as tmp:
            sv.to_csv(tmp, index=False)
    skipped_df = pd.DataFrame([{CASE_ID: c, "reason": r} for c, r in skipped.items()], columns=[CASE_ID, "reason"])
    skipped_path = out_dir / "skipped.csv"
    if len(skipped_df):
        for cid, reason in skipped.items():
            log.warning("skipped case '%s': %s", cid, reason)
        with atomic_path(skipped_path) as tmp:
            skipped_df.to_csv(tmp, index=False)
    elif skipped_path.exists():
        skipped_path.unlink()  # a stale list from an earlier run would mislead
    return ExplainResult(table, csv, summary, values_csv, figures, skipped_df, timer.means())


# ------------------------------------------------------------------------------------------------ ultrasound

def _explain_ultrasound(bundle, source, out_dir: Path, *, cases=None, max_stacks: int = 0, methods, top_k, background,
                        background_size, max_cases, shap_method, n_permutations, threads, occlusion_patch, seed,
                        progress):
    from tqdm.auto import tqdm

    if cases is not None:
        raise DataError("--cases is for histology bundles; an ultrasound cases table is the INPUT itself")

    from breastfusion.inference.predictor import Predictor, cases_from_input

    pred = Predictor(bundle, threads=threads, io_workers=1)
    model = pred.model
    dev = next(model.parameters()).device
    classes = bundle.classes
    cases = source if isinstance(source, pd.DataFrame) else cases_from_input(source)
    cases = cases.reset_index(drop=True).copy()
    if len(cases) == 0:
        raise DataError("Nothing to explain: the input holds no cases.")
    cases[CASE_ID] = cases[CASE_ID].astype(str)
    if cases[CASE_ID].duplicated().any():
        raise DataError(f"Input case_id '{cases.loc[cases[CASE_ID].duplicated(), CASE_ID].iloc[0]}' appears more "
                        "than once; case ids must be unique.")
    if max_cases:
        cases = cases.head(int(max_cases))
    skipped: dict[str, str] = {}
    pre = bundle.tabular
    tab = pred._tabular_rows(cases, skipped) if model.uses_tabular else None
    miss = missing_row(pre) if model.uses_tabular else None
    bg = _background_rows(background, pre, size=background_size, seed=seed, predictor=pred) if model.uses_tabular else None
    grey = grey_in_model_space(bundle.meta["image"]["mean"], bundle.meta["image"]["std"]).to(dev)
    cam_methods = [m for m in methods if m in METHODS]
    rows, shap_rows, figures, used = [], [], [], set()
    timer = _Timer()
    (out_dir / "cases").mkdir(exist_ok=True)
    for i in tqdm(range(len(cases)), desc="explain", unit="case", disable=not progress):
        cid = cases.at[i, CASE_ID]
        if cid in skipped:
            continue
        t_case = time.perf_counter()
        img = x = None
        if model.uses_image:
            try:
                img = pred._load_image(cases.at[i, IMAGE_PATH])
            except Exception as exc:  # noqa: BLE001 - one bad file never loses the batch
                skipped[cid] = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
                continue
            x = torch.from_numpy(img).float().div(255.0)[None, None].expand(1, 3, -1, -1)
            x = ((x - pred.mean) / pred.std).to(dev)
        t_row = tab[i] if tab is not None else None
        t0 = time.perf_counter()
        mod = modality_contributions(model, x, t_row, missing_row=miss, fill=grey)
        timer.add("modality", time.perf_counter() - t0)
        target = mod["target"]
        maps: dict[str, np.ndarray] = {}
        if model.uses_image and cam_methods:
            t0 = time.perf_counter()
            res = cam_maps(model, x, torch.from_numpy(t_row) if t_row is not None else None, target_class=target,
                           methods=cam_methods)
            for m in cam_methods:
                maps[m] = res.maps[("image", m)][0]
            timer.add("gradcam", time.perf_counter() - t0)
        if model.uses_image and "occlusion" in methods:
            t0 = time.perf_counter()
            maps["occlusion"] = occlusion(model, x, torch.from_numpy(t_row) if t_row is not None else None,
                                          target_class=target, fill=grey, patch=occlusion_patch)
            timer.add("occlusion", time.perf_counter() - t0)
        top: list[dict] = []
        row = {CASE_ID: cid, IMAGE_PATH: cases.at[i, IMAGE_PATH]}
        if LABEL in cases.columns:
            row[LABEL] = cases.at[i, LABEL]
        row.update({"predicted": classes[target], "probability": mod["p_both"]})
        row.update({f"prob_{c}": float(mod["probs"][j]) for j, c in enumerate(classes)})
        row.update({k: mod[k] for k in ("p_without_image", "p_without_tabular", "p_without_both", "delta_image",
                                       "delta_tabular")})
        if model.uses_tabular:
            t0 = time.perf_counter()
            sh = explain_tabular(model, x, t_row, pre=pre, target_class=target, background=bg, method=shap_method,
                                 n_permutations=n_permutations, seed=seed)
            timer.add("shap", time.perf_counter() - t0)
            top = top_features(sh, decode_values(pre, t_row), top_k)
            shap_rows.append((cid, sh))
            row.update({"shap_base": sh.base_value, "shap_fx": sh.fx, "shap_method": sh.method})
            _top_columns(row, top, min(top_k, len(sh.names)))
        fig_path = out_dir / "cases" / f"{_safe_name(cid, used)}.png"
        title = _prob_title(cid, classes, target, quoted_probability(bundle, mod["probs"], target), mod,
                            bundle.synthetic)
        t0 = time.perf_counter()
        if model.uses_image:
            plot_image_explanation(img, maps, fig_path, title=title, shap_top=top or None)
        else:
            _plot_tabular_only(top, fig_path, title)
        timer.add("figure", time.perf_counter() - t0)
        figures.append(fig_path)
        row["figure"] = str(fig_path.relative_to(out_dir))
        row["seconds"] = round(time.perf_counter() - t_case, 3)
        timer.add("case", time.perf_counter() - t_case)
        rows.append(row)
    return rows, shap_rows, figures, skipped, timer


# ------------------------------------------------------------------------------------------------- histology

def _explain_histology(bundle, source, out_dir: Path, *, cases, max_stacks, methods, top_k, background,
                       background_size, max_cases, shap_method, n_permutations, threads, occlusion_patch, seed,
                       progress):
    from tqdm.auto import tqdm

    from breastfusion.data.cases import read_cases
    from breastfusion.data.tiles import STACK_ID, mag_column, stack_table
    from breastfusion.data.tiling import tiles_from_input
    from breastfusion.inference.grading import GradingPredictor

    gp = GradingPredictor(bundle, threads=threads)
    model = gp.model
    dev = next(model.parameters()).device
    classes, mags = bundle.classes, gp.mags
    tiles = source if isinstance(source, pd.DataFrame) else tiles_from_input(source)
    tiles = tiles.copy()
    tiles[CASE_ID] = tiles[CASE_ID].astype(str)
    if cases is not None and not isinstance(cases, pd.DataFrame):
        cases = read_cases(cases, require_labels=False, require_images=False, check_files=False)
    if cases is not None:
        cases = cases.copy()
        cases[CASE_ID] = cases[CASE_ID].astype(str)
    ids = list(dict.fromkeys(tiles[CASE_ID]))
    if max_cases:
        ids = ids[: int(max_cases)]
        tiles = tiles[tiles[CASE_ID].isin(set(ids))]
    skipped: dict[str, str] = {}
    try:
        stacks = stack_table(tiles, mags)
    except DataError as exc:
        log.warning("%s", exc)
        stacks = pd.DataFrame(columns=[CASE_ID, STACK_ID] + [mag_column(m) for m in mags])
    stacks[CASE_ID] = stacks[CASE_ID].astype(str)
    # at most max_stacks per case: decode (and check) only those
    stacks = stacks.groupby(CASE_ID, sort=False).head(max(1, int(max_stacks))).reset_index(drop=True)
    mag_cols = [mag_column(m) for m in mags]
    ok = gp.cache.usable(stacks[mag_cols].to_numpy().tolist())
    stacks = stacks[ok].reset_index(drop=True)
    for cid in ids:
        if cid not in set(stacks[CASE_ID]):
            skipped[cid] = f"no stack with every magnification {[f'{m:g}x' for m in mags]} and readable tiles"
    pre = bundle.tabular
    tab_of: dict[str, np.ndarray] = {}
    if model.uses_tabular:
        table = gp._case_table(tiles[tiles[CASE_ID].isin(set(stacks[CASE_ID]))], cases, progress)
        for cid in dict.fromkeys(stacks[CASE_ID]):
            try:
                tab_of[cid] = pre.transform(table.reindex([cid]), row_ids=[cid], source="case features")[0]
            except DataError as exc:
                skipped[cid] = str(exc)
    miss = missing_row(pre) if model.uses_tabular else None
    bg = _background_rows(background, pre, size=background_size, seed=seed) if model.uses_tabular else None
    cam_methods = [m for m in methods if m in METHODS]
    rows, shap_rows, figures, used = [], [], [], set()
    timer = _Timer()
    (out_dir / "stacks").mkdir(exist_ok=True)
    for cid in tqdm([c for c in ids if c not in skipped], desc="explain", unit="case", disable=not progress):
        t_case = time.perf_counter()
        st = stacks[stacks[CASE_ID] == cid]
        tiles_u8 = [[gp.cache.get(p) for p in paths] for paths in st[mag_cols].to_numpy().tolist()]
        imgs = torch.from_numpy(np.stack([np.stack(t) for t in tiles_u8])).permute(0, 1, 4, 2, 3).float().div(255.0).to(dev)
        t_row = tab_of.get(cid)
        t_t = torch.from_numpy(t_row) if t_row is not None else None
        t0 = time.perf_counter()
        mod = modality_contributions(model, imgs, t_row, missing_row=miss)
        timer.add("modality", time.perf_counter() - t0)
        target = mod["target"]
        sw, cross, stack_figs = [], [], []
        for j, (stack_id, tl) in enumerate(zip(st[STACK_ID].tolist(), tiles_u8)):
            maps: dict[str, np.ndarray] = {}
            t0 = time.perf_counter()
            res = cam_maps(model, imgs[j:j + 1], t_t, target_class=target, methods=cam_methods or ["gradcam"])
            timer.add("gradcam_stack", time.perf_counter() - t0)
            if cam_methods:
                for (src, m), v in res.maps.items():
                    maps[f"{METHOD_LABELS[m]} ({src})"] = v[0]
            sw.append(res.scale_weights[0])
            cross.append(res.cross_scale[0])
            if "occlusion" in methods:
                t0 = time.perf_counter()
                maps["occlusion"] = occlusion(model, imgs[j], t_t, target_class=target, patch=occlusion_patch)
                timer.add("occlusion_stack", time.perf_counter() - t0)
            fig_path = out_dir / "stacks" / f"{_safe_name(f'{cid}__{stack_id}', used)}.png"
            p_stack = float(res.probs[0, target])
            title = (f"{cid} / stack {stack_id}: predicted {classes[target]} (over {len(st)} explained stack(s) "
                     f"{quoted_probability(bundle, mod['probs'], target)}; this stack {p_stack:.3f}, uncalibrated)"
                     + ("  [SYNTHETIC model]" if bundle.synthetic else ""))
            t0 = time.perf_counter()
            plot_stack_explanation(tl, mags, maps, fig_path, title=title, cross_scale=res.cross_scale[0],
                                   scale_weights=res.scale_weights[0])
            timer.add("figure", time.perf_counter() - t0)
            figures.append(fig_path)
            stack_figs.append(str(fig_path.relative_to(out_dir)))
        row = {CASE_ID: cid, "n_stacks": len(st), "figure": stack_figs[0] if stack_figs else "",
               "figures": ";".join(stack_figs)}
        if cases is not None and LABEL in cases.columns:
            row[LABEL] = cases.set_index(CASE_ID)[LABEL].get(cid, np.nan)
        row.update({"predicted": classes[target], "probability": mod["p_both"]})
        row.update({f"prob_{c}": float(mod["probs"][k]) for k, c in enumerate(classes)})
        W, C = np.mean(sw, 0), np.mean(cross, 0)
        for a, m in enumerate(mags):
            row[f"scale_weight_{m:g}x"] = float(W[a])
            for b, m2 in enumerate(mags):
                row[f"attn_{m:g}x_to_{m2:g}x"] = float(C[a, b])
        row.update({k: mod[k] for k in ("p_without_image", "p_without_tabular", "p_without_both", "delta_image",
                                       "delta_tabular")})
        if model.uses_tabular and t_row is not None:
            t0 = time.perf_counter()
            sh = explain_tabular(model, imgs, t_row, pre=pre, target_class=target, background=bg, method=shap_method,
                                 n_permutations=n_permutations, seed=seed)
            timer.add("shap", time.perf_counter() - t0)
            shap_rows.append((cid, sh))
            row.update({"shap_base": sh.base_value, "shap_fx": sh.fx, "shap_method": sh.method})
            _top_columns(row, top_features(sh, decode_values(pre, t_row), top_k), min(top_k, len(sh.names)))
        row["seconds"] = round(time.perf_counter() - t_case, 3)
        timer.add("case", time.perf_counter() - t_case)
        rows.append(row)
    return rows, shap_rows, figures, skipped, timer


#: How each network kind (breastfusion.models.registry) is explained: stacks of tiles or single images.
_EXPLAINERS = {"fusion": _explain_ultrasound, "multiscale": _explain_histology}


@dataclass
class ExplainedSelection:
    """Explanations of the cases chosen for a report, and what ``predict`` returns for them."""

    result: ExplainResult
    scored: pd.DataFrame  # the bundle's own predictions (calibrated when it is), indexed by case id
    out_dir: Path


def bundle_predictions(bundle, source: pd.DataFrame, *, cases: pd.DataFrame | None = None) -> pd.DataFrame:
    """What ``breastfusion predict`` returns for ``source`` with ``bundle`` (a path or a loaded bundle): the
    bundle's own predictor, so its calibrated probabilities, prediction sets and ``calibrated`` flag."""
    from breastfusion.bundles.bundle import Bundle, load_bundle
    from breastfusion.inference.predictor import predictor_for

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    return predictor_for(bundle, io_workers=1).predict(source, cases=cases)


def explain_selection(bundle, source: pd.DataFrame, selection: pd.DataFrame, out_dir: str | Path, *,
                      cases: pd.DataFrame | None = None, background: pd.DataFrame | None = None,
                      max_stacks: int = 1, seed: int = 0) -> ExplainedSelection | None:
    """Explain the ``selection`` (cases chosen from the out-of-fold predictions) with the final ``bundle``.

    ``source`` is the cases table (ultrasound) or the tiles table (histology, with ``cases`` the cases table);
    only the selected cases are read. ``background`` (a table with the bundle's input columns, one row per
    case) is the SHAP reference. Files go to ``out_dir``. ``None`` when nothing was selected."""
    from breastfusion.bundles.bundle import Bundle, load_bundle

    if selection is None or len(selection) == 0:
        return None
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    ids = selection[CASE_ID].astype(str).tolist()
    src = source[source[CASE_ID].astype(str).isin(set(ids))].copy()
    order = {c: i for i, c in enumerate(ids)}
    src = src.sort_values(CASE_ID, key=lambda s: s.astype(str).map(order), kind="stable")
    for sub in ("cases", "stacks"):  # figures of an earlier run's selection would be mistaken for this one's
        for old in (Path(out_dir) / sub).glob("*.png"):
            old.unlink()
    if background is not None and background.index.name == CASE_ID:
        background = background.reset_index()
    res = explain_bundle(bundle, src, out_dir, methods="all", cases=cases, background=background,
                         max_stacks=max_stacks, seed=seed)
    scored = bundle_predictions(bundle, src, cases=cases)
    scored = scored.assign(**{CASE_ID: scored[CASE_ID].astype(str)}).set_index(CASE_ID)
    return ExplainedSelection(res, scored, Path(out_dir))

