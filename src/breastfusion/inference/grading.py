"""Score new histology cases with a multiscale grading bundle.

Input: a tiles table (case_id, stack_id, magnification, image_path), a ``breastfusion tile`` output
(``tiles.csv`` of a slide) or a folder of tiles, plus optionally a cases table with the clinical columns the
bundle expects (absent columns count as missing, which the model was trained to tolerate). Pathomics are
recomputed from the highest-magnification tiles with the bundle's segmentation method, exactly as in training.

Output: one row per case (mean of its stacks' probabilities, as in training), ``last_stacks`` with every
stack's probabilities, cross-scale attention and scale weights, and ``last_skipped`` with each case that
could not be scored and why. A stack with an unreadable tile is dropped (logged); a case without any usable
stack is skipped; the batch goes on.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from breastfusion.bundles.bundle import Bundle
from breastfusion.data.cases import CASE_ID, LABEL, read_cases
from breastfusion.data.predictions import prediction_table, prob_columns
from breastfusion.data.tiles import STACK_ID, mag_column, stack_table
from breastfusion.errors import DataError
from breastfusion.inference.base import (
    ABSENT_CLINICAL,
    BundlePredictor,
    check_clinical_columns,
)

log = logging.getLogger(__name__)


class GradingPredictor(BundlePredictor):
    """Case grades from a histology bundle: stacks of tiles in, one row per case out (mean of its stacks'
    probabilities); per-stack probabilities, cross-scale attention and scale weights in ``extra_outputs()``."""

    kinds = ("multiscale",)
    inputs = "tiles"

    def __init__(self, bundle: Bundle, *, model: str | None = None, batch_size: int = 16, threads: int | None = None,
                 work_dir=None, backend: str = "torch", **_):
        if model:
            raise DataError(f"Bundle '{bundle.path}' is a histology grading bundle; it holds no classical model "
                            f"'{model}' (leave out --model).")
        from breastfusion.devices import configure_threads, select_device
        from breastfusion.training.stacks import TileCache

        self.bundle = bundle
        self.batch_size = batch_size
        self.work_dir = work_dir
        self.device = select_device()
        configure_threads(threads)
        self.model = bundle.model.to(self.device).eval()
        from breastfusion.inference.onnx_export import runtime_for

        self.backend = backend
        self.onnx = runtime_for(bundle, backend)
        self.mags = [float(m) for m in bundle.meta["model"]["magnifications"]]
        im = bundle.meta["image"]
        normalizer = None
        if im.get("stain_normalization"):
            from breastfusion.data.stain import StainNormalizer

            normalizer = StainNormalizer.from_dict(im["stain_normalization"])
        self.cache = TileCache(int(im["size"]), normalizer)
        feats = bundle.meta.get("features") or {}
        self.pathomics = feats.get("pathomics")
        self.clinical = list(feats.get("clinical_columns") or [])
        self.model_name = "deep_multiscale"
        self.last_skipped = pd.DataFrame(columns=[CASE_ID, "image_path", "reason"])
        self.last_stacks = pd.DataFrame()
        self.last_absent: list[str] = []

    def extra_outputs(self) -> dict[str, pd.DataFrame]:
        """``stacks``: per-stack probabilities, cross-scale attention and scale weights of the last call."""
        return {"stacks": self.last_stacks}

    def _case_table(self, tiles: pd.DataFrame, cases: pd.DataFrame | None, progress: bool) -> pd.DataFrame | None:
        if self.bundle.tabular is None:
            return None
        ids = sorted(tiles[CASE_ID].astype(str).unique())
        table = pd.DataFrame(index=pd.Index(ids, name=CASE_ID))
        if cases is not None and self.clinical:
            c = cases.set_index(CASE_ID)
            for col in self.clinical:
                if col in c.columns:
                    table[col] = c[col].reindex(ids).to_numpy()
        if self.pathomics:
            from breastfusion.features.pathomics_extract import (
                case_pathomics,
                extract_tile_pathomics,
            )

            with tempfile.TemporaryDirectory(prefix="bf_pathomics_") as tmp:
                out = Path(self.work_dir) if self.work_dir else Path(tmp)
                tf = extract_tile_pathomics(tiles, out, magnification=max(self.mags), method=self.pathomics["method"],
                                            progress=progress)
            if len(tf):
                pf = case_pathomics(tf)
                pf.index = pf.index.astype(str)
                table = table.join(pf, how="left")
        return table

    def predict(self, source, *, cases: str | Path | pd.DataFrame | None = None, progress: bool = False,
                strict: bool = False) -> pd.DataFrame:
        """Grade the cases of a tiles table, a ``breastfusion tile`` output or a folder of tiles. ``cases``: a
        table with the clinical columns the bundle reads (absent ones are scored as unknown and named in
        ``absent_clinical_columns``; ``strict=True`` refuses such a table)."""
        from torch.utils.data import DataLoader

        from breastfusion.data.tiling import tiles_from_input
        from breastfusion.training.stacks import StackDataset

        tiles = source if isinstance(source, pd.DataFrame) else tiles_from_input(source)
        source_name = f"cases table '{cases}'" if cases is not None and not isinstance(cases, pd.DataFrame) \
            else "cases table"
        if cases is not None and not isinstance(cases, pd.DataFrame):
            cases = read_cases(cases, require_labels=False, require_images=False, check_files=False)
        self.last_absent = []
        if self.clinical and self.bundle.tabular is not None:
            if cases is None:
                log.info("no cases table: scored as 'no clinical data' (the bundle also reads %s).", self.clinical)
            else:
                self.last_absent = check_clinical_columns(self.clinical, cases.columns, source=source_name,
                                                          model=self.model_name, strict=strict)
        skipped: dict[str, str] = {}
        all_ids = list(dict.fromkeys(tiles[CASE_ID].astype(str)))
        try:
            stacks = stack_table(tiles, self.mags)
        except DataError as exc:
            stacks = pd.DataFrame(columns=[CASE_ID, STACK_ID] + [mag_column(m) for m in self.mags])
            log.warning("%s", exc)
        paths = stacks[[mag_column(m) for m in self.mags]].to_numpy().tolist()
        ok = self.cache.usable(paths)
        stacks = stacks[ok].reset_index(drop=True)
        for cid in all_ids:
            if cid not in set(stacks[CASE_ID]):
                skipped[cid] = (f"no stack with every magnification {[f'{m:g}x' for m in self.mags]} "
                                "and readable tiles")
        table = self._case_table(tiles[tiles[CASE_ID].isin(set(stacks[CASE_ID]))], cases, progress)
        tab = None
        if self.bundle.tabular is not None:
            rows = table.reindex(stacks[CASE_ID].astype(str))
            tab = self.bundle.tabular.transform(rows, row_ids=rows.index.tolist(), source="case features")
        ds = StackDataset(stacks[[mag_column(m) for m in self.mags]].to_numpy().tolist(), tab, None, cache=self.cache)
        probs, cross, sw = [], [], []
        with torch.no_grad():
            for image, t, _, _ in DataLoader(ds, batch_size=self.batch_size, shuffle=False):
                if self.onnx is not None:
                    o = self.onnx.outputs(image.numpy(), t.numpy() if self.model.uses_tabular else None)
                    probs.append(o["probabilities"].astype(np.float64))
                    cross.append(o["cross_scale"])
                    sw.append(o["scale_weights"])
                    continue
                out, att = self.model(image.to(self.device), t.to(self.device) if self.model.uses_tabular else None,
                                      return_attention=True)
                probs.append(self.model.probabilities(out).double().cpu().numpy())
                cross.append(att["cross_scale"].float().cpu().numpy())
                sw.append(att["scale_weights"].float().cpu().numpy())
        K = len(self.classes)
        P = np.concatenate(probs) if probs else np.zeros((0, K))
        st = stacks[[CASE_ID, STACK_ID]].copy()
        for j, c in enumerate(self.classes):
            st[f"prob_{c}"] = P[:, j]
        if probs:
            C, W = np.concatenate(cross), np.concatenate(sw)
            for i, m in enumerate(self.mags):
                st[f"scale_weight_{m:g}x"] = W[:, i]
                for j, m2 in enumerate(self.mags):
                    st[f"attn_{m:g}x_to_{m2:g}x"] = C[:, i, j]
        self.last_stacks = st
        prob_cols = prob_columns(self.classes)
        case_p = st.groupby(CASE_ID, sort=False)[prob_cols].mean()
        n_st = st.groupby(CASE_ID, sort=False).size()
        for cid, reason in skipped.items():
            log.warning("skipped case '%s': %s", cid, reason)
        self.last_skipped = pd.DataFrame([{CASE_ID: c, "image_path": "", "reason": r} for c, r in skipped.items()],
                                         columns=[CASE_ID, "image_path", "reason"])
        ids = case_p.index.to_numpy()
        where = {}
        if cases is not None and LABEL in cases.columns:
            where[LABEL] = pd.Series(ids).map(cases.set_index(CASE_ID)[LABEL]).to_numpy()
        where["n_stacks"] = n_st.reindex(ids).to_numpy()
        out = prediction_table(ids, case_p.to_numpy(), self.classes, model=self.model_name, **where)
        cal = self.bundle.meta.get("calibration")
        if cal and len(out):
            from breastfusion.evaluation.calibration import apply_bundle_calibration

            Pc, sets, size, refer = apply_bundle_calibration(out[prob_cols].to_numpy(dtype=float), cal, self.classes)
            out[prob_cols] = Pc
            from breastfusion.evaluation.calibration import calibration_status

            out["prediction_set"], out["set_size"], out["refer"] = sets, size, refer
            out["calibrated"] = calibration_status(cal)[0]  # False when the temperature fit was refused (T = 1)
        if self.last_absent:
            out[ABSENT_CLINICAL] = ", ".join(self.last_absent)
        if self.bundle.synthetic:
            out["synthetic_model"] = True
        return out
