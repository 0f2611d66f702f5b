"""Lesion radiomics: PyRadiomics features of the (expert) lesion mask on a 2-D grey image.

One row per case, columns prefixed ``rad_``:

- ``rad_mask_available``  1 when the case has a mask reference ('' counts: "no lesion"), 0 when it is unknown (NaN).
- ``rad_lesion_present``  1 when the union of the masks has at least :data:`MIN_LESION_PIXELS` pixels.
- ``rad_n_lesions``       number of mask files that each hold a lesion (BUSI's ``_mask``, ``_mask_1``, ...).
- ``rad_original_<class>_<feature>``  the PyRadiomics features (:func:`feature_names`, a fixed order),
  NaN when there is no lesion; downstream imputers fill them.

Images are read as grey, scaled to [0, 255] and discretised with a fixed bin width (:data:`BIN_WIDTH`).
Results are cached per case, keyed by the image and mask bytes, the pixel spacing and the extractor settings,
so a re-run is instant and a killed run resumes where it stopped.

Units: with a physical pixel size per case (``data.pixel_size_column``, see :func:`pixel_spacings_mm`) shape
features come out in millimetres (area mm², perimeter and diameters mm); without one, in pixels. Every case of
one table is in the same unit: a table where only some cases have a pixel size is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID, IMAGE_PATH, MASK_PATH, MASK_SEP
from breastfusion.data.images import read_image, read_mask
from breastfusion.errors import DataError
from breastfusion.utils import atomic_path

logger = logging.getLogger(__name__)

#: Version of this extractor (settings + feature list). Bump it whenever anything below changes.
RADIOMICS_VERSION = "1"

#: Grey levels are binned with this fixed width on the [0, 255] scale. On BUSI lesions it gives
#: 16-52 bins (median 42), inside the 30-130 range PyRadiomics recommends and IBSI's fixed-bin-size mode.
BIN_WIDTH = 5.0
#: Feature classes, in output order. Inside a class, features are sorted by name.
FEATURE_CLASSES = ("shape2D", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
#: A mask union smaller than this (pixels) is treated as "no lesion": texture matrices of a handful
#: of pixels are meaningless and PyRadiomics fails on 1-pixel or 1-row ROIs.
MIN_LESION_PIXELS = 16
PREFIX = "rad_"
MASK_AVAILABLE, LESION_PRESENT, N_LESIONS = "rad_mask_available", "rad_lesion_present", "rad_n_lesions"
FLAG_COLUMNS = (MASK_AVAILABLE, LESION_PRESENT, N_LESIONS)

#: Settings passed to PyRadiomics. Part of the cache key.
EXTRACTOR_SETTINGS = {
    "binWidth": BIN_WIDTH,
    "force2D": True,  # images are passed as (1, H, W) volumes; features are computed in-plane
    "force2Ddimension": 0,
    "label": 1,
    "normalize": False,  # the [0, 255] scaling is done here, identically for every image
    "resampledPixelSpacing": None,  # no resampling; physical spacing, when known, is set on each image
    "distances": [1],
    "minimumROIDimensions": 2,
    "additionalInfo": False,
}

EXPERT_MASK_NOTE = (
    "Radiomics features are computed inside a lesion mask. When that mask is drawn by an expert, the features "
    "carry the expert's information (an empty mask means 'no lesion', so rad_lesion_present alone separates "
    "'normal' cases): a model using them is not a pure image model. At prediction time the mask must come from "
    "the same source (the same kind of expert annotation, or the same segmentation model) as in training."
)

_CLASS_MODULES = {
    "shape2D": ("radiomics.shape2D", "RadiomicsShape2D"),
    "firstorder": ("radiomics.firstorder", "RadiomicsFirstOrder"),
    "glcm": ("radiomics.glcm", "RadiomicsGLCM"),
    "glrlm": ("radiomics.glrlm", "RadiomicsGLRLM"),
    "glszm": ("radiomics.glszm", "RadiomicsGLSZM"),
    "gldm": ("radiomics.gldm", "RadiomicsGLDM"),
    "ngtdm": ("radiomics.ngtdm", "RadiomicsNGTDM"),
}


def _silence_pyradiomics() -> None:
    # PyRadiomics logs at INFO on its own logger (which propagates to the root logger) and adds a
    # stderr handler; only its errors are worth seeing here.
    import radiomics

    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)


@functools.cache
def _pyradiomics_feature_names() -> tuple[str, ...]:
    import importlib

    _silence_pyradiomics()
    names = []
    for cls_name in FEATURE_CLASSES:
        module, attr = _CLASS_MODULES[cls_name]
        feature_class = getattr(importlib.import_module(module), attr)
        current = sorted(n for n, deprecated in feature_class.getFeatureNames().items() if not deprecated)
        names += [f"original_{cls_name}_{n}" for n in current]
    return tuple(names)


def feature_names() -> list[str]:
    """The lesion feature columns (``rad_original_<class>_<feature>``), always in this order."""
    return [PREFIX + n for n in _pyradiomics_feature_names()]


def radiomics_columns() -> list[str]:
    """Every column :func:`extract_radiomics` returns: the three flags, then :func:`feature_names`."""
    return [*FLAG_COLUMNS, *feature_names()]


@functools.cache
def _extractor():
    from radiomics import featureextractor

    _silence_pyradiomics()
    extractor = featureextractor.RadiomicsFeatureExtractor(**EXTRACTOR_SETTINGS)
    extractor.disableAllImageTypes()
    extractor.enableImageTypeByName("Original")
    extractor.disableAllFeatures()
    extractor.enableFeaturesByName(**{c: [] for c in FEATURE_CLASSES})  # [] = all non-deprecated features
    return extractor


def _settings_fingerprint() -> str:
    import radiomics

    return json.dumps(
        {
            "radiomics_version": RADIOMICS_VERSION,
            "pyradiomics": radiomics.__version__,
            "settings": EXTRACTOR_SETTINGS,
            "classes": FEATURE_CLASSES,
            "min_pixels": MIN_LESION_PIXELS,
        },
        sort_keys=True,
    )


# --------------------------------------------------------------------------------------------- one case


def _mask_paths(value) -> list[str] | None:
    """Normalise a mask reference: None/NaN -> None (unknown); '' -> [] (no lesion); 'a;b' or [a, b] -> list."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (str, Path)):
        return [p.strip() for p in str(value).split(MASK_SEP) if p.strip()]
    if isinstance(value, Iterable):
        return [str(p) for p in value if str(p).strip()]
    raise TypeError(f"mask_paths must be a path, a ';'-joined string, a list of paths or None. Got {value!r}.")


