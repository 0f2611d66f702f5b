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
