import numpy as np
import pandas as pd
import pytest

from breastfusion.data.cases import read_cases, validate_cases, write_cases
from breastfusion.data.importers import import_busi
from breastfusion.errors import DataError
from conftest import write_png


def _table(tmp_path, n=3):
    for i in range(n):
        write_png(tmp_path / "img" / f"c{i}.png", np.full((8, 8), 10 * i, np.uint8))
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "label": ["benign", "malignant", "normal"][:n],
                         "image_path": [f"img/c{i}.png" for i in range(n)], "age": [40, np.nan, 61]})


def test_relative_paths_round_trip(tmp_path):
    df = _table(tmp_path)
    df.to_csv(tmp_path / "cases.csv", index=False)
    cases = read_cases(tmp_path / "cases.csv")
    assert cases["image_path"].str.startswith(str(tmp_path)).all()
    assert (cases["patient_id"] == cases["case_id"]).all()
    out = write_cases(cases, tmp_path / "copy.csv")
    assert pd.read_csv(out)["image_path"].tolist() == df["image_path"].tolist()


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.assign(case_id=["a", "a", "b"]), "case_id 'a' appears more than once"),
    (lambda d: d.assign(label=["benign", None, "normal"]), r"row 3 .*'label' is empty"),
    (lambda d: d.assign(age=[1.0, np.inf, 2.0]), r"row 3 .*column 'age': infinite"),
    (lambda d: d.assign(image_path=["img/c0.png", "img/nope.png", "img/c2.png"]), r"row 3 .*nope.png"),
    (lambda d: d.iloc[0:0], "empty"),
])
def test_validation_names_row_and_column(tmp_path, mutate, pattern):
    df = mutate(_table(tmp_path))
    df.to_csv(tmp_path / "cases.csv", index=False)
    with pytest.raises(DataError, match=pattern):
        read_cases(tmp_path / "cases.csv")


def test_unknown_label(tmp_path):
    df = _table(tmp_path)
    df["image_path"] = [str(tmp_path / p) for p in df["image_path"]]
    with pytest.raises(DataError, match="unknown label 'normal'"):
        validate_cases(df, labels=["benign", "malignant"])


def test_busi_importer_layout(tmp_path):
    for cls in ("benign", "malignant", "normal"):
        write_png(tmp_path / cls / f"{cls} (1).png", np.zeros((8, 8), np.uint8))
        write_png(tmp_path / cls / f"{cls} (1)_mask.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "benign" / "benign (1)_mask_1.png", np.zeros((8, 8), np.uint8))
    cases = import_busi(tmp_path)
    assert sorted(cases["label"]) == ["benign", "malignant", "normal"]
    row = cases.set_index("case_id").loc["benign/benign (1)"]
    assert row["mask_path"].count(";") == 1 and row["mask_path"].endswith("benign (1)_mask_1.png")


@pytest.mark.realdata
def test_busi_real(busi_root):
    cases = import_busi(busi_root)
    assert len(cases) == 624
    assert cases["label"].value_counts().to_dict() == {"benign": 351, "malignant": 167, "normal": 106}
    assert cases["mask_path"].str.contains(";").sum() >= 10  # several lesions in some images


def test_no_lesion_survives_a_csv_round_trip(tmp_path):
    """'' (no lesion) and NaN (no mask available) stay different through a CSV cases table."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from breastfusion.data.cases import NO_LESION, read_cases, write_cases

    for name in ("a", "b", "c"):
        Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / f"{name}.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "a_mask.png")
    cases = pd.DataFrame({"case_id": ["a", "b", "c"], "label": ["benign", "normal", "benign"],
                          "image_path": [str(tmp_path / f"{n}.png") for n in "abc"],
                          "mask_path": [str(tmp_path / "a_mask.png"), "", np.nan]})
    write_cases(cases, tmp_path / "cases.csv")
    assert NO_LESION in (tmp_path / "cases.csv").read_text()
    back = read_cases(tmp_path / "cases.csv")
    assert back.loc[1, "mask_path"] == "" and pd.isna(back.loc[2, "mask_path"])
    assert back.loc[0, "mask_path"].endswith("a_mask.png")