def _nan_row(mask_available: float = math.nan) -> dict[str, float]:
    row = {c: math.nan for c in radiomics_columns()}
    row[MASK_AVAILABLE] = mask_available
    return row


def _no_lesion_row() -> dict[str, float]:
    row = _nan_row(1.0)
    row[LESION_PRESENT] = 0.0
    row[N_LESIONS] = 0.0
    return row


def _is_lesion(mask: np.ndarray) -> bool:
    """Large enough, and spanning at least two rows and two columns (PyRadiomics needs a 2-D ROI)."""
    if mask.sum() < MIN_LESION_PIXELS:
        return False
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[-1] > rows[0] and cols[-1] > cols[0]


def extract_arrays(image: np.ndarray, masks: list[np.ndarray], *, source: str = "image",
                   spacing_mm: float | None = None) -> dict[str, float]:
    """Features of a grey ``image`` in [0, 255] and a list of boolean lesion masks (their union is the ROI).

    ``masks=[]`` means "no lesion". ``source`` names the case in log and error messages. ``spacing_mm``: the
    physical size of a (square) pixel, so shape features are in mm; None: in pixels.
    """
    import SimpleITK as sitk

    if image.ndim != 2:
        raise DataError(f"{source}: radiomics needs a 2-D grey image, got shape {image.shape}.")
    for m in masks:
        if m.shape != image.shape:
            raise DataError(f"{source}: mask of shape {m.shape} does not match the image shape {image.shape}.")
    union = np.zeros(image.shape, dtype=bool)
    for m in masks:
        union |= m.astype(bool)
    if not _is_lesion(union):
        if union.any():
            logger.warning(
                "%s: lesion mask has %d pixel(s) (minimum %d, at least 2 rows and 2 columns); treated as no lesion.",
                source, int(union.sum()), MIN_LESION_PIXELS,
            )
        return _no_lesion_row()
    row = _nan_row(1.0)
    row[LESION_PRESENT] = 1.0
    row[N_LESIONS] = float(max(1, sum(_is_lesion(m.astype(bool)) for m in masks)))
    sitk_image = sitk.GetImageFromArray(image.astype(np.float32)[None])
    sitk_mask = sitk.GetImageFromArray(union.astype(np.uint8)[None])
    if spacing_mm is not None:  # (x, y, z): in-plane pixel size; the single slice's thickness does not enter 2-D shape
        for im in (sitk_image, sitk_mask):
            im.SetSpacing((float(spacing_mm), float(spacing_mm), 1.0))
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            result = _extractor().execute(sitk_image, sitk_mask, label=1)
    except Exception as exc:  # PyRadiomics raises bare ValueError/RuntimeError on odd ROIs
        raise DataError(f"{source}: PyRadiomics failed ({type(exc).__name__}: {exc}).") from exc
    for name in _pyradiomics_feature_names():
        value = result.get(name)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        row[PREFIX + name] = value if math.isfinite(value) else math.nan
    return row


