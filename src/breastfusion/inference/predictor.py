"""Score new cases with a bundle: one image, a folder of images, or a cases table.

Every input row is either scored or skipped with a logged reason naming the file or row; one bad item never
loses the batch, and output files are written atomically (no half-written files).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from breastfusion.bundles.bundle import Bundle, load_bundle
from breastfusion.data.cases import (
    CASE_ID,
    IMAGE_PATH,
    LABEL,
    MASK_PATH,
    MASK_SEP,
    read_cases,
)
from breastfusion.data.cleaning import load_for_scoring
from breastfusion.data.images import MAX_SCORED_PIXELS
from breastfusion.data.predictions import prediction_table
from breastfusion.errors import BundleError, DataError
from breastfusion.inference.base import (
    ABSENT_CLINICAL,
    BundlePredictor,
    check_clinical_columns,
)
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


#: Optional input column: box(es) around the lesion, "x0,y0,x1,y1" in pixels (several joined with ';'), used
#: when a case has no mask (LiteMedSAM, zero-shot; see breastfusion.segmentation.resolve).
BBOX = "bbox"


def _mask_reference(value) -> bool:
    """Whether a mask_path cell says anything: mask file(s), or '' ("no lesion"); NaN/None says nothing."""
    from breastfusion.features.radiomics import _mask_paths

    return _mask_paths(value) is not None


def _mask_given(value) -> bool:
    """Whether a mask_path cell names at least one mask file ('' is "no lesion", NaN "no mask")."""
    from breastfusion.features.radiomics import _mask_paths

    return bool(_mask_paths(value))


class Predictor(BundlePredictor):
    """Class probabilities from a bundle. ``Predictor.load(path).predict(input)`` returns a DataFrame with
    ``case_id, image_path, prob_<class>..., predicted`` (and ``label`` when the input had one).

    ``backend="onnx"`` runs the deep model's forward pass in ONNX Runtime (CPU, ``threads`` intra-op threads)
    from the bundle's ``model.onnx`` (``breastfusion export BUNDLE``; see :mod:`breastfusion.inference.onnx_export`);
    a classical ``model`` ignores it."""

    def __init__(self, bundle: Bundle, *, model: str | None = None, batch_size: int = 32, threads: int | None = None,
                 io_workers: int = 2, backend: str = "torch"):
        from breastfusion.devices import configure_threads, select_device

        self.bundle = bundle
        self.batch_size = batch_size
        self.io_workers = io_workers
        self.device = select_device()
        configure_threads(threads)
        self.model = bundle.model.to(self.device).eval()
        if self.model.uses_image:
            self.model.to(memory_format=torch.channels_last)
        im = bundle.meta["image"]
        from breastfusion.data.cleaning import meta_mode

        self.clean = meta_mode(im.get("clean"))  # the cleaning its network was trained with ('none' for old bundles)
        self.size = int(im["size"])
        self.mean = torch.tensor(im["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(im["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self._mean_np, self._std_np = self.mean.numpy(), self.std.numpy()
        self.radiomics = (bundle.meta.get("features") or {}).get("radiomics")
        self.segmenter_info = (bundle.meta.get("features") or {}).get("segmenter")
        self._segmenter = None  # loaded on first use
        self.last_mask_source: dict[str, str] = {}  # case id -> expert | predicted | none (radiomics bundles)
        self.last_skipped: pd.DataFrame = pd.DataFrame(columns=[CASE_ID, IMAGE_PATH, "reason"])
        self.last_absent: list[str] = []  # clinical columns the last input table lacked
        self.classical = None
        self.model_name = bundle.meta["model"]["variant"]
        if model is not None and model != self.model_name:
            self._load_classical(model)
        from breastfusion.inference.onnx_export import runtime_for

        self.backend = backend
        self.onnx = runtime_for(bundle, backend, load=self.classical is None)  # a classical model needs no network

    def _load_classical(self, name: str) -> None:
        from breastfusion.models.classical import load_classical

        info = (self.bundle.meta.get("features") or {}).get("classical") or {}
        known = [self.model_name] + list(info.get("models", []))
        if name not in info.get("models", []):
            raise BundleError(f"Bundle '{self.bundle.path}' has no model '{name}'; it holds: {', '.join(known)}.")
        self.classical = load_classical(self.bundle.path / "classical" / f"{name}.skops")
        self.classical_features = list(info["features"])
        self.model_name = name

    kinds = ("fusion",)
    inputs = "images"

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> BundlePredictor:
        """The predictor made for the bundle at ``path``, whatever its network kind: this class for ultrasound
        bundles, :class:`~breastfusion.inference.grading.GradingPredictor` for histology ones (one interface,
        :class:`~breastfusion.inference.base.BundlePredictor`)."""
        return predictor_for(load_bundle(path), **kwargs)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def expected_clinical(self) -> list[str]:
        """Clinical columns the chosen model reads from an input table (radiomics come from the masks)."""
        if self.classical is None and (not self.model.uses_tabular or self.bundle.tabular is None):
            return []
        cols = (self.bundle.meta.get("features") or {}).get("clinical_columns")
        if cols is None and self.bundle.tabular is not None:  # bundles without the list: preprocessor less radiomics
            rad = set((self.radiomics or {}).get("columns") or [])
            cols = [c for c in self.bundle.tabular.columns_ if c not in rad and not str(c).startswith("rad_")]
        return list(cols or [])

    # -- row preparation ---------------------------------------------------------------------------------

    def _tabular_table(self, cases: pd.DataFrame, skipped: dict, columns: list[str]) -> pd.DataFrame:
        """Clinical columns of the input plus radiomics recomputed from its masks (bad rows go to ``skipped``)."""
        table = cases.set_index(CASE_ID).reindex(columns=[c for c in columns if c in cases.columns])
        if self.radiomics:
            from breastfusion.features.radiomics import extract_case

            rad_rows = []
            masks = cases[MASK_PATH] if MASK_PATH in cases.columns else [np.nan] * len(cases)
            # a bundle whose shape features are in mm reads each case's pixel size as training did
            size_col = self.radiomics.get("pixel_size_column") if self.radiomics.get("units") == "mm" else None
            sizes = cases[size_col] if size_col in cases.columns else [np.nan] * len(cases)
            boxes = cases[BBOX] if BBOX in cases.columns else [np.nan] * len(cases)
            no_mask = []
            for row, (cid, img, msk, box, size) in enumerate(zip(cases[CASE_ID], cases[IMAGE_PATH], masks, boxes,
                                                                 sizes)):
                # the order of breastfusion.segmentation.resolve: given mask, box (LiteMedSAM), segmenter, none
                given = _mask_reference(msk)  # '' = the user says "no lesion"; NaN = no mask at all
                has_box = not given and isinstance(box, str) and box.strip() != ""
                source = ("expert" if given else "box" if has_box else "predicted" if self.segmenter_info
                          else "none")
                self.last_mask_source[str(cid)] = source
                try:
                    spacing = None
                    if size_col and (source in ("predicted", "box") or _mask_given(msk)):
                        from breastfusion.features.radiomics import case_spacing_mm

                        spacing = case_spacing_mm(size, size_col, self.radiomics.get("pixel_size_unit", "mm"))
                    if source in ("predicted", "box"):
                        where = f"row {row + 1} (case '{cid}'), column '{BBOX}'"
                        rad_rows.append(self._segmented_radiomics(img, spacing, box if has_box else None, where))
                    elif source == "none":  # unknown, never "no lesion": every radiomics value missing
                        no_mask.append(str(cid))
                        rad_rows.append({c: np.nan for c in self.radiomics.get("columns") or []})
                    else:
                        rad_rows.append(extract_case(img, msk, spacing))
                except Exception as exc:  # noqa: BLE001 - reported per row
                    skipped[cid] = f"radiomics: {exc}"
                    rad_rows.append({})
            if no_mask:
                log.warning("%d case(s) came without a lesion mask (%s%s) and this bundle carries no segmenter (it was "
                            "trained with data.masks: %s): their lesion radiomics are scored as UNKNOWN, not as 'no "
                            "lesion' (column mask_source = none). Give masks, or use a bundle trained with "
                            "data.masks: predicted.", len(no_mask), ", ".join(no_mask[:5]),
                            " ..." if len(no_mask) > 5 else "", (self.bundle.meta.get("features") or {}).get(
                                "masks", "expert"))
            rad = pd.DataFrame(rad_rows, index=table.index)
            table = table.join(rad.drop(columns=[c for c in rad.columns if c in table.columns]), how="left")
        return table

    @property
    def segmenter(self):
        """The bundle's lesion segmenter (bundles trained with ``data.masks: predicted``), loaded on first use."""
        if self._segmenter is None and self.segmenter_info:
            from breastfusion.segmentation import load_lesion_segmenter

            self._segmenter = load_lesion_segmenter(self.bundle.path / self.segmenter_info["file"])
        return self._segmenter

    def _segmented_radiomics(self, image_path, spacing_mm: float | None, boxes, where: str) -> dict:
        """Radiomics of an image given without a mask: its lesions from the ``bbox`` box(es) (LiteMedSAM) or
        else from the bundle's segmenter, read exactly as training read the out-of-fold mask files."""
        from breastfusion.data.images import read_image
        from breastfusion.features.radiomics import extract_arrays
        from breastfusion.segmentation.resolve import (
            masks_from_boxes,
            masks_from_segmenter,
        )

        gray = read_image(image_path, "gray")
        if boxes is not None:
            masks = masks_from_boxes(gray, boxes, where=where)
        else:
            masks = masks_from_segmenter(gray, self.segmenter,
                                         require_lesion=bool(self.segmenter_info.get("require_lesion", False)))
        return extract_arrays(gray * np.float32(255.0), masks, source=f"'{image_path}'", spacing_mm=spacing_mm)

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
        # Read cells as training did: the run's missing tokens and the text it read as missing, both recorded
        # by the bundle's fitted preprocessing (bundles without it: the defaults).
        # Multi-valued and ordinal columns likewise (their separator and levels); the classical models' own record
        # of them wins (a bundle whose deep model reads no table has no fitted preprocessing).
        from breastfusion.tabular_inputs import classical_reading

        reading = classical_reading(self.bundle.tabular)
        stored = ((self.bundle.meta.get("features") or {}).get("classical") or {}).get("reading")
        if stored:
            reading.update(stored)
        rows, good = [], []
        for i, cid in enumerate(table.index):
            if cid in skipped:
                continue
            try:
                rows.append(numeric_like(table.iloc[[i]], self.classical_features, **reading))
                good.append(i)
            except DataError as exc:
                skipped[cid] = str(exc)
        if good:
            probs[good] = predict_proba_frame(self.classical, pd.concat(rows), self.classes).to_numpy()
        return probs

    #: Largest image scored (width x height), as ``serve --max-pixels``; checked before decoding.
    max_pixels: int | None = MAX_SCORED_PIXELS

    def _load_image(self, path: str) -> np.ndarray:
        # training's load_resized, decoded with bounded memory; too small, blank and too large images are skipped
        return load_for_scoring(path, self.size, max_pixels=self.max_pixels, clean=self.clean)

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

    def predict_cases(self, cases: pd.DataFrame, *, progress: bool = False, strict: bool = False,
                      source: str = "input table", images_only: bool = False) -> pd.DataFrame:
        """Score a cases table. Bad rows are skipped and listed in ``self.last_skipped`` (and logged).

        Clinical columns the model reads but the table lacks are scored as unknown, logged, and named in an
        ``absent_clinical_columns`` output column; ``strict=True`` refuses such a table instead. ``images_only``:
        the input was images without a table, the documented "no clinical data" case (said once, in the log)."""
        from tqdm.auto import tqdm

        if len(cases) == 0:
            raise DataError("Nothing to predict: the input holds no cases.")
        self.last_absent = []
        self.last_mask_source = {}
        expected = self.expected_clinical
        if expected and images_only:
            log.info("%s is image(s) without a table: scored as 'no clinical data' (model '%s' also reads %s; "
                     "give a cases table with those columns to use them).", source, self.model_name, expected)
        elif expected:
            self.last_absent = check_clinical_columns(expected, cases.columns, source=source, model=self.model_name,
                                                      strict=strict)
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
        scored = cases[ok]
        where = {IMAGE_PATH: scored[IMAGE_PATH].to_numpy()}
        if LABEL in cases.columns:
            where[LABEL] = scored[LABEL].to_numpy()
        out = prediction_table(scored[CASE_ID].to_numpy(), probs[ok].reshape(-1, len(self.classes)), self.classes,
                               model=self.model_name, **where)
        if self.last_absent:
            out[ABSENT_CLINICAL] = ", ".join(map(str, self.last_absent))
        if self.radiomics and self.last_mask_source and (self.classical is not None or self.model.uses_tabular):
            out["mask_source"] = out[CASE_ID].map(self.last_mask_source)  # expert | box | predicted | none
        if sets is not None:
            out["prediction_set"], out["set_size"], out["refer"] = sets
            from breastfusion.evaluation.calibration import calibration_status

            out["calibrated"] = calibration_status(cal)[0]  # False when the temperature fit was refused (T = 1)
        if self.bundle.synthetic:
            out["synthetic_model"] = True
        return out

    def predict(self, source: str | Path | pd.DataFrame, *, cases=None, progress: bool = False,
                strict: bool = False) -> pd.DataFrame:
        """Score an image, a folder of images, a cases table file or a DataFrame; ``strict``: refuse a table
        that lacks clinical columns the model reads (see :meth:`predict_cases`). ``cases`` is for bundles whose
        input is tiles; here the cases table is the input itself."""
        if cases is not None:
            raise DataError("An ultrasound bundle reads its clinical columns from the input itself (a cases table); "
                            "a separate cases table is for histology bundles.")
        if isinstance(source, pd.DataFrame):
            return self.predict_cases(source, progress=progress, strict=strict)
        path = Path(source)
        images_only = not (path.is_file() and path.suffix.lower() in TABLE_SUFFIXES)
        return self.predict_cases(cases_from_input(path), progress=progress, strict=strict,
                                  source=f"input '{path}'", images_only=images_only)


