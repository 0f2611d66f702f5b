"""Tests of the dataset audit. Images are SYNTHETIC (numpy speckle + layers) unless marked realdata."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from breastfusion.data.audit import audit_cases, duplicate_groups, write_audit
from breastfusion.data.audit_report import render_markdown
from breastfusion.data.splits import check_no_leakage, make_splits

from conftest import write_png


def _synthetic_frame(seed: int, h: int = 180, w: int = 220, look_alike: bool = False) -> np.ndarray:
    """SYNTHETIC ultrasound-like frame: wavy tissue layers, blobs, multiplicative speckle, depth fade.

    Every seed shares the same look (bright top, dark bottom, horizontal layers), like real B-mode
    images of different patients. ``look_alike`` frames also share one large-scale layout (like two
    normal-tissue scans), so that they correlate at low resolution and only their texture differs.
    """
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, h)[:, None]
    wobble = gaussian_filter(rng.standard_normal((h, w)), 12) * 40
    layers = 0.55 + 0.45 * np.sin(2 * np.pi * (y * rng.uniform(4, 7) + wobble))
    blobs = gaussian_filter(rng.random((h, w)), 6)
    blobs = (blobs - blobs.min()) / (np.ptp(blobs) + 1e-9)
    if look_alike:
        shared = np.random.default_rng(99)
        big = gaussian_filter(shared.standard_normal((h, w)), 25)
        layers = 0.3 * layers + 0.7 * (0.5 + 0.5 * np.sin(2 * np.pi * y * 3.0)) * (1 + 4 * big)
    speckle = gaussian_filter(rng.rayleigh(1.0, (h, w)), 0.7)
    img = (0.25 + 0.75 * layers * blobs) * speckle * (1.0 - 0.75 * y)
    return np.clip(img / np.quantile(img, 0.995) * 235, 0, 255).astype(np.uint8)


def _with_calipers(img: np.ndarray) -> np.ndarray:
    """The same frame with white caliper crosses, a dotted measuring line and burnt-in text."""
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for x, y in ((60, 70), (150, 95)):
        d.line([(x - 7, y), (x + 7, y)], fill=255, width=2)
        d.line([(x, y - 7), (x, y + 7)], fill=255, width=2)
    for t in range(0, 90, 6):
        d.point((60 + t, 70 + t * 25 // 90), fill=255)
    d.text((8, 160), "RIGHT BREAST 2", fill=255)
    return np.asarray(pil)


def _crop(img: np.ndarray, top=0.10, bottom=0.0, left=0.05, right=0.07) -> np.ndarray:
    h, w = img.shape
    return img[int(top * h): h - int(bottom * h), int(left * w): w - int(right * w)]


def _rescale(img: np.ndarray, f: float) -> np.ndarray:
    h, w = img.shape
    return np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.BILINEAR))


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    """A small SYNTHETIC dataset with known duplicates, a corrupt file and mask problems."""
    root = tmp_path_factory.mktemp("synth_busi")
    a = _synthetic_frame(1)
    b = _synthetic_frame(2)
    imgs = {
        "benign/a": a,
        "benign/a_calipers": _with_calipers(a),
        "malignant/a_crop": _crop(a),                                     # 10 % crop, other label
        "benign/a_crop_small": _rescale(_crop(a, 0.04, 0.08, 0.12, 0.0), 0.85),  # crop + rescale
        "benign/b": b,
        "normal/b_copy": b.copy(),                                        # exact copy, other label
        "benign/c": _synthetic_frame(3),
        "malignant/d": _synthetic_frame(4),
        "malignant/e": _synthetic_frame(5, 200, 200),
        "normal/f": _synthetic_frame(6, look_alike=True),
        "normal/g": _synthetic_frame(7, look_alike=True),
    }
    rows = []
    for cid, img in imgs.items():
        label = cid.split("/")[0]
        p = write_png(root / f"{cid}.png", img)
        mask = np.zeros(img.shape, np.uint8)
        if label != "normal":
            mask[40:80, 50:110] = 255
        mp = write_png(root / f"{cid}_mask.png", mask)
        rows.append({"case_id": cid, "label": label, "image_path": str(p), "mask_path": str(mp)})
    cases = pd.DataFrame(rows)
    # A truncated PNG (first 300 bytes of a valid file): must be recorded, not crash the audit.
    bad = root / "benign" / "truncated.png"
    bad.write_bytes((root / "benign" / "c.png").read_bytes()[:300])
    # Mask size mismatch, empty mask in a lesion class, lesion mask in the normal class.
    small = write_png(root / "malignant" / "d_mask_small.png", np.full((50, 60), 255, np.uint8))
    cases.loc[cases.case_id == "malignant/d", "mask_path"] = str(small)
    empty = write_png(root / "malignant" / "e_mask_empty.png", np.zeros((200, 200), np.uint8))
    cases.loc[cases.case_id == "malignant/e", "mask_path"] = str(empty)
    blob = np.zeros((180, 220), np.uint8)
    blob[10:30, 10:30] = 255
    cases.loc[cases.case_id == "normal/f", "mask_path"] = str(write_png(root / "normal" / "f_mask2.png", blob))
    cases.loc[cases.case_id == "normal/g", "mask_path"] = float("nan")  # unknown: not checked
    cases = pd.concat([cases, pd.DataFrame([{"case_id": "benign/truncated", "label": "benign",
                                             "image_path": str(bad), "mask_path": ""}])], ignore_index=True)
    cases["age"] = [50, 61, np.nan, 40, 39, np.nan, 70, 45, 52, 33, 58, 47]
    result = audit_cases(cases, progress=False)
    return root, cases, result


def test_near_duplicates_grouped_and_unrelated_not(synthetic_set):
    _, cases, res = synthetic_set
    g = res.dup_group
    assert set(g) == set(cases.case_id)
    a_group = {g["benign/a"], g["benign/a_calipers"], g["malignant/a_crop"], g["benign/a_crop_small"]}
    assert len(a_group) == 1 and not next(iter(a_group)).startswith("solo:")
    assert g["benign/b"] == g["normal/b_copy"] != g["benign/a"]
    for cid in ("benign/c", "malignant/d", "malignant/e", "normal/f", "normal/g", "benign/truncated"):
        assert g[cid] == f"solo:{cid}", (cid, g[cid])
    assert len(res.dup_groups) == 2
    assert res.exact_groups == [["benign/b", "normal/b_copy"]]
    # All 6 pairs among the four copies of frame a are verified directly, with clear scores.
    assert len(res.pairs) == 6 and all(p["texture"] > 0.6 and p["overlap"] > 0.8 for p in res.pairs)
    # The two look-alike frames correlate at low resolution, were verified, and rejected on texture.
    fg = [p for p in res.borderline if {p["case_a"], p["case_b"]} == {"normal/f", "normal/g"}]
    assert len(fg) == 1 and fg[0]["coarse"] > 0.8 and fg[0]["texture"] < 0.2
    assert all(p["texture"] < 0.3 or p["overlap"] < 0.6 for p in res.borderline)


def test_label_conflicts(synthetic_set):
    _, _, res = synthetic_set
    conflicts = {tuple(sorted(c["distinct_labels"])): set(c["case_ids"]) for c in res.label_conflicts}
    assert conflicts == {
        ("benign", "malignant"): {"benign/a", "benign/a_calipers", "malignant/a_crop", "benign/a_crop_small"},
        ("benign", "normal"): {"benign/b", "normal/b_copy"},
    }


def test_bad_files_and_masks_recorded(synthetic_set):
    _, _, res = synthetic_set
    assert [u["case_id"] for u in res.unreadable] == ["benign/truncated"]
    assert "truncated.png" in res.unreadable[0]["error"]
    kinds = {(m["case_id"], m["kind"]) for m in res.mask_issues}
    assert kinds == {
        ("malignant/d", "mask_size_mismatch"),
        ("malignant/e", "empty_mask_in_lesion_class"),
        ("normal/f", "lesion_mask_in_no_lesion_class"),
        ("benign/truncated", "empty_mask_in_lesion_class"),
    } - {("benign/truncated", "empty_mask_in_lesion_class")}  # unreadable image: masks not checked
    mm = next(m for m in res.mask_issues if m["kind"] == "mask_size_mismatch")
    assert "60x50" in mm["detail"] and "220x180" in mm["detail"]


def test_tables_and_stats(synthetic_set):
    _, _, res = synthetic_set
    assert res.class_counts["benign"]["n"] == 6 and res.class_counts["normal"]["n"] == 3
    assert res.missing_values == {"age": {"missing": 2, "fraction": round(2 / 12, 4)}}
    st = res.image_stats
    assert st["n_read"] == 11 and st["modes"] == {"L": 11}
    assert st["width"]["max"] == 220 and st["height"]["min"] < 180


def test_no_lesion_classes_parameter(synthetic_set):
    _, cases, _ = synthetic_set
    res = audit_cases(cases[cases.case_id.isin(["normal/f", "malignant/e"])], progress=False,
                      no_lesion_classes=("normal", "malignant"), check_duplicates=False)
    kinds = {(m["case_id"], m["kind"]) for m in res.mask_issues}
    assert kinds == {("normal/f", "lesion_mask_in_no_lesion_class")}


def test_write_audit_relative_paths(synthetic_set, tmp_path):
    root, _, res = synthetic_set
    md, js = write_audit(res, tmp_path / "report")
    assert md.name == "audit.md" and js.name == "audit.json"
    data = json.loads(js.read_text())
    groups = {tuple(sorted(gr["paths"])) for gr in data["near_duplicate_groups"]}
    assert ("benign/b.png", "normal/b_copy.png") in groups
    assert ("benign/a.png", "benign/a_calipers.png", "benign/a_crop_small.png", "malignant/a_crop.png") in groups
    assert all(not p.startswith("/") for gr in data["near_duplicate_groups"] for p in gr["paths"])
    by_case = {c["case_id"]: c for c in data["cases"]}
    assert by_case["malignant/a_crop"]["group"] == by_case["benign/a"]["group"]
    assert by_case["malignant/a_crop"]["image"] == "malignant/a_crop.png"
    assert data["summary"]["label_conflict_groups"] == 2
    text = md.read_text()
    assert "Label conflicts" in text and "malignant/a_crop.png" in text and "truncated.png" in text
    assert not list((tmp_path / "report").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_duplicate_groups_feed_splits(synthetic_set):
    _, cases, res = synthetic_set
    groups = duplicate_groups(cases, audit=res)
    assert list(groups.index) == list(cases.case_id)
    assert groups.to_dict() == res.groups.to_dict() == res.dup_group
    sp = make_splits(cases.assign(label="x"), n_splits=3, seed=0, groups=groups)
    f = sp.set_index("case_id")["fold"]
    assert f[["benign/a", "benign/a_calipers", "malignant/a_crop", "benign/a_crop_small"]].nunique() == 1
    check_no_leakage(sp, cases, groups)


def test_threshold_parameter(synthetic_set):
    _, cases, _ = synthetic_set
    sub = cases[cases.case_id.isin(["benign/a", "benign/a_calipers", "malignant/a_crop", "benign/b",
                                    "normal/b_copy", "benign/c"])]
    # Calipers leave most blocks identical (score 1.0); a resampled crop scores ~0.9 and drops out.
    strict = audit_cases(sub, progress=False, near_dup_threshold=0.99)
    assert sorted(sorted(g["case_ids"]) for g in strict.dup_groups) == [
        ["benign/a", "benign/a_calipers"], ["benign/b", "normal/b_copy"]]
    assert strict.dup_group["malignant/a_crop"] == "solo:malignant/a_crop"
    with pytest.raises(ValueError, match="near_dup_threshold"):
        audit_cases(sub, progress=False, near_dup_threshold=0)


def test_suspicious_groups_flagged(synthetic_set):
    _, cases, res = synthetic_set
    # Strong links (copies of one frame) under several labels: a label conflict, not suspicious.
    assert res.summary["suspicious_groups"] == 0
    assert all(g["min_link"] > 0.8 and g["suspicious"] == "" for g in res.label_conflicts)
    # Two look-alike but different frames, forced together by a very low threshold and filed under two
    # labels: grouped over a weak link, so the group is flagged for a person to look at.
    sub = cases[cases.case_id.isin(["normal/f", "normal/g"])].assign(label=["normal", "benign"])
    low = audit_cases(sub, progress=False, near_dup_threshold=0.01)  # texture ~0.04 passes 0.01
    (g,) = low.dup_groups
    assert g["min_link"] < 0.3 and "weakest link" in g["suspicious"]
    assert low.summary["suspicious_groups"] == 1 and "Suspicious groups" in render_markdown(low)


# ---------------------------------------------------------------------------------------------------
# Same frame geometry, different content. Real exports of one scanner all share the black frame
# around the scan: a curvilinear probe's sector (fan) outline, or a rectangle with depth ticks and text
# at the border. Those sharp, identical edges must not make different images "near-duplicates".
# ---------------------------------------------------------------------------------------------------

def _frame_mask(kind: str, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(float)
    if kind == "fan":  # curvilinear probe: a sector between two arcs, apex above the image
        ay, ax = -0.35 * h, (w - 1) / 2
        r, ang = np.hypot(y - ay, x - ax), np.arctan2(x - ax, y - ay)
        return (np.abs(ang) <= 0.5) & (r >= 0.45 * h) & (r <= 1.3 * h - 2)
    m = np.zeros((h, w), bool)  # linear probe: a rectangle inside the black frame
    m[int(0.08 * h):h - 6, int(0.1 * w):w - int(0.1 * w)] = True
    return m


def _framed(seed: int, kind: str, h: int = 200, w: int = 240) -> np.ndarray:
    """SYNTHETIC scan (look-alike layout, own speckle per seed) in a black frame with ticks and text."""
    img = np.where(_frame_mask(kind, h, w), _synthetic_frame(seed, h, w, look_alike=True), 0).astype(np.uint8)
    img[np.arange(20, h, 18), w - 6:w - 2] = 230  # depth-scale ticks at the right border
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text((4, 2), "L12-5 4.0cm", fill=220)
    return np.asarray(pil)


def test_same_frame_geometry_is_not_a_duplicate(tmp_path):
    imgs = {}
    for kind, seed0 in (("fan", 10), ("rect", 20)):
        for s in range(4):  # identical frame, different tissue and speckle
            imgs[f"{kind}{s}"] = _framed(seed0 + s, kind)
        imgs[f"{kind}0_calipers"] = _with_calipers(imgs[f"{kind}0"])  # re-saved with calipers and text
        imgs[f"{kind}0_crop"] = _crop(imgs[f"{kind}0"])                # 10 % crop
    cases = pd.DataFrame([{"case_id": k, "label": "benign" if "0" in k else "malignant",
                           "image_path": str(write_png(tmp_path / f"{k}.png", v))} for k, v in imgs.items()])
    res = audit_cases(cases, progress=False)
    groups = sorted(sorted(g["case_ids"]) for g in res.dup_groups)
    assert groups == [["fan0", "fan0_calipers", "fan0_crop"], ["rect0", "rect0_calipers", "rect0_crop"]]
    assert all(p["texture"] > 0.7 for p in res.pairs)
    # The different images of one frame were verified (they look alike at low resolution) and scored
    # low on texture: the frame edge, ticks and text do not count.
    same_frame = [p for p in res.borderline if p["case_a"][:3] == p["case_b"][:3]]
    assert len(same_frame) >= 4
    assert all(p["texture"] < 0.3 for p in res.borderline)
    assert res.summary["label_conflict_groups"] == 0 and res.summary["suspicious_groups"] == 0


def test_synthetic_cohort_not_chained(tmp_path):
    """Different patients of the SYNTHETIC cohort (sector and rectangular frames) are never grouped."""
    from breastfusion.data.synthetic import make_synthetic_cohort

    cases = make_synthetic_cohort(tmp_path / "cohort", n_cases=40, image_size=96, seed=0)
    res = audit_cases(cases, progress=False)
    patient = dict(zip(cases.case_id, cases.patient_id))
    assert res.label_conflicts == []
    assert all(len(g["case_ids"]) <= 3 for g in res.dup_groups)
    assert all(len({patient[c] for c in g["case_ids"]}) == 1 for g in res.dup_groups)
    assert res.summary["suspicious_groups"] == 0


# ---------------------------------------------------------------------------------------------------
# Real data (BUSI). Counts measured on the 624-image development share: 125 duplicate groups holding
# 278 images, 1 exact-copy group, 5 groups with conflicting labels; ~40 s on one busy core.
# ---------------------------------------------------------------------------------------------------

_BUSI_CONFLICTS = [
    {"benign/benign (433)", "malignant/malignant (145)"},                        # byte-identical
    {"benign/benign (406)", "malignant/malignant (94)"},
    {"benign/benign (269)", "normal/normal (1)"},
    {"benign/benign (164)", "benign/benign (85)", "malignant/malignant (52)"},
    {"benign/benign (333)", "malignant/malignant (77)", "malignant/malignant (78)"},
]


@pytest.mark.realdata
def test_busi_subset_label_conflicts(busi_root):
    from breastfusion.data.importers import import_busi

    cases = import_busi(busi_root)
    wanted = set().union(*_BUSI_CONFLICTS)
    others = cases[~cases.case_id.isin(wanted)].sample(40, random_state=0)
    sub = pd.concat([cases[cases.case_id.isin(wanted)], others])
    res = audit_cases(sub, progress=False)
    found = [set(c["case_ids"]) for c in res.label_conflicts]
    for conflict in _BUSI_CONFLICTS:
        assert any(conflict <= f for f in found), conflict
    assert ["benign/benign (433)", "malignant/malignant (145)"] in res.exact_groups


@pytest.mark.realdata
@pytest.mark.slow
def test_busi_full_audit(busi_root, tmp_path):
    from breastfusion.data.importers import import_busi

    cases = import_busi(busi_root)
    res = audit_cases(cases, progress=False)  # its speed is measured by benchmarks, not asserted here
    assert res.unreadable == []
    assert len(res.dup_groups) >= 110
    assert res.n_near_dup_images >= 240
    assert len(res.label_conflicts) >= 4
    assert len(res.exact_groups) >= 1
    # Not everything is glued together: the largest group stays small.
    assert max(len(g["case_ids"]) for g in res.dup_groups) <= 8
    md, js = write_audit(res, tmp_path)
    data = json.loads(js.read_text())
    assert all(p.split("/")[0] in ("benign", "malignant", "normal")
               for g in data["near_duplicate_groups"] for p in g["paths"])
    groups = duplicate_groups(cases, audit=res)
    sp = make_splits(cases, n_splits=5, seed=0, groups=groups)
    check_no_leakage(sp, cases, groups)


def test_clinical_column_types_reported(tmp_path, caplog):
    """Issue 9 item 1: each clinical column's type, missing markers and ambiguity are in audit.json / audit.md
    and an ambiguous column is logged. Tiny SYNTHETIC images and table."""
    import logging

    rows = []
    for i in range(20):
        p = write_png(tmp_path / f"c{i}.png", _synthetic_frame(100 + i, 40, 48))
        rows.append({"case_id": f"c{i}", "label": "benign" if i % 2 else "malignant", "image_path": str(p)})
    cases = pd.DataFrame(rows)
    cases["age"] = [str(40 + i) for i in range(17)] + ["not available", "Not available", "N/A"]
    cases["ldh"] = [str(150 + 3 * i) for i in range(18)] + [">400", "approx 200"]
    cases["halo"] = ["yes", "no", "not applicable", "no"] * 5
    cases["grade"] = [1, 2, 3, 2] * 5  # whole numbers with 3 levels: codes or a score?
    with caplog.at_level(logging.WARNING, logger="breastfusion"):
        res = audit_cases(cases, progress=False, check_duplicates=False)
    age, ldh, halo = (res.column_types[c] for c in ("age", "ldh", "halo"))
    assert age["kind"] == "numeric" and age["missing"] == 3 and not age["flags"]
    assert age["missing_tokens_seen"] == {"not available": 1, "Not available": 1, "N/A": 1}
    assert halo["kind"] == "bool" and halo["missing"] == 5
    assert ldh["kind"] == "numeric" and ldh["flags"] == ["text_in_numbers"]
    assert {"value": ">400", "row": "case 'c18'"} in ldh["examples"]
    assert res.missing_values["age"]["missing"] == 3  # text markers count as missing
    assert res.column_types["grade"]["flags"] == ["few_integer_levels"]
    assert res.summary["ambiguous_columns"] == 2
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("'ldh'" in m and "'>400' (case 'c18')" in m and "data.column_types" in m for m in logged)
    assert any("'grade'" in m and "may be codes" in m for m in logged)
    md, js = write_audit(res, tmp_path / "audit")
    assert json.loads(js.read_text())["column_types"]["ldh"]["kind"] == "numeric"
    text = md.read_text()
    assert "## Clinical column types" in text and "text_in_numbers" in text and "'not available' x1" in text
    declared = audit_cases(cases, progress=False, check_duplicates=False, column_types={"ldh": "numeric"})
    assert "case 'c18'" in declared.column_types["ldh"]["error"]


def test_only_input_columns_are_warned_about(tmp_path, caplog):
    """Issue 10: a sheet's excluded columns (how the truth was found, the histology) are typed and listed in the
    audit, but their ambiguities are not run-log warnings; an input column's still are. SYNTHETIC table."""
    import logging

    import numpy as np
    import pandas as pd
    from PIL import Image

    from breastfusion.data.audit import audit_cases

    rows = []
    for i in range(12):
        p = tmp_path / f"c{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8)).save(p)
        rows.append({"case_id": f"c{i}", "image_path": str(p), "label": "benign" if i % 2 else "malignant",
                     "signs": "palpable&pain" if i % 3 == 0 else "no",
                     "diagnosis": "fibroadenoma&cyst" if i % 4 == 0 else "carcinoma"})
    cases = pd.DataFrame(rows)
    with caplog.at_level(logging.INFO):
        res = audit_cases(cases, check_duplicates=False, progress=False, input_columns=["signs"])
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("'signs'" in m for m in warned)
    assert not any("'diagnosis'" in m for m in warned)
    assert "looks_multi_valued" in res.column_types["diagnosis"]["flags"]  # still in the audit report
