"""ONNX export of a bundle's network, checked against PyTorch, and the ONNX Runtime model that
``Predictor(..., backend="onnx")`` runs.

::

    breastfusion export BUNDLE                 # → BUNDLE/model.onnx, recorded in BUNDLE/bundle.json
    breastfusion predict BUNDLE images/ --out preds.csv --backend onnx

What is exported is the whole network of the bundle, from the tensors the Predictor makes to the class
probabilities (softmax, or the ordinal probabilities of an ordinal histology model):

* fusion bundles: inputs ``image`` (batch, 3, size, size) - grey images repeated to 3 channels and normalised
  with the bundle's mean / std, as :meth:`Predictor._forward` makes them - and ``tabular`` (batch, n_tabular),
  the rows of the bundle's TabularPreprocessor; the ``image`` and ``tabular`` variants take only their input.
  Outputs ``probabilities`` and ``logits``.
* multiscale histology bundles (``model.kind == "multiscale"``): input ``image`` (batch, scales, 3, size, size)
  in [0, 1] RGB (the network normalises per backbone) and ``tabular`` when the bundle has tabular features.
  Outputs ``probabilities``, ``logits``, ``cross_scale`` (batch, scales, scales) and ``scale_weights``
  (batch, scales). Any ``token_grid`` exports: the model pools backbone features to the token grid with two
  constant averaging matrices (:func:`breastfusion.models.multiscale.adaptive_avg_pool`, the same bins as
  ``adaptive_avg_pool2d``, which the TorchScript exporter refuses for grids that do not divide the feature map).
  :class:`~breastfusion.inference.grading.GradingPredictor` runs it with ``backend="onnx"``.

The batch axis is dynamic; image height and width are fixed to the bundle's input size (the Predictor always
resizes to it, and the "same" padding of the TF-ported EfficientNets is computed for that size).

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter. With torch 2.14 the
torch.export-based ("dynamo") exporter, the default since torch 2.9, needs the extra package ``onnxscript``,
took 30-40 s instead of ~2 s for a small EfficientNet-Lite0 fusion model on this project's (shared, 2-core)
CPU machine, and writes opset 18 (its down-conversion to opset 17 fails for ``Pad``). The TorchScript exporter needs nothing beyond
torch and ``onnx``, honours the requested opset and passes the parity check; torch marks it deprecated, so
``export_onnx(..., dynamo=True)`` is there for when it is removed (install ``onnxscript`` for it).

Every export is checked: PyTorch and ONNX Runtime (CPU) score the same inputs - standard-normal tensors and
inputs shaped like real ones (grey ultrasound-like images normalised as the Predictor does, tabular rows
encoded by the bundle's own preprocessor from plausible values) at two batch sizes - and the largest absolute
difference of the probabilities must stay below ``atol`` (1e-4), else the export fails with the measured
difference and nothing is written. The file is written atomically, and ``bundle.json`` (also rewritten
atomically) records an ``onnx`` entry: file, opset, exporter, inputs and outputs with their shapes, the
sha256 of the ONNX file and of the weights it was exported from, and the parity result. The Predictor refuses
an ONNX file whose sha256 does not match that entry, or that was exported from other weights.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from breastfusion.bundles.bundle import (
    META,
    WEIGHTS,
    Bundle,
    load_bundle,
    read_bundle_meta,
    write_bundle_meta,
)
from breastfusion.errors import BundleError, ConfigError, DataError
from breastfusion.models.registry import network_kind
from breastfusion.utils import atomic_path

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17
PARITY_ATOL = 1e-4
PROB_OUTPUT = "probabilities"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_command(bundle_path: str | Path) -> str:
    return f"breastfusion export {bundle_path}"


# ---------------------------------------------------------------------------------------- what is exported


def onnx_inputs(meta: dict) -> list[dict]:
    """Names, shapes (``"batch"`` is the dynamic axis) and dtypes of the exported network's inputs."""
    return network_kind(meta).onnx_inputs(meta)


def onnx_outputs(meta: dict) -> list[dict]:
    return network_kind(meta).onnx_outputs(meta)


