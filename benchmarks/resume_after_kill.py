"""Does ``breastfusion train --resume`` after ``kill -9`` give the same results as an uninterrupted run?
(issue 9, item 3 and its "must hold").

A software check on the built-in SYNTHETIC cohort (labelled so everywhere; not a model-quality figure). Run A
trains uninterrupted. Run B is the same command, SIGKILLed by this script at several points — between folds,
inside a fold (after an epoch checkpoint), between models and inside the final bundle's training — and resumed
with ``--resume`` after each kill, as a user would. Then every out-of-fold prediction table, and the final
bundle's weights, are compared between A and B.

    python benchmarks/resume_after_kill.py --work runs/resume_kill

Prints a JSON summary (max |difference| per prediction table and for the bundle weights).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from _machine import machine_description

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["name=resume-kill-check", "image.size=64", "cv.n_splits=3", "train.stage1_epochs=6",
            "train.stage2_epochs=2", "train.patience=3", "train.tabular_epochs=15", "experiment.n_boot=50",
            "experiment.deep_models=[fusion,image]", "experiment.classical_models=[logreg,lgbm]",
            "experiment.final_models=[fusion]", "experiment.explain_cases=0"]
# Kill points: the file whose appearance triggers SIGKILL (the run writes each atomically).
KILL_AT = ["deep/fusion/fold0/predictions.csv",       # between folds
           "deep/fusion/fold1/last.pt",               # inside a fold, after an epoch checkpoint
           "predictions/fusion.csv",                  # between models
           "deep/image_only/fold2/last.pt",           # inside the last fold of the second model
           "deep/final_fusion/last.pt"]               # inside the final bundle's training


def train_cmd(cases: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "breastfusion.cli", "train", "--data", str(cases), "--out", str(out), "--quiet"]
    for s in SETTINGS:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def run_until(cmd: list[str], out: Path, trigger: str | None, log) -> tuple[str, float]:
    """Run ``cmd``; SIGKILL it as soon as ``out/trigger`` exists. Returns (how it ended, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    while proc.poll() is None:
        if trigger is not None and (out / trigger).exists():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"killed at {trigger}", time.perf_counter() - t0
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"train exited with {proc.returncode}; see the log")
    return "finished", time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "resume_kill")
    ap.add_argument("--n-cases", type=int, default=90)
    args = ap.parse_args()
    from breastfusion.data.synthetic import make_synthetic_cohort

    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    make_synthetic_cohort(args.work / "cohort", n_cases=args.n_cases, image_size=96, seed=0)
    cases = args.work / "cohort" / "cases.csv"
    a, b = args.work / "A_uninterrupted", args.work / "B_killed"
    with open(args.work / "train.log", "w") as log:
        _, wall_a = run_until(train_cmd(cases, a, False), a, None, log)
        events, wall_b = [], 0.0
        for i, trigger in enumerate([*KILL_AT, None]):
            how, secs = run_until(train_cmd(cases, b, resume=i > 0), b, trigger, log)
            events.append(how)
            wall_b += secs
            if how == "finished":
                break
    stale = sorted(str(p.relative_to(b)) for p in b.rglob("*.tmp"))
    diffs = {}
    for pa in sorted((a / "predictions").glob("*.csv")):
        da = pd.read_csv(pa, dtype={"case_id": str}).sort_values("case_id")
        db = pd.read_csv(b / "predictions" / pa.name, dtype={"case_id": str}).sort_values("case_id")
        probs = [c for c in da.columns if c.startswith("prob_")]
        assert list(da["case_id"]) == list(db["case_id"]), pa.name
        diffs[pa.stem] = float(np.abs(da[probs].to_numpy() - db[probs].to_numpy()).max())
    from safetensors.numpy import load_file

    wa = load_file(a / "bundles" / "fusion" / "model.safetensors")
    wb = load_file(b / "bundles" / "fusion" / "model.safetensors")
    weight_diff = max(float(np.abs(wa[k].astype(np.float64) - wb[k]).max()) if wa[k].size else 0.0 for k in wa)
    summary = {"date": str(date.today()), "machine": machine_description(), "data": "SYNTHETIC cohort",
               "cases": args.n_cases, "kills": events, "wall_uninterrupted_s": round(wall_a, 1),
               "wall_killed_and_resumed_s": round(wall_b, 1), "max_abs_diff_oof_probabilities": diffs,
               "max_abs_diff_bundle_weights": weight_diff, "stale_tmp_files_left": stale}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if max(diffs.values(), default=0.0) <= 1e-6 and weight_diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