def predictor_classes() -> tuple[type[BundlePredictor], ...]:
    """Every bundle predictor; a new network kind adds its predictor here."""
    from breastfusion.inference.grading import GradingPredictor

    return (Predictor, GradingPredictor)


def predictor_class(meta: dict) -> type[BundlePredictor]:
    """The predictor class made for the network kind of bundle metadata ``meta``."""
    from breastfusion.models.registry import kind_name, network_kind

    network_kind(meta)  # an unknown kind is refused with the upgrade message
    kind = kind_name(meta)
    for cls in predictor_classes():
        if kind in cls.kinds:
            return cls
    raise BundleError(f"No predictor scores networks of kind '{kind}'.")


def predictor_for(bundle: Bundle, **kwargs) -> BundlePredictor:
    """The predictor made for an already-loaded bundle's network kind."""
    return predictor_class(bundle.meta)(bundle, **kwargs)


def _has_openpyxl() -> bool:
    return importlib.util.find_spec("openpyxl") is not None


def _writers() -> dict:
    w = {".csv": lambda df, p: df.to_csv(p, index=False),
         ".tsv": lambda df, p: df.to_csv(p, index=False, sep="\t"),
         ".parquet": lambda df, p: df.to_parquet(p, index=False),
         ".pq": lambda df, p: df.to_parquet(p, index=False)}
    if _has_openpyxl():
        w[".xlsx"] = lambda df, p: df.to_excel(p, index=False, engine="openpyxl")
    return w