class _Exported(nn.Module):
    """The bundle network with positional inputs (in ``onnx_inputs`` order) and its outputs in ``onnx_outputs``
    order (probabilities first)."""

    def __init__(self, model: nn.Module, input_names: list[str], meta: dict):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self._forward = network_kind(meta).forward

    def forward(self, *xs: torch.Tensor):
        return self._forward(self.model, dict(zip(self.input_names, xs)))


# ------------------------------------------------------------------------------------------- parity inputs


def _tabular_rows(bundle: Bundle, n: int, rng: np.random.Generator, width: int) -> np.ndarray:
    """Rows encoded by the bundle's own preprocessor from plausible raw values (a tenth of them missing)."""
    import pandas as pd

    pre = bundle.tabular
    if pre is None or not pre.columns_:
        return rng.standard_normal((n, width)).astype(np.float32)
    cols = {}
    for c in pre.columns_:
        kind = pre.kinds_[c]
        if kind in ("categorical", "multi", "ordinal"):  # a multi cell of one value; an ordinal level
            cats = (pre.levels_.get(c) if kind == "ordinal" else pre.categories_.get(c)) or [None]
            vals = [cats[i] for i in rng.integers(0, len(cats), n)]
        elif kind == "bool":
            vals = [bool(v) for v in rng.integers(0, 2, n)]
        else:
            vals = list(pre.medians_[c] + pre.scales_[c] * rng.standard_normal(n))
        cols[c] = [None if rng.random() < 0.1 else v for v in vals]
    try:
        rows = pre.transform(pd.DataFrame(cols, dtype=object), source="parity check")
    except DataError as exc:  # unusual fitted state: fall back to standard-normal rows
        log.debug("parity check: encoded tabular rows unavailable (%s); using standard-normal rows", exc)
        return rng.standard_normal((n, width)).astype(np.float32)
    if rows.shape[1] != width:
        return rng.standard_normal((n, width)).astype(np.float32)
    return rows.astype(np.float32)


def parity_inputs(bundle: Bundle, *, seed: int = 0, batches: tuple[int, int] = (1, 5)) -> list[dict[str, np.ndarray]]:
    """Feeds for the parity check: standard-normal tensors at batch ``batches[0]``, and real-shaped inputs
    (what the Predictor would feed) at batch ``batches[1]``."""
    rng = np.random.default_rng(seed)
    meta = bundle.meta
    specs = onnx_inputs(meta)
    feeds = []
    random_feed = {}
    for s in specs:
        shape = [batches[0]] + [int(d) for d in s["shape"][1:]]
        random_feed[s["name"]] = rng.standard_normal(shape).astype(np.float32)
    feeds.append(random_feed)
    n = batches[1]
    real = {}
    for s in specs:
        if s["name"] == "tabular":
            real["tabular"] = _tabular_rows(bundle, n, rng, int(s["shape"][1]))
        else:
            real["image"] = network_kind(meta).example_images(meta, n, rng)
    feeds.append(real)
    return feeds


# ---------------------------------------------------------------------------------------------- sessions


