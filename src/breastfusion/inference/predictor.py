"""Score new cases with a bundle: one image, a folder of images, or a cases table.

Every input row is either scored or skipped with a logged reason naming the file or row; one bad item never
loses the batch, and output files are written atomically (no half-written files).
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, LABEL, MASK_PATH, MASK_SEP, read_cases
from breastfusion.errors import DataError
from breastfusion.inference.bundle import Bundle, load_bundle
from breastfusion.training.data import load_resized
from breastfusion.utils import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
TABLE_SUFFIXES = {".csv", ".tsv", ".parquet", ".pq"}
_MASK_RE = re.compile(r"^(?P<stem>.+?)_mask(?:_\d+)?$", re.IGNORECASE)


def cases_from_input(path: str | Path) -> pd.DataFrame:
    """Turn an image file, a folder of images (masks ``<stem>_mask*.png`` beside them are used) or a cases
    table into a cases table without labels required. Files are checked later, row by row."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Input not found: '{path}'.")
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return read_cases(path, require_labels=False, check_files=False)
    if path.is_file():
        return pd.DataFrame({CASE_ID: [path.stem], IMAGE_PATH: [str(path.resolve())], MASK_PATH: [np.nan]})
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    masks: dict[tuple[Path, str], list[Path]] = {}
    images = []
    for f in files:
        m = _MASK_RE.match(f.stem)
        if m:
            masks.setdefault((f.parent, m.group("stem")), []).append(f)
        else:
            images.append(f)
    if not images:
        raise DataError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under '{path}'.")
    rows = []
    for f in images:
        ms = masks.get((f.parent, f.stem))
        rows.append({CASE_ID: str(f.relative_to(path).with_suffix("")), IMAGE_PATH: str(f.resolve()),
                     MASK_PATH: MASK_SEP.join(str(m.resolve()) for m in sorted(ms)) if ms else np.nan})
    return pd.DataFrame(rows)


