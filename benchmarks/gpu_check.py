"""CUDA path check and throughput: the fusion model and the multiscale grader, fp32 vs mixed precision.

    python benchmarks/gpu_check.py [--device cuda] [--out runs/gpu_check.json] [--quick]

For each model: training throughput (forward + backward + AdamW step, the trainer's autocast and GradScaler
helper, channels-last for the 2-D model) and inference throughput, in fp32 and with autocast (bf16 where
supported), plus the largest class-probability difference between fp32 and mixed-precision inference on the
same inputs. Random inputs (speed does not depend on content); weights: EfficientNet-Lite0 from the offline
package, ViT random (no hub). Records device, versions and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_description  # noqa: E402

from breastfusion.training.trainer import _Autocast  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model, make_batch, device, amp: bool, steps: int, warmup: int, channels_last: bool) -> dict:
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ac = _Autocast(device, "on" if amp else "off")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    crit = torch.nn.CrossEntropyLoss()
    model.train()
    x, tab, y = make_batch()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with ac.ctx():
            loss = crit(model(x, tab).float(), y)
        assert torch.isfinite(loss), "non-finite loss"
        ac.scaler.scale(loss).backward()
        ac.scaler.step(opt)
        ac.scaler.update()
    _sync(device)
    train_rate = steps * len(y) / (time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            with ac.ctx():
                model(x, tab)
        _sync(device)
    infer_rate = steps * len(y) / (time.perf_counter() - t0)
    return {"train_items_per_s": round(train_rate, 1), "infer_items_per_s": round(infer_rate, 1),
            "dtype": str(ac.dtype) if ac.enabled else "float32", "last_loss": round(float(loss), 4)}


def parity(model, make_batch, device) -> float:
    model.eval().to(device)
    x, tab, _ = make_batch()
    with torch.no_grad():
        p32 = torch.softmax(model(x, tab).float(), 1)
        with _Autocast(device, "on").ctx():
            pmx = torch.softmax(model(x, tab).float(), 1)
    return float((p32 - pmx).abs().max())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="runs/gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test on CPU)")
    args = ap.parse_args()
    os.environ.setdefault("BREASTFUSION_OFFLINE", "1")
    device = torch.device(args.device)
    import timm

    from breastfusion.models.fusion import FusionClassifier
    from breastfusion.models.multiscale import MultiScaleGrader
    from breastfusion.models.pretrained import create_backbone

    q = args.quick
    bs, size, steps, warm = (4, 64, 2, 1) if q else (64, 224, 20, 5)
    res = {"date": date.today().isoformat(), "machine": machine_description(), "device": str(device),
           "torch": torch.__version__, "timm": timm.__version__}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
        res["bf16"] = torch.cuda.is_bf16_supported()

    def fusion():
        bb, _ = create_backbone("tf_efficientnet_lite0")
        torch.manual_seed(0)
        return FusionClassifier(3, variant="fusion", backbone=bb, n_tabular=137)

    def fusion_batch():
        g = torch.Generator().manual_seed(0)
        return (torch.rand(bs, 3, size, size, generator=g).to(device),
                torch.randn(bs, 137, generator=g).to(device), torch.randint(0, 3, (bs,), generator=g).to(device))

    ms_size, ms_bs = (32, 2) if q else (128, 32)

    def grader():
        bb, _ = create_backbone("tf_efficientnet_lite0")
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=ms_size)
        torch.manual_seed(0)
        return MultiScaleGrader(3, backbones={"cnn": bb, "vit": vit}, n_scales=3, n_tabular=60, objective="ce")

    def grader_batch():
        g = torch.Generator().manual_seed(0)
        return (torch.rand(ms_bs, 3, 3, ms_size, ms_size, generator=g).to(device),
                torch.randn(ms_bs, 60, generator=g).to(device), torch.randint(0, 3, (ms_bs,), generator=g).to(device))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res["fusion_224"] = {"batch": bs, "fp32": bench(fusion(), fusion_batch, device, False, steps, warm, True),
                         "amp": bench(fusion(), fusion_batch, device, True, steps, warm, True),
                         "max_prob_diff_amp_vs_fp32": parity(fusion(), fusion_batch, device)}
    res["multiscale_3x128_cnn_vit"] = {"batch_stacks": ms_bs,
                                       "fp32": bench(grader(), grader_batch, device, False, steps, warm, False),
                                       "amp": bench(grader(), grader_batch, device, True, steps, warm, False),
                                       "max_prob_diff_amp_vs_fp32": parity(grader(), grader_batch, device)}
    if device.type == "cuda":
        res["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