def extract_case(image_path: str | Path, mask_paths, spacing_mm: float | None = None) -> dict[str, float]:
    """Radiomics of one case: ``{column: value}`` with the columns of :func:`radiomics_columns`.

    ``mask_paths``: one path, a ``;``-joined string or a list (their union is the lesion); ``''`` or ``[]``
    means "no lesion"; ``None``/NaN means "no mask available" (every value NaN, ``rad_mask_available`` 0).
    Raises :class:`DataError` naming the file for an unreadable image or mask, or a mask whose size
    differs from the image's. ``spacing_mm``: pixel size in mm (shape features in mm), None for pixels.
    """
    masks = _mask_paths(mask_paths)
    if masks is None:
        return _nan_row(0.0)
    image = read_image(image_path, "gray") * np.float32(255.0)
    mask_arrays = [read_mask(p, image.shape) for p in masks]
    return extract_arrays(image, mask_arrays, source=f"'{image_path}'", spacing_mm=spacing_mm)


# ------------------------------------------------------------------------------------------------ cache


def _file_digest(path: str | Path, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: '{path}'.")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def case_key(image_path: str | Path, mask_paths: list[str], spacing_mm: float | None = None) -> str:
    """Cache key of one case: hash of the image bytes, the mask bytes, the pixel spacing and the extractor
    settings (no spacing: the key of a pixel-unit case, as before spacing existed)."""
    h = hashlib.sha256(_settings_fingerprint().encode())
    if spacing_mm is not None:
        h.update(f"spacing_mm={float(spacing_mm)!r}".encode())
    h.update(_file_digest(image_path, "Image").encode())
    # The union and the lesion count do not depend on the order of the mask files.
    for digest in sorted(_file_digest(p, "Mask") for p in mask_paths):
        h.update(b"|" + digest.encode())
    return h.hexdigest()


def _cache_file(cache_dir: Path, key: str) -> Path:
    return cache_dir / "radiomics" / f"{key}.json"


def _read_cached(path: Path) -> dict[str, float] | None:
    try:
        stored = json.loads(path.read_text())
        values = stored["features"]
        row = {c: (math.nan if values.get(c) is None else float(values[c])) for c in radiomics_columns()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("Ignoring unreadable radiomics cache file '%s' (%s); recomputing.", path, exc)
        return None
    return row


def _write_cached(path: Path, row: dict[str, float], image_path: str) -> None:
    values = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    payload = {"radiomics_version": RADIOMICS_VERSION, "image_path": str(image_path), "features": values}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload))