def _writer_for(out: Path):
    writers = _writers()
    suffix = out.suffix.lower()
    if suffix not in writers:
        hint = " (.xlsx needs the openpyxl package: pip install openpyxl)" if suffix in (".xlsx", ".xls") and \
            ".xlsx" not in writers else ""
        raise DataError(f"Output '{out}': unsupported file type '{suffix or '(no extension)'}'{hint}; "
                        f"supported: {', '.join(writers)}.")
    return writers[suffix]


def check_output_path(out: str | Path) -> Path:
    """Check, before any work, that predictions can be written to ``out``: a supported file type, not a folder,
    under a folder that exists or can be made, and writable (probed with a temporary file, which also catches a
    read-only file system for root)."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"Output '{out}' is a folder; give a file name, e.g. '{out / 'predictions.csv'}'.")
    _writer_for(out)
    for anc in (out.parent, *out.parent.parents):
        if anc.exists():
            if not anc.is_dir():
                raise DataError(f"Output '{out}' cannot be written: '{anc}' is a file, not a folder.")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DataError(f"Output '{out}' cannot be written: {exc.strerror or exc} "
                        f"(folder '{out.parent}').") from None
    return out


def write_predictions(preds: pd.DataFrame, skipped: pd.DataFrame, out: str | Path) -> tuple[Path, Path | None]:
    """Write predictions (CSV, TSV, Parquet, or Excel when openpyxl is installed, by suffix; any other suffix is
    refused) and, when rows were skipped, ``<out>.skipped.csv``."""
    out = Path(out)
    writer = _writer_for(out)
    with atomic_path(out) as tmp:
        writer(preds, tmp)
    skipped_path = out.with_name(out.name + ".skipped.csv")
    if len(skipped):
        with atomic_path(skipped_path) as tmp:
            skipped.to_csv(tmp, index=False)
        return out, skipped_path
    if skipped_path.exists():
        skipped_path.unlink()  # a stale list from an earlier run would mislead
    return out, None
