"""Histology grading end to end on a tiny SYNTHETIC cohort, and DDP (gloo, 2 CPU processes via torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from breastfusion.config import load_config

TINY = ["task=histology", "image.size=32", "train.batch_size=8", "train.stage1_epochs=2", "train.stage2_epochs=1",
        "experiment.classical_models=[logreg]", "experiment.n_boot=20", "histology.token_grid=2",
        "histology.attention_dim=32", "histology.attention_heads=2", 'data.labels=["1","2","3"]']


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from breastfusion.data.synthetic_histology import make_synthetic_grading

    out = tmp_path_factory.mktemp("synthetic_grading")
    make_synthetic_grading(out, n_patients=9, stacks_per_case=2, size=32, n_centers=3, seed=1)
    return out


def test_grading_leave_one_centre_out_end_to_end(cohort, tmp_path, monkeypatch):
    from breastfusion.experiment import run_experiment
    from breastfusion.bundles.bundle import load_bundle

    monkeypatch.setenv("BREASTFUSION_OFFLINE", "1")
    cfg = load_config(None, TINY + [f"data.source={cohort / 'cases.csv'}", f"histology.tiles={cohort / 'tiles.csv'}",
                                    "cv.strategy=leave_one_center_out", "histology.variants=[multiscale,single_scale]"])
    r = run_experiment(cfg, tmp_path / "run", progress=False)
    assert set(r.metrics) == {"logreg", "logreg+deep", "deep_multiscale", "deep_single_scale"}
    for m in r.metrics.values():
        assert "quadratic_weighted_kappa" in m["pooled"]
    splits = pd.read_csv(tmp_path / "run" / "splits.csv", dtype={"case_id": str})
    cases = pd.read_csv(cohort / "cases.csv", dtype={"case_id": str})
    per = splits.assign(centre=splits["case_id"].map(cases.set_index("case_id")["center"])).groupby("fold")["centre"].nunique()
    assert (per == 1).all() and len(per) == 3  # one held-out centre per fold
    centres = pd.read_csv(tmp_path / "run" / "per_centre_metrics.csv")
    assert set(centres["centre"]) == set(cases["center"]) and "qwk" in centres
    stacks = pd.read_csv(tmp_path / "run" / "predictions" / "stacks_deep_multiscale.csv")
    assert {"scale_weight_40x", "attn_40x_to_10x"} <= set(stacks.columns) and len(stacks) == 18
    assert np.allclose(stacks["attn_40x_to_40x"], 0, atol=1e-5)
    html = r.report.read_text()
    assert "SYNTHETIC" in html and "Cross-scale attention" in html
    assert "Calibration and deferral" in html and "Explanations (final bundle: deep_multiscale)" in html
    expl = pd.read_csv(tmp_path / "run" / "explanations" / "explanations.csv", dtype={"case_id": str})
    assert len(expl) >= 1 and "scale_weight_40x" in expl
    assert all((tmp_path / "run" / "explanations" / f).exists() for f in expl["figure"])
    b = load_bundle(r.bundle)
    assert b.meta["model"]["kind"] == "multiscale" and b.meta["synthetic_data"] is True
    card = (r.bundle / "MODEL_CARD.md").read_text()
    assert card.startswith("> **SYNTHETIC DATA.**") and "Multiscale histology grader" in card
    assert b.meta["training"]["weights_init"]["vit"].endswith("random")
    x = torch.rand(1, 3, 3, 32, 32)
    tab = torch.zeros(1, b.meta["model"]["n_tabular"])
    with torch.no_grad():
        p = b.model.probabilities(b.model(x, tab))
    assert p.shape == (1, 3) and abs(float(p.sum()) - 1) < 1e-5


def test_grading_resume_reuses_finished_stages(cohort, tmp_path, monkeypatch):
    from breastfusion.experiment import run_experiment

    monkeypatch.setenv("BREASTFUSION_OFFLINE", "1")
    cfg = load_config(None, TINY + [f"data.source={cohort / 'cases.csv'}", f"histology.tiles={cohort / 'tiles.csv'}",
                                    "cv.n_splits=3", "histology.variants=[cnn]", "experiment.final_models=[]",
                                    "histology.deep_features_for_classical=false"])
    r1 = run_experiment(cfg, tmp_path / "run", progress=False)
    fold0 = tmp_path / "run" / "deep" / "deep_cnn" / "fold0" / "predictions.csv"
    stamp = fold0.stat().st_mtime_ns
    r2 = run_experiment(cfg, tmp_path / "run", progress=False, resume=True)
    assert fold0.stat().st_mtime_ns == stamp
    assert r1.metrics["deep_cnn"]["pooled"] == r2.metrics["deep_cnn"]["pooled"]


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np, timm, torch
    from torch.utils.data import TensorDataset
    from breastfusion.config import TrainConfig
    from breastfusion.models.multiscale import MultiScaleGrader
    from breastfusion import distributed as d
    from breastfusion.training.trainer import train_model

    class DS(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.x = torch.rand(n, 2, 3, 32, 32, generator=g)
            self.labels = np.arange(n) % 3
            self.x[:, :, 0] += torch.as_tensor(self.labels, dtype=torch.float32).view(-1, 1, 1, 1) * 0.3
            self.augment = None
        def __len__(self): return len(self.labels)
        def __getitem__(self, i): return self.x[i], torch.zeros(0), int(self.labels[i]), i

    torch.manual_seed(0)
    m = MultiScaleGrader(3, backbones={"cnn": timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)},
                         n_scales=2, dim=16, heads=2, grid=1, objective="ordinal")
    cfg = TrainConfig(batch_size=4, stage1_epochs=2, stage2_epochs=2, finetune_fraction=0.2, channels_last=False)
    tr, va = DS(24, 1), DS(9, 2)
    res = train_model(m, tr, va, cfg, n_classes=3, train_labels=tr.labels, ckpt_dir=sys.argv[1], seed=0, progress=False)
    w = torch.cat([p.detach().flatten() for p in m.parameters()])
    out = {"rank": d.rank(), "world": d._real_world_size(), "checksum": float(w.double().sum()),
           "best_epoch": res.best_epoch, "threads": torch.get_num_threads()}
    with open(os.path.join(sys.argv[1], f"rank{d.rank()}.json"), "w") as f:
        json.dump(out, f)
""")