def _extract_cached(case_id: str, image_path, mask_value, cache_dir: str | None, spacing_mm: float | None = None):
    """Worker: (case_id, row, error message). Never raises for a bad case, so a batch never dies of one."""
    try:
        masks = _mask_paths(mask_value)
        if masks is None:
            return case_id, _nan_row(0.0), None
        if cache_dir is None:
            return case_id, extract_case(image_path, masks, spacing_mm), None
        path = _cache_file(Path(cache_dir), case_key(image_path, masks, spacing_mm))
        row = _read_cached(path)
        if row is None:
            row = extract_case(image_path, masks, spacing_mm)
            _write_cached(path, row, image_path)
        return case_id, row, None
    except Exception as exc:  # noqa: BLE001 - reported per case, the batch goes on
        msg = str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
        return case_id, None, msg


# ------------------------------------------------------------------------------------------------ units

#: Millimetres per unit of ``data.pixel_size_unit``.
MM_PER_UNIT = {"mm": 1.0, "cm": 10.0, "um": 1e-3}


def pixel_spacings_mm(cases: pd.DataFrame, column: str | None, unit: str = "mm") -> list[float | None] | None:
    """Each case's pixel size in mm from ``column`` (in ``unit``), or None (features in pixels) when no column
    is named or the table lacks it entirely (logged). Cases with a missing or unusable pixel size, while others
    have one, are refused with a DataError naming them: a table whose shape features mix mm and pixels is
    silently wrong."""
    from breastfusion.data.column_types import as_number, is_missing

    if not column:
        return None
    if unit not in MM_PER_UNIT:
        raise DataError(f"data.pixel_size_unit '{unit}': expected one of {sorted(MM_PER_UNIT)}.")
    if column not in cases.columns:
        logger.warning("data.pixel_size_column '%s' is not in the cases table: radiomics shape features are in "
                       "pixels, not mm.", column)
        return None
    ids = cases[CASE_ID].astype(str).tolist() if CASE_ID in cases.columns else [str(i) for i in cases.index]
    out, missing, bad = [], [], []
    for cid, v in zip(ids, cases[column].tolist()):
        x = None if is_missing(v) else as_number(v)
        if is_missing(v):
            missing.append(cid)
        elif x is None or not math.isfinite(x) or x <= 0:
            bad.append(f"{cid} ('{v}')")
        out.append(None if x is None else x * MM_PER_UNIT[unit])
    if bad:
        raise DataError(f"Column '{column}' (pixel size in {unit}): not a positive number for case(s) "
                        f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}.")
    if missing and len(missing) == len(ids):
        logger.warning("data.pixel_size_column '%s' is empty for every case: radiomics shape features are in "
                       "pixels, not mm.", column)
        return None
    if missing:
        raise DataError(f"Column '{column}' (pixel size) is missing for {len(missing)} of {len(ids)} case(s): "
                        f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. Shape features would mix "
                        "mm and pixels; give those cases a pixel size or remove them.")
    logger.info("Radiomics: pixel sizes from column '%s' (%s): %.4g to %.4g mm; shape features in mm.", column,
                unit, min(out), max(out))
    return out


def units_meta(cases: pd.DataFrame, column: str | None, unit: str = "mm") -> dict:
    """What a bundle records about its radiomics units, so prediction reads each case's pixel size the same way:
    ``{"units": "mm", "pixel_size_column": ..., "pixel_size_unit": ...}`` or ``{"units": "pixel"}``."""
    if pixel_spacings_mm(cases, column, unit) is None:
        return {"units": "pixel"}
    return {"units": "mm", "pixel_size_column": column, "pixel_size_unit": unit}


def case_spacing_mm(value, column: str, unit: str) -> float:
    """One case's pixel size in mm for a bundle whose shape features are in mm; DataError when missing or bad."""
    from breastfusion.data.column_types import as_number, is_missing

    x = None if is_missing(value) else as_number(value)
    if x is None or not math.isfinite(x) or x <= 0:
        raise DataError(f"column '{column}': pixel size '{value}' is missing or not a positive number; this "
                        f"bundle's lesion shape features are in mm, so every case with a mask needs its pixel size "
                        f"(in {unit}).")
    return x * MM_PER_UNIT[unit]


