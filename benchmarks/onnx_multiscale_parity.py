"""ONNX export parity of the multiscale histology model across token grids and backbones (random weights).

    python benchmarks/onnx_multiscale_parity.py [--out runs/onnx/multiscale_parity.json]

For each setting a random-weight MultiScaleGrader bundle (2 magnifications) is saved to a temporary folder and
exported with :func:`breastfusion.inference.onnx_export.export_onnx`. The export check scores a standard-normal
batch and a real-shaped batch with PyTorch and ONNX Runtime. This script reports the largest differences per
output and the export time. Random weights are enough for this check: it tests the graph, not the training.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_description

from breastfusion.bundles.bundle import META, save_bundle
from breastfusion.inference.onnx_export import export_onnx
from breastfusion.models.multiscale import MultiScaleGrader

SETTINGS = [  # (token grid, image size, sources)
    (1, 32, ("cnn",)), (2, 32, ("cnn",)), (4, 32, ("cnn",)), (4, 64, ("cnn", "vit")), (4, 224, ("cnn", "vit")),
]
NAMES = {"cnn": "tf_efficientnet_lite0", "vit": "vit_tiny_patch16_224"}


def build(path: Path, grid: int, size: int, sources) -> Path:
    torch.manual_seed(0)
    kwargs = {k: ({"img_size": size} if k == "vit" else {}) for k in sources}
    backbones = {k: timm.create_model(NAMES[k], pretrained=False, num_classes=0, **kwargs[k]) for k in sources}
    model = MultiScaleGrader(3, backbones=backbones, n_scales=2, dim=32, heads=2, grid=grid, objective="ordinal")
    meta = {"kind": "multiscale", "backbones": {k: NAMES[k] for k in sources}, "backbone_kwargs": kwargs,
            "magnifications": [20.0, 10.0], "token_grid": grid, "attention_dim": 32, "attention_heads": 2,
            "objective": "ordinal", "n_tabular": 0, "tabular_dim": 64, "tabular_hidden": 128, "fusion_hidden": 128,
            "dropout": 0.2, "norms": {k: [[0.5] * 3, [0.5] * 3] for k in sources}}
    return save_bundle(path, model, classes=["1", "2", "3"], model_meta=meta,
                       image_meta={"size": size, "range": "0-1 RGB"}, tabular=None, feature_meta={}, config_yaml="",
                       synthetic=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/onnx/multiscale_parity.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bf_ms_onnx_") as tmp:
        for i, (grid, size, sources) in enumerate(SETTINGS):
            path = build(Path(tmp) / f"b{i}", grid, size, sources)
            t0 = time.perf_counter()
            export_onnx(path)
            entry = json.loads((path / META).read_text())["onnx"]
            rows.append({"token_grid": grid, "image_size": size, "backbones": "+".join(NAMES[k] for k in sources),
                         "export_s": round(time.perf_counter() - t0, 2), **entry["parity"]["max_abs_diff_per_output"]})
            print(f"grid {grid}, {size} px, {rows[-1]['backbones']}: max |Δp| {rows[-1]['probabilities']:.1e}",
                  file=sys.stderr)
    res = {"date": date.today().isoformat(), "machine": machine_description(),
           "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print("| token grid | px | backbones | export s | max Δ probabilities | max Δ logits | max Δ scale weights |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['token_grid']} | {r['image_size']} | {r['backbones']} | {r['export_s']} | {r['probabilities']:.1e} | "
              f"{r['logits']:.1e} | {r['scale_weights']:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