class Predictor:
    """Class probabilities from a bundle. ``Predictor.load(path).predict(input)`` returns a DataFrame with
    ``case_id, image_path, prob_<class>..., predicted`` (and ``label`` when the input had one).

    ``backend="onnx"`` runs the deep model's forward pass in ONNX Runtime (CPU, ``threads`` intra-op threads)
    from the bundle's ``model.onnx`` (``breastfusion export BUNDLE``; see :mod:`breastfusion.inference.onnx_export`);
    a classical ``model`` ignores it."""

    def __init__(self, bundle: Bundle, *, model: str | None = None, batch_size: int = 32, threads: int | None = None,
                 io_workers: int = 2, backend: str = "torch"):
        from breastfusion.training.trainer import configure_threads, select_device

        self.bundle = bundle
        self.batch_size = batch_size
        self.io_workers = io_workers
        self.device = select_device()
        configure_threads(threads)
        self.model = bundle.model.to(self.device).eval()
        if self.model.uses_image:
            self.model.to(memory_format=torch.channels_last)
        im = bundle.meta["image"]
        self.size = int(im["size"])
        self.mean = torch.tensor(im["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(im["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self._mean_np, self._std_np = self.mean.numpy(), self.std.numpy()
        self.radiomics = (bundle.meta.get("features") or {}).get("radiomics")
        self.last_skipped: pd.DataFrame = pd.DataFrame(columns=[CASE_ID, IMAGE_PATH, "reason"])
        self.classical = None
        self.model_name = bundle.meta["model"]["variant"]
        if model is not None and model != self.model_name:
            self._load_classical(model)
        from breastfusion.inference.onnx_export import runtime_for

        self.backend = backend
        self.onnx = runtime_for(bundle, backend, load=self.classical is None)  # a classical model needs no network

    def _load_classical(self, name: str) -> None:
        from breastfusion.errors import BundleError
        from breastfusion.models.classical import load_classical

        info = (self.bundle.meta.get("features") or {}).get("classical") or {}
        known = [self.model_name] + list(info.get("models", []))
        if name not in info.get("models", []):
            raise BundleError(f"Bundle '{self.bundle.path}' has no model '{name}'; it holds: {', '.join(known)}.")
        self.classical = load_classical(self.bundle.path / "classical" / f"{name}.skops")
        self.classical_features = list(info["features"])
        self.model_name = name

    @classmethod
    def load(cls, path: str | Path, **kwargs):
        """A Predictor, or a :class:`~breastfusion.inference.grading.GradingPredictor` for a histology bundle."""
        bundle = load_bundle(path)
        if bundle.meta["model"].get("kind") == "multiscale":
            from breastfusion.inference.grading import GradingPredictor

            if kwargs.get("model"):
                raise DataError(f"Bundle '{path}' is a histology grading bundle; it holds no classical model "
                                f"'{kwargs['model']}' (leave out --model).")
            return GradingPredictor(bundle, **{k: v for k, v in kwargs.items() if k != "model"})
        return cls(bundle, **kwargs)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    # -- row preparation ---------------------------------------------------------------------------------

    def _tabular_table(self, cases: pd.DataFrame, skipped: dict, columns: list[str]) -> pd.DataFrame:
        """Clinical columns of the input plus radiomics recomputed from its masks (bad rows go to ``skipped``)."""
        table = cases.set_index(CASE_ID).reindex(columns=[c for c in columns if c in cases.columns])
        if self.radiomics:
            from breastfusion.features.radiomics import extract_case

            rad_rows = []
            masks = cases[MASK_PATH] if MASK_PATH in cases.columns else [np.nan] * len(cases)
            for cid, img, msk in zip(cases[CASE_ID], cases[IMAGE_PATH], masks):
                try:
                    rad_rows.append(extract_case(img, msk))
                except Exception as exc:  # noqa: BLE001 - reported per row
                    skipped[cid] = f"radiomics: {exc}"
                    rad_rows.append({})
            rad = pd.DataFrame(rad_rows, index=table.index)
            table = table.join(rad.drop(columns=[c for c in rad.columns if c in table.columns]), how="left")
        return table

    def _tabular_rows(self, cases: pd.DataFrame, skipped: dict) -> np.ndarray | None:
        pre = self.bundle.tabular
        if pre is None:
            return None
        table = self._tabular_table(cases, skipped, pre.columns_)
        try:  # the whole table at once; row by row only to find the bad rows
            return pre.transform(table, row_ids=list(table.index), source="input")
        except DataError:
            pass
        out = np.zeros((len(cases), pre.n_features_out_), dtype=np.float32)
        for i, cid in enumerate(table.index):
            if cid in skipped:
                continue
            try:
                out[i] = pre.transform(table.iloc[[i]], row_ids=[cid], source="input")[0]
            except DataError as exc:
                skipped[cid] = str(exc)
        return out

    def _predict_classical(self, cases: pd.DataFrame, skipped: dict) -> np.ndarray:
        from breastfusion.models.classical import predict_proba_frame
        from breastfusion.tabular_inputs import numeric_like

        clinical = (self.bundle.meta.get("features") or {}).get("clinical_columns", [])
        table = self._tabular_table(cases, skipped, clinical)
        probs = np.full((len(cases), len(self.classes)), np.nan)
        rows, good = [], []
        for i, cid in enumerate(table.index):
            if cid in skipped:
                continue
            try:
                rows.append(numeric_like(table.iloc[[i]], self.classical_features))
                good.append(i)
            except DataError as exc:
                skipped[cid] = str(exc)
        if good:
            probs[good] = predict_proba_frame(self.classical, pd.concat(rows), self.classes).to_numpy()
        return probs

    def _load_image(self, path: str) -> np.ndarray:
        return load_resized(path, self.size)

    # -- scoring ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _forward(self, images: list[np.ndarray] | None, tab: np.ndarray | None) -> np.ndarray:
        x_img = None
        if self.onnx is not None:
            # NumPy, not torch, for the ONNX path: a torch op here wakes torch's OpenMP threads, which then
            # busy-wait on the cores ONNX Runtime needs (measured: 28 ms instead of 20 ms per image at batch 1).
            if images is not None:
                g = np.stack(images).astype(np.float32)[:, None] / np.float32(255.0)  # (B, 1, H, W)
                x_img = (g - self._mean_np) / self._std_np  # broadcasts to (B, 3, H, W)
            return self.onnx(x_img, tab)
        if images is not None:
            x = torch.from_numpy(np.stack(images)).float().div_(255.0).unsqueeze(1)
            x_img = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        if x_img is not None:
            x_img = x_img.contiguous(memory_format=torch.channels_last).to(self.device)
        x_tab = torch.from_numpy(tab).to(self.device) if tab is not None else None
        return torch.softmax(self.model(x_img, x_tab).float(), dim=1).cpu().numpy()

    def predict_cases(self, cases: pd.DataFrame, *, progress: bool = False) -> pd.DataFrame:
        """Score a cases table. Bad rows are skipped and listed in ``self.last_skipped`` (and logged)."""
        from tqdm.auto import tqdm

        if len(cases) == 0:
            raise DataError("Nothing to predict: the input holds no cases.")
        cases = cases.reset_index(drop=True).copy()
        cases[CASE_ID] = cases[CASE_ID].astype(str)
        if cases[CASE_ID].duplicated().any():
            dup = cases.loc[cases[CASE_ID].duplicated(), CASE_ID].iloc[0]
            raise DataError(f"Input case_id '{dup}' appears more than once; case ids must be unique.")
        skipped: dict[str, str] = {}
        if self.classical is not None:
            return self._finish(cases, self._predict_classical(cases, skipped), skipped)
        tab = self._tabular_rows(cases, skipped) if self.model.uses_tabular else None
        uses_image = self.model.uses_image
        probs = np.full((len(cases), len(self.classes)), np.nan)
        order = [i for i in range(len(cases)) if cases.at[i, CASE_ID] not in skipped]
        chunks = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        bar = tqdm(total=len(order), desc="predict", unit="img", disable=not progress)
        with ThreadPoolExecutor(max_workers=self.io_workers) as pool:
            def submit(chunk):
                return [pool.submit(self._load_image, cases.at[i, IMAGE_PATH]) for i in chunk] if uses_image else None

            pending = submit(chunks[0]) if chunks else None
            for k, chunk in enumerate(chunks):
                futures = pending
                pending = submit(chunks[k + 1]) if k + 1 < len(chunks) else None  # decode ahead while computing
                good, images = [], []
                for i, fut in zip(chunk, futures or [None] * len(chunk)):
                    if fut is None:
                        good.append(i)
                        continue
                    try:
                        images.append(fut.result())
                        good.append(i)
                    except Exception as exc:  # noqa: BLE001 - one bad file never loses the batch
                        skipped[cases.at[i, CASE_ID]] = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
                if good:
                    probs[good] = self._forward(images if uses_image else None, tab[good] if tab is not None else None)
                bar.update(len(chunk))
        bar.close()
        return self._finish(cases, probs, skipped)

    def _finish(self, cases: pd.DataFrame, probs: np.ndarray, skipped: dict) -> pd.DataFrame:
        for cid, reason in skipped.items():
            log.warning("skipped case '%s': %s", cid, reason)
        self.last_skipped = pd.DataFrame(
            [{CASE_ID: cid, IMAGE_PATH: cases.loc[cases[CASE_ID] == cid, IMAGE_PATH].iloc[0], "reason": r}
             for cid, r in skipped.items()], columns=[CASE_ID, IMAGE_PATH, "reason"])
        ok = ~cases[CASE_ID].isin(skipped).to_numpy()
        cal = self.bundle.meta.get("calibration") if self.classical is None else None
        sets = None
        if cal and ok.any():
            from breastfusion.evaluation.calibration import apply_bundle_calibration

            # temperature-scaled probabilities (argmax unchanged) and the conformal prediction set
            Pc, set_str, set_size, refer = apply_bundle_calibration(probs[ok], cal, self.classes)
            probs = probs.copy()
            probs[ok] = Pc
            sets = (set_str, set_size, refer)
        out = pd.DataFrame({CASE_ID: cases[CASE_ID], IMAGE_PATH: cases[IMAGE_PATH]})
        if LABEL in cases.columns:
            out[LABEL] = cases[LABEL]
        for j, c in enumerate(self.classes):
            out[f"prob_{c}"] = probs[:, j]
        out = out[ok].reset_index(drop=True)
        out["predicted"] = np.asarray(self.classes, dtype=object)[probs[ok].argmax(1)] if ok.any() else []
        out["model"] = self.model_name
        if sets is not None:
            out["prediction_set"], out["set_size"], out["refer"] = sets
            out["calibrated"] = True
        if self.bundle.synthetic:
            out["synthetic_model"] = True
        return out

    def predict(self, source: str | Path | pd.DataFrame, *, progress: bool = False) -> pd.DataFrame:
        cases = source if isinstance(source, pd.DataFrame) else cases_from_input(source)
        return self.predict_cases(cases, progress=progress)


def write_predictions(preds: pd.DataFrame, skipped: pd.DataFrame, out: str | Path) -> tuple[Path, Path | None]:
    """Write predictions (CSV or Parquet by suffix) and, when rows were skipped, ``<out>.skipped.csv``."""
    out = Path(out)
    with atomic_path(out) as tmp:
        if out.suffix.lower() in (".parquet", ".pq"):
            preds.to_parquet(tmp, index=False)
        else:
            preds.to_csv(tmp, index=False)
    skipped_path = out.with_name(out.name + ".skipped.csv")
    if len(skipped):
        with atomic_path(skipped_path) as tmp:
            skipped.to_csv(tmp, index=False)
        return out, skipped_path
    if skipped_path.exists():
        skipped_path.unlink()  # a stale list from an earlier run would mislead
    return out, None
