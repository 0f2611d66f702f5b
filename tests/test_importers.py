"""The importer registry reachable from the config (``data.importer``) and the CLI (``audit --importer``), and
run folders recorded before a key existed resuming when the key holds the value that does what they did."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from breastfusion.cli import main
from breastfusion.config import load_config
from breastfusion.data.importers import IMPORTERS, import_cases
from breastfusion.errors import ConfigError
from breastfusion.run_state import ADDED_LATER, Stage, check_and_record
from conftest import require_shared, write_png


def _table(tmp_path, rng):
    rows = []
    for i in range(4):
        p = write_png(tmp_path / f"img{i}.png", (rng.random((32, 32)) * 255).astype("uint8"))
        rows.append({"case_id": f"c{i}", "image_path": str(p), "label": ["benign", "malignant"][i % 2]})
    path = tmp_path / "cases.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_named_importer_reads_a_table_and_an_unknown_name_lists_the_known_ones(tmp_path, rng):
    path = _table(tmp_path, rng)
    assert import_cases(path, importer="cases")["case_id"].tolist() == import_cases(path)["case_id"].tolist()
    with pytest.raises(ConfigError, match="Unknown importer 'mammography'; known: breakhis, breast_lesions_usg"):
        import_cases(path, importer="mammography")
    assert set(IMPORTERS) == {"busi", "breast_lesions_usg", "breakhis", "cases"}


@pytest.mark.realdata
def test_breakhis_is_reachable_from_the_cli_and_the_config(tmp_path):
    folder = require_shared("breakhis")
    # auto would read the folder as BUSI and find no benign/ malignant/ normal/ folders
    assert main(["audit", str(folder), "--importer", "breakhis", "--out", str(tmp_path / "cli")]) == 0
    audit = json.loads((tmp_path / "cli" / "audit.json").read_text())
    cases = import_cases(folder, importer="breakhis")
    assert audit["n_cases"] == len(cases) > 0
    cfg = load_config(None, [f"data.source={folder}", "data.importer=breakhis"])
    assert main(["audit", "--out", str(tmp_path / "cfg"), "--set", f"data.source={folder}",
                 "--set", "data.importer=breakhis"]) == 0
    assert cfg.data.importer == "breakhis"


def test_a_run_recorded_before_a_key_existed_resumes_at_the_old_behaviour_only(tmp_path):
    stage = Stage("classical", "classical models", ("data",), exists=True)
    old = load_config(None, [])
    check_and_record(tmp_path, old, [stage], {"cases": "abc"}, resume=False)
    fp = json.loads((tmp_path / "fingerprints.json").read_text())
    for key in ADDED_LATER:  # as a run recorded before these keys existed
        fp["stages"]["classical"]["settings"].pop(key, None)
    (tmp_path / "fingerprints.json").write_text(json.dumps(fp))
    check_and_record(tmp_path, load_config(None, []), [stage], {"cases": "abc"}, resume=True)  # same behaviour

    (tmp_path / "fingerprints.json").write_text(json.dumps(fp))
    with pytest.raises(ConfigError, match=r"data.importer: <unset> → busi"):
        check_and_record(tmp_path, load_config(None, ["data.importer=busi"]), [stage], {"cases": "abc"}, resume=True)