def onnx_session(path: str | Path, *, threads: int | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's thread count)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise BundleError("The ONNX backend needs the 'onnxruntime' package (pip install onnxruntime).") from exc
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads or torch.get_num_threads()))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _ort_outputs(session, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session.run(None, feed)


@torch.no_grad()
def _torch_outputs(wrapper: nn.Module, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    outs = wrapper(*[torch.from_numpy(feed[n]) for n in names])
    return [o.float().cpu().numpy() for o in outs]


def check_parity(wrapper: nn.Module, session, names: list[str], feeds: list[dict[str, np.ndarray]],
                 output_names: list[str]) -> dict:
    """Largest absolute differences between PyTorch and ONNX Runtime, per output, over all feeds."""
    worst = {o: 0.0 for o in output_names}
    for feed in feeds:
        ref = _torch_outputs(wrapper, names, feed)
        got = _ort_outputs(session, feed)
        for o, a, b in zip(output_names, ref, got):
            if a.shape != b.shape:
                raise BundleError(f"ONNX output '{o}' has shape {b.shape}, PyTorch gives {a.shape}.")
            worst[o] = max(worst[o], float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


# ------------------------------------------------------------------------------------------------- export


def _resolve_onnx_file(bundle_path: Path, entry: dict | None) -> Path:
    if entry and entry.get("file"):
        p = Path(entry["file"])
        return p if p.is_absolute() else bundle_path / p
    return bundle_path / ONNX_FILE


def _export(wrapper: nn.Module, args: tuple, path: Path, *, opset: int, input_names: list[str],
            output_names: list[str], dynamo: bool) -> None:
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError as exc:
            raise ConfigError("export_onnx(dynamo=True) needs the 'onnxscript' package (pip install onnxscript); "
                              "the default TorchScript-based exporter does not.") from exc
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(wrapper, args, dynamo=True, input_names=input_names, output_names=output_names,
                                    opset_version=opset, dynamic_shapes=(tuple({0: batch} for _ in args),),  # forward(*xs)
                                    external_data=False, verbose=False)
        program.save(str(path), external_data=False)
        return
    with warnings.catch_warnings():  # the exporter's deprecation notice and the tracer's constant-shape notes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=input_names,
                          output_names=output_names, opset_version=opset, do_constant_folding=True,
                          dynamic_axes={n: {0: "batch"} for n in input_names + output_names})


def export_onnx(bundle_path: str | Path, out_path: str | Path | None = None, *, opset: int = DEFAULT_OPSET,
                check: bool = True, atol: float = PARITY_ATOL, dynamo: bool = False) -> Path:
    """Export the bundle's network to ONNX (default ``<bundle>/model.onnx``) and record it in ``bundle.json``.

    With ``check`` (the default) PyTorch and ONNX Runtime score the same random and real-shaped inputs and
    the largest absolute probability difference must be below ``atol``; otherwise a :class:`BundleError`
    reports the measured difference and no file is written. Returns the path of the ONNX file.
    """
    import onnx

    bundle_path = Path(bundle_path)
    bundle = load_bundle(bundle_path)
    meta = bundle.meta
    out = Path(out_path) if out_path is not None else bundle_path / ONNX_FILE
    if out.is_dir():
        out = out / ONNX_FILE
    specs, out_specs = onnx_inputs(meta), onnx_outputs(meta)
    names, out_names = [s["name"] for s in specs], [s["name"] for s in out_specs]
    model = bundle.model.float().eval()
    wrapper = _Exported(model, names, meta).eval()
    feeds = parity_inputs(bundle)
    example = tuple(torch.from_numpy(feeds[1][n]) for n in names)
    t0 = time.perf_counter()
    parity: dict | None = None
    with atomic_path(out) as tmp:
        try:
            _export(wrapper, example, tmp, opset=opset, input_names=names, output_names=out_names, dynamo=dynamo)
        except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise BundleError(f"ONNX export of bundle '{bundle_path}' failed: {exc}") from exc
        onnx.checker.check_model(str(tmp))
        seconds = time.perf_counter() - t0
        if check:
            session = onnx_session(tmp)
            diffs = check_parity(wrapper, session, names, feeds, out_names)
            max_diff = diffs[PROB_OUTPUT]
            parity = {"max_abs_prob_diff": max_diff, "max_abs_diff_per_output": diffs, "atol": atol,
                      "passed": bool(max_diff < atol),
                      "inputs": [f"standard normal, batch {len(next(iter(feeds[0].values())))}",
                                 f"real-shaped, batch {len(next(iter(feeds[1].values())))}"]}
            if not max_diff < atol:
                raise BundleError(f"ONNX export of bundle '{bundle_path}' failed the parity check: the largest "
                                  f"absolute probability difference between PyTorch and ONNX Runtime is "
                                  f"{max_diff:.2e}, not below {atol:g}. Nothing was written.")
            log.info("ONNX parity: max |p_torch - p_onnx| = %.3g (< %g)", max_diff, atol)
        digest = sha256_file(tmp)
    try:
        rel = out.resolve().relative_to(bundle_path.resolve())
        file_ref = str(rel)
    except ValueError:
        file_ref = str(out.resolve())
    import onnxruntime

    entry = {
        "file": file_ref, "opset": int(opset), "exporter": "torch.onnx dynamo" if dynamo else "torch.onnx torchscript",
        "inputs": specs, "outputs": out_specs, "dynamic_axes": {"batch": 0},
        "sha256": digest, "weights_sha256": sha256_file(bundle_path / WEIGHTS),
        "parity": parity if check else None, "export_seconds": round(seconds, 2),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    raw = read_bundle_meta(bundle_path)  # as stored (verified again: nothing may change it while exporting)
    raw["onnx"] = entry
    write_bundle_meta(bundle_path, raw)  # re-seals, now covering the ONNX file too
    return out


# ------------------------------------------------------------------------------------ the Predictor's model


def runtime_for(bundle: Bundle, backend: str, *, load: bool = True) -> OnnxModel | None:
    """The prediction backend of a bundle: ``None`` for ``"torch"``, its checked :class:`OnnxModel` for
    ``"onnx"`` (when ``load``); any other name is a :class:`DataError`."""
    if backend not in ("torch", "onnx"):
        raise DataError(f"Unknown backend '{backend}'; use 'torch' or 'onnx'.")
    return OnnxModel(bundle, threads=torch.get_num_threads()) if backend == "onnx" and load else None


class OnnxModel:
    """A bundle's exported network in ONNX Runtime: ``model(image, tabular)`` → probabilities (numpy)."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None):
        path = Path(bundle.path)
        entry = bundle.meta.get("onnx")
        file = _resolve_onnx_file(path, entry)
        cmd = export_command(path)
        if not file.is_file():
            raise BundleError(f"Bundle '{path}' has no ONNX model: '{file}' is missing. Export it first with "
                              f"'{cmd}', or use the torch backend.")
        if not entry:
            raise BundleError(f"Bundle '{path}': '{file}' is not recorded in {META} (no 'onnx' entry), so it "
                              f"cannot be checked. Export it again with '{cmd}'.")
        digest = sha256_file(file)
        if digest != entry.get("sha256"):
            raise BundleError(f"Bundle '{path}': the sha256 of '{file}' ({digest[:12]}…) does not match the one in "
                              f"{META} ({str(entry.get('sha256'))[:12]}…); the file was changed or replaced after "
                              f"export. Export it again with '{cmd}'.")
        weights = path / WEIGHTS
        if entry.get("weights_sha256") and weights.is_file() and sha256_file(weights) != entry["weights_sha256"]:
            raise BundleError(f"Bundle '{path}': '{file}' was exported from other weights than '{weights}'. "
                              f"Export it again with '{cmd}'.")
        if entry.get("parity") is None:
            log.warning("bundle '%s': the ONNX model was exported without a parity check", path)
        self.path = file
        self.entry = entry
        self.input_names = [s["name"] for s in entry["inputs"]]
        self.session = onnx_session(file, threads=threads)
        got = [i.name for i in self.session.get_inputs()]
        if got != self.input_names:
            raise BundleError(f"Bundle '{path}': '{file}' has inputs {got}, {META} records {self.input_names}. "
                              f"Export it again with '{cmd}'.")

    def _feed(self, image, tabular) -> dict[str, np.ndarray]:
        given = {"image": image, "tabular": tabular}
        return {n: np.ascontiguousarray(given[n], dtype=np.float32) for n in self.input_names}

    def __call__(self, image: np.ndarray | None, tabular: np.ndarray | None) -> np.ndarray:
        return self.session.run([PROB_OUTPUT], self._feed(image, tabular))[0]

    def outputs(self, image: np.ndarray | None, tabular: np.ndarray | None) -> dict[str, np.ndarray]:
        """Every output of the exported graph by name (e.g. ``cross_scale`` and ``scale_weights``)."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, self._feed(image, tabular)), strict=True))