# ------------------------------------------------------------------------------------------------ batch


def extract_radiomics(
    cases: pd.DataFrame,
    *,
    cache_dir: str | Path | None = None,
    n_jobs: int = 1,
    progress: bool = True,
    pixel_size_column: str | None = None,
    pixel_size_unit: str = "mm",
) -> pd.DataFrame:
    """Radiomics of every case of a cases table: a float DataFrame indexed by ``case_id``.

    Columns are :func:`radiomics_columns`. A case whose image or mask cannot be used is logged and
    gets a row of NaN (the message is kept in ``result.attrs['radiomics_errors']``); if every case
    fails, :class:`DataError` is raised with the first message. With ``cache_dir``, each case's result
    is stored as it is computed, so a re-run is instant and a killed run resumes. ``pixel_size_column`` /
    ``pixel_size_unit``: see :func:`pixel_spacings_mm`; ``result.attrs['units']`` is ``'mm'`` or ``'pixel'``.
    """
    if not isinstance(cases, pd.DataFrame):
        raise TypeError(f"The cases table must be a pandas DataFrame. Got {type(cases).__name__} instead.")
    for col in (CASE_ID, IMAGE_PATH):
        if col not in cases.columns:
            raise DataError(f"The cases table has no '{col}' column (columns: {', '.join(map(str, cases.columns))}).")
    if not isinstance(n_jobs, int) or isinstance(n_jobs, bool) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"The 'n_jobs' parameter of extract_radiomics must be -1 or an int >= 1. Got {n_jobs!r} instead.")
    ids = cases[CASE_ID].astype(str).tolist()
    if len(set(ids)) != len(ids):
        raise DataError("The cases table has duplicate case_id values; radiomics rows are keyed by case_id.")
    mask_values = cases[MASK_PATH].tolist() if MASK_PATH in cases.columns else [math.nan] * len(ids)
    cache = str(cache_dir) if cache_dir is not None else None
    spacings = pixel_spacings_mm(cases, pixel_size_column, pixel_size_unit)
    tasks = list(zip(ids, cases[IMAGE_PATH].tolist(), mask_values, spacings or [None] * len(ids)))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), desc="radiomics", unit="case", disable=not progress)
    results: dict[str, tuple] = {}
    if n_jobs == 1 or len(tasks) <= 1:
        outputs = (_extract_cached(cid, img, msk, cache, sp) for cid, img, msk, sp in tasks)
    else:
        from joblib import Parallel, delayed

        outputs = Parallel(n_jobs=n_jobs, return_as="generator_unordered")(
            delayed(_extract_cached)(cid, img, msk, cache, sp) for cid, img, msk, sp in tasks
        )
    for case_id, row, error in outputs:
        results[case_id] = (row, error)
        if error is not None:
            logger.warning("Radiomics: skipped case '%s' (row of NaN): %s", case_id, error)
        bar.update(1)
    bar.close()

    errors = {cid: err for cid, (_, err) in results.items() if err is not None}
    if tasks and len(errors) == len(tasks):
        first = next(iter(errors.items()))
        raise DataError(f"Radiomics failed for every case ({len(tasks)}); first, case '{first[0]}': {first[1]}")
    columns = radiomics_columns()
    rows = [results[cid][0] or _nan_row() for cid in ids]
    table = pd.DataFrame.from_records(rows, columns=columns, index=pd.Index(ids, name=CASE_ID)).astype("float64")
    table.attrs["radiomics_version"] = RADIOMICS_VERSION
    table.attrs["radiomics_errors"] = errors
    table.attrs["units"] = "mm" if spacings else "pixel"
    if errors:
        logger.warning("Radiomics: %d of %d case(s) skipped; see the warnings above.", len(errors), len(tasks))
    return table
