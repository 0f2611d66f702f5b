"""The CLI and the Predictor under misuse (issue #9, items 7 and 10): missing or renamed clinical columns,
bad output paths and formats, malformed overrides, and exit codes when nothing was scored.

Uses a tiny SYNTHETIC fusion bundle with random weights (and a classical model fitted on random labels):
the tests check behaviour at the edges, not accuracy."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breastfusion.cli import main
from breastfusion.errors import DataError

CLASSES = ["benign", "malignant", "normal"]
CLINICAL = ["age", "density", "family_history"]


def _make_bundle(path: Path) -> Path:
    """A SYNTHETIC fusion bundle (random weights, test_efficientnet at 48 px) with three clinical columns and a
    classical 'lgbm' model fitted on random labels."""
    import timm
    import torch

    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.classical import adapt_to_size, make_classical, save_classical
    from breastfusion.models.fusion import FusionClassifier
    from breastfusion.tabular_inputs import numeric_for_classical

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"age": rng.uniform(30, 80, 40).round(),
                          "density": rng.choice(["A", "B", "C", "D"], 40),
                          "family_history": rng.choice(["yes", "no"], 40)})
    pre = TabularPreprocessor().fit(table)
    X = numeric_for_classical(table)
    y = np.array(CLASSES * 14)[:40]
    skops = save_classical(adapt_to_size(make_classical("lgbm"), len(X)).fit(X, y), path.parent / "lgbm.skops")
    torch.manual_seed(0)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    dims = dict(image_dim=16, tabular_dim=8, tabular_hidden=16, fusion_hidden=16, dropout=0.1)
    model = FusionClassifier(len(CLASSES), variant="fusion", backbone=backbone, n_tabular=pre.n_features_out_, **dims)
    return save_bundle(
        path, model, classes=CLASSES,
        model_meta={"variant": "fusion", "backbone": "test_efficientnet", "n_tabular": pre.n_features_out_, **dims},
        image_meta={"size": 48, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                    "color": "gray_to_rgb"},
        tabular=pre, feature_meta={"clinical_columns": CLINICAL, "radiomics": None,
                                   "classical": {"models": ["lgbm"], "features": list(X.columns), "format": "skops"}},
        config_yaml="", synthetic=True, extra_files={"classical/lgbm.skops": skops})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return _make_bundle(tmp_path_factory.mktemp("misuse") / "bundle")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        p = root / f"c{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(p)  # SYNTHETIC noise image
        paths.append(p)
    return paths


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """The CLI would use every core; the test machine is shared."""
    import torch

    monkeypatch.setattr("breastfusion.devices.configure_threads", lambda threads: torch.set_num_threads(1))


def _cases(images, tmp_path, **rename) -> Path:
    df = pd.DataFrame({"case_id": [p.stem for p in images], "image_path": [str(p) for p in images],
                       "age": [55, 61, 70], "density": ["B", "C", "A"], "family_history": ["no", "yes", "no"]})
    path = tmp_path / "cases.csv"
    df.rename(columns=rename).to_csv(path, index=False)
    return path


# -- item 7: missing or renamed clinical columns -------------------------------------------------------------

def test_api_warns_on_renamed_clinical_column_and_records_it(bundle, images, tmp_path, caplog):
    from breastfusion.inference.predictor import Predictor

    path = _cases(images, tmp_path, age="Age")
    with caplog.at_level("WARNING", logger="breastfusion"):
        out = Predictor.load(bundle).predict(path)
    assert len(out) == 3
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "'age'" in msg and "'Age'" in msg and "did you mean" in msg.lower()
    assert "expected" in msg and "found" in msg
    assert (out["absent_clinical_columns"] == "age").all()


def test_api_strict_refuses_missing_clinical_columns(bundle, images, tmp_path):
    from breastfusion.inference.predictor import Predictor

    path = _cases(images, tmp_path, age="Age")
    with pytest.raises(DataError, match=r"'age'.*'Age'"):
        Predictor.load(bundle).predict(path, strict=True)
    ok = Predictor.load(bundle).predict(_cases(images, tmp_path), strict=True)
    assert len(ok) == 3 and "absent_clinical_columns" not in ok.columns


def test_cli_warns_and_strict_refuses_for_classical_model(bundle, images, tmp_path, capsys, caplog):
    path = _cases(images, tmp_path, age="Age", density="breast_density")
    out = tmp_path / "p.csv"
    with caplog.at_level("WARNING", logger="breastfusion"):
        assert main(["predict", str(bundle), str(path), "--out", str(out), "--model", "lgbm", "--quiet"]) == 0
    msg = " ".join(r.getMessage() for r in caplog.records) + capsys.readouterr().err
    assert "'age'" in msg and "'density'" in msg and "'Age'" in msg
    preds = pd.read_csv(out)
    assert len(preds) == 3 and (preds["model"] == "lgbm").all()
    assert set(preds["absent_clinical_columns"]) == {"age, density"}
    out.unlink()
    assert main(["predict", str(bundle), str(path), "--out", str(out), "--model", "lgbm", "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'age'" in err and "Traceback" not in err and not out.exists()


def test_cli_strict_refuses_for_deep_model(bundle, images, tmp_path, capsys):
    path = _cases(images, tmp_path, family_history="FamilyHistory")
    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle), str(path), "--out", str(out), "--strict", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'family_history'" in err and "'FamilyHistory'" in err and not out.exists()


def test_bare_image_is_no_clinical_data_said_once(bundle, images, caplog):
    from breastfusion.inference.predictor import Predictor

    with caplog.at_level("INFO", logger="breastfusion"):
        out = Predictor.load(bundle).predict(images[0].parent, strict=True)  # a folder: no table to be strict about
    assert len(out) == 3 and "absent_clinical_columns" not in out.columns
    notes = [r for r in caplog.records if "no clinical data" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "INFO"


# -- item 10: output paths and formats ----------------------------------------------------------------------

def _no_traceback(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and any(line.startswith("error: ") for line in err.splitlines()), err
    return err


def test_out_onto_existing_folder_is_a_message(bundle, images, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    assert main(["predict", str(bundle), str(images[0]), "--out", str(tmp_path / "adir"), "--quiet"]) == 2
    err = _no_traceback(capsys)
    assert "adir" in err and "folder" in err


def test_out_under_a_file_is_a_message(bundle, images, tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    assert main(["predict", str(bundle), str(images[0]), "--out", str(tmp_path / "afile.txt" / "o.csv"),
                 "--quiet"]) == 2
    assert "afile.txt" in _no_traceback(capsys)


def test_out_into_read_only_folder_is_a_message(bundle, images, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: simulate the read-only folder at the file-creation call
        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **kw):
            if dir is not None and Path(dir).resolve() == ro.resolve():
                raise PermissionError(13, "Permission denied", str(ro / "x.tmp"))
            return real(*a, dir=dir, **kw)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        assert main(["predict", str(bundle), str(images[0]), "--out", str(ro / "o.csv"), "--quiet"]) == 2
        err = _no_traceback(capsys)
        assert "ro" in err and "ermission" in err
    finally:
        ro.chmod(0o755)


def test_xlsx_is_a_real_workbook_or_refused(bundle, images, tmp_path, capsys):
    out = tmp_path / "p.xlsx"
    rc = main(["predict", str(bundle), str(images[0]), "--out", str(out), "--quiet"])
    try:
        import openpyxl  # noqa: F401
    except ImportError:
        assert rc == 2 and not out.exists()
        err = _no_traceback(capsys)
        assert ".xlsx" in err and ".csv" in err and ".parquet" in err and "openpyxl" in err
        return
    assert rc == 0 and out.read_bytes()[:2] == b"PK"  # a zip container, not CSV text
    assert len(pd.read_excel(out)) == 1


def test_unknown_output_extension_is_refused_before_scoring(bundle, images, tmp_path, capsys):
    assert main(["predict", str(bundle), str(images[0]), "--out", str(tmp_path / "p.json"), "--quiet"]) == 2
    err = _no_traceback(capsys)
    assert "'.json'" in err and ".csv" in err
    assert not list(tmp_path.glob("p.json*"))


def test_tsv_and_parquet_outputs(bundle, images, tmp_path):
    assert main(["predict", str(bundle), str(images[0]), "--out", str(tmp_path / "p.tsv"), "--quiet"]) == 0
    tsv = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert len(tsv) == 1 and "prob_malignant" in tsv.columns  # tab-separated, not CSV under a .tsv name
    assert main(["predict", str(bundle), str(images[0]), "--out", str(tmp_path / "p.parquet"), "--quiet"]) == 0
    assert len(pd.read_parquet(tmp_path / "p.parquet")) == 1


# -- item 10: exit codes when nothing or only part was scored ------------------------------------------------

def test_nothing_scored_is_a_non_zero_exit(bundle, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle), str(tmp_path / "broken.png"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nothing" in err.lower() and "1 case" in err and "Traceback" not in err
    assert (tmp_path / "p.csv.skipped.csv").exists()


def test_partial_success_is_zero_and_says_how_many_were_skipped(bundle, images, tmp_path, capsys):
    df = pd.read_csv(_cases(images, tmp_path))
    df.loc[1, "image_path"] = str(tmp_path / "absent.png")
    df.to_csv(tmp_path / "in.csv", index=False)
    assert main(["predict", str(bundle), str(tmp_path / "in.csv"), "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "scored 2 case(s)" in captured.out and "skipped 1 case(s)" in captured.err



def test_predict_caps_pixels_like_the_service(bundle, images, tmp_path, capsys):
    """Item 8: the CLI caps image size as `serve --max-pixels` does; an image over the cap is skipped with the
    reason, before it is decoded (64 x 64 = 4096 pixels here)."""
    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle), str(images[0]), "--out", str(out), "--quiet", "--max-pixels", "4000"]) == 2
    skipped = pd.read_csv(tmp_path / "p.csv.skipped.csv")
    assert "4096 pixels" in skipped["reason"][0] and "limit is 4000" in skipped["reason"][0]
    assert main(["predict", str(bundle), str(images[0]), "--out", str(out), "--quiet", "--max-pixels", "5000"]) == 0
    assert main(["predict", str(bundle), str(images[0]), "--out", str(out), "--max-pixels", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err

# -- item 10: config overrides and files ---------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [("a=[1", "a=[1"), ("train.batch_size", "key=value"),
                                              ("=3", "=3"), ("train..batch_size=3", "train..batch_size")])
def test_bad_overrides_are_one_line_messages(override, needle, capsys):
    assert main(["config", "--set", override]) == 2
    err = _no_traceback(capsys)
    assert needle in err


def test_missing_or_folder_config_file_is_a_message(tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path / "nothere.yaml")]) == 2
    assert "nothere.yaml" in _no_traceback(capsys)
    assert main(["config", "--config", str(tmp_path)]) == 2
    assert "folder" in _no_traceback(capsys)
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    assert main(["config", "--config", str(tmp_path / "latin1.yaml")]) == 2
    assert "latin1.yaml" in _no_traceback(capsys)


def test_override_into_an_empty_section_of_a_config_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train:\ncv:\n  n_splits: 3\n")
    assert main(["config", "--config", str(tmp_path / "c.yaml"), "--set", "train.batch_size=4"]) == 0
    assert "batch_size: 4" in capsys.readouterr().out


# -- item 10: other subcommands on bad paths -----------------------------------------------------------------

def test_folder_outputs_onto_a_file_are_messages(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    assert main(["synthetic", str(tmp_path / "afile.txt"), "--n-cases", "6", "--image-size", "32"]) == 2
    assert "afile.txt" in _no_traceback(capsys)
    assert main(["synthetic", str(tmp_path / "cohort"), "--n-cases", "6", "--image-size", "32"]) == 0
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "cohort" / "cases.csv"), "--out", str(tmp_path / "afile.txt")]) == 2
    assert "afile.txt" in _no_traceback(capsys)


def test_calibrate_with_a_bad_predictions_file_is_a_message(bundle, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    for bad in (tmp_path / "empty.csv", tmp_path / "img.png", tmp_path, tmp_path / "absent.csv"):
        assert main(["calibrate", str(bundle), str(bad)]) == 2
        assert bad.name in _no_traceback(capsys)


def _grading_bundle(path: Path) -> Path:
    """A SYNTHETIC histology grading bundle (random weights, two magnifications) that reads two clinical columns."""
    import timm
    import torch

    from breastfusion.features.tabular import TabularPreprocessor
    from breastfusion.bundles.bundle import save_bundle
    from breastfusion.models.multiscale import MultiScaleGrader

    rng = np.random.default_rng(0)
    pre = TabularPreprocessor().fit(pd.DataFrame({"age": rng.uniform(30, 80, 20).round(),
                                                  "er_status": rng.choice(["pos", "neg"], 20)}))
    torch.manual_seed(0)
    dims = dict(attention_dim=16, attention_heads=2, token_grid=1, tabular_dim=8, tabular_hidden=16, fusion_hidden=16)
    m = MultiScaleGrader(3, backbones={"cnn": timm.create_model("test_efficientnet", pretrained=False, num_classes=0)},
                         n_scales=2, n_tabular=pre.n_features_out_, dim=16, heads=2, grid=1, objective="ordinal",
                         tabular_dim=8, tabular_hidden=16, fusion_hidden=16)
    meta = {"kind": "multiscale", "backbones": {"cnn": "test_efficientnet"}, "backbone_kwargs": {"cnn": {}},
            "magnifications": [20.0, 10.0], "objective": "ordinal", "n_tabular": pre.n_features_out_,
            "dropout": 0.2, "norms": {"cnn": [[0.5] * 3, [0.5] * 3]}, **dims}
    return save_bundle(path, m, classes=["1", "2", "3"], model_meta=meta, image_meta={"size": 32, "range": "0-1 RGB"},
                       tabular=pre, feature_meta={"clinical_columns": ["age", "er_status"], "pathomics": None},
                       config_yaml="", synthetic=True)


def test_cli_grading_cases_table_with_renamed_column(tmp_path, capsys):
    from PIL import Image

    bundle = _grading_bundle(tmp_path / "grading")
    rng = np.random.default_rng(0)
    rows = []
    for case in ("a", "b"):
        for mag in (20, 10):
            p = tmp_path / "tiles" / f"{case}_{mag}.png"
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(p)  # SYNTHETIC noise tile
            rows.append({"case_id": case, "stack_id": "0", "magnification": mag, "image_path": str(p)})
    pd.DataFrame(rows).to_csv(tmp_path / "tiles.csv", index=False)
    pd.DataFrame({"case_id": ["a", "b"], "age": [50, 60], "ER": ["pos", "neg"]}).to_csv(tmp_path / "cases.csv",
                                                                                      index=False)
    args = ["predict", str(bundle), str(tmp_path / "tiles.csv"), "--cases", str(tmp_path / "cases.csv"),
            "--out", str(tmp_path / "p.csv"), "--quiet"]
    assert main(args) == 0
    assert set(pd.read_csv(tmp_path / "p.csv")["absent_clinical_columns"]) == {"er_status"}
    assert "er_status" in capsys.readouterr().err
    assert main(args + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert "'er_status'" in err and "'ER'" in err and "Traceback" not in err
