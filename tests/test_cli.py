import json

import pandas as pd

from breastfusion.cli import main


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "--set", "cv.n_splits=3"]) == 0
    assert "n_splits: 3" in capsys.readouterr().out


def test_bad_config_is_a_clear_error_not_a_traceback(capsys):
    assert main(["config", "--set", "train.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: unknown key" in err and "Traceback" not in err


def test_synthetic_then_audit(tmp_path, capsys):
    assert main(["synthetic", str(tmp_path / "cohort"), "--n-cases", "12", "--image-size", "48"]) == 0
    cases = pd.read_csv(tmp_path / "cohort" / "cases.csv")
    assert len(cases) == 12 and cases["_synthetic"].all()
    assert main(["audit", str(tmp_path / "cohort" / "cases.csv"), "--out", str(tmp_path / "audit")]) == 0
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["n_cases"] == 12 and len(audit["cases"]) == 12


def test_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "a")]) == 2
    assert "nothing.csv" in capsys.readouterr().err


def test_nuclei_segment_writes_labels_and_features_and_skips_bad_files(tmp_path, capsys):
    """SYNTHETIC H&E-like image: purple disks on pink."""
    import numpy as np
    from PIL import Image

    from breastfusion.features.nuclei.annotations import read_instance_mask

    rng = np.random.default_rng(0)
    img = np.zeros((160, 160, 3), np.uint8) + np.array([235, 190, 215], np.uint8)
    yy, xx = np.mgrid[:160, :160]
    for cy, cx in [(30, 30), (30, 100), (90, 60), (120, 130), (80, 120)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 12 ** 2] = [90, 40, 140]
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "tile.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    assert main(["nuclei", "segment", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    labels = read_instance_mask(tmp_path / "out" / "tile_nuclei.png")
    assert labels.max() == 5
    feats = pd.read_csv(tmp_path / "out" / "nuclei_features.csv")
    assert len(feats) == 5 and (feats["image"] == "tile.png").all()
    assert "broken.png" in capsys.readouterr().err


def test_tile_command_on_real_slide(tmp_path):
    from conftest import require_shared

    slide = require_shared("he_samples", "cmu_small_region.svs")
    assert main(["tile", str(slide), "--magnifications", "20,10", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    index = pd.read_csv(tmp_path / "t" / "tiles.csv")
    assert len(index) > 0 and {"path_20x", "path_10x"} <= set(index.columns)