@pytest.mark.skipif(shutil.which("torchrun") is None and not hasattr(torch.distributed, "run"),
                    reason="torchrun is not available")
def test_ddp_gloo_two_processes_train_identical_replicas(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, BREASTFUSION_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "ckpt")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "ckpt" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "ckpt" / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-6)  # DDP kept the replicas identical
    assert (tmp_path / "ckpt" / "best.safetensors").exists()


def test_grading_bundle_scores_new_cases_and_skips_bad_ones(cohort, tmp_path, monkeypatch):
    """Train a small bundle, then `breastfusion predict` on a tiles table with a corrupt tile and a case lacking
    a magnification: the good cases are scored, the bad case is listed with a reason, stacks get attention."""
    from breastfusion.cli import main
    from breastfusion.experiment import run_experiment
    from breastfusion.bundles.bundle import load_bundle

    monkeypatch.setenv("BREASTFUSION_OFFLINE", "1")
    cfg = load_config(None, TINY + [f"data.source={cohort / 'cases.csv'}", f"histology.tiles={cohort / 'tiles.csv'}",
                                    "cv.n_splits=3", "histology.variants=[cnn]", "experiment.classical_models=[]",
                                    "histology.backbones={cnn: tf_efficientnet_lite0}"])
    r = run_experiment(cfg, tmp_path / "run", progress=False)
    tiles = pd.read_csv(cohort / "tiles.csv", dtype={"case_id": str, "stack_id": str})
    tiles["image_path"] = [str((cohort / p).resolve()) for p in tiles["image_path"]]
    ids = sorted(tiles["case_id"].unique())[:3]
    new = tiles[tiles["case_id"].isin(ids)].copy()
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png")
    first = new.index[(new["case_id"] == ids[0]) & (new["stack_id"] == "0")][0]
    new.loc[first, "image_path"] = str(bad)                                     # one stack of case 0 unreadable
    new = new[~((new["case_id"] == ids[1]) & (new["magnification"] == 10))]     # case 1 lacks 10x entirely
    new.to_csv(tmp_path / "new_tiles.csv", index=False)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(r.bundle), str(tmp_path / "new_tiles.csv"), "--out", str(out), "--quiet"]) == 0
    preds = pd.read_csv(out, dtype={"case_id": str})
    assert sorted(preds["case_id"]) == sorted([ids[0], ids[2]])
    assert preds.loc[preds["case_id"] == ids[0], "n_stacks"].item() == 1
    probs = preds[[c for c in preds.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    skipped = pd.read_csv(str(out) + ".skipped.csv", dtype={"case_id": str})
    assert skipped["case_id"].tolist() == [ids[1]] and "10x" in skipped["reason"].item()
    stacks = pd.read_csv(tmp_path / "preds.stacks.csv")
    assert "scale_weight_40x" in stacks.columns and len(stacks) == 3
    if load_bundle(r.bundle).meta.get("calibration"):  # 9 cases suffice for 90 % sets; then every row has its set
        assert preds["prediction_set"].notna().all() and set(preds["refer"]) <= {True, False}
