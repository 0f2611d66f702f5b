"""The HTML report opens with what matters: a summary first (models side by side with CIs, the best model's ROC and
confusion matrix, the caveats), per-model details folded, human labels, and a page that fits 1280 px.

All predictions here are SYNTHETIC (random logits with a chosen signal per model)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breastfusion.evaluation.insight import ReportSection
from breastfusion.evaluation.metrics import evaluate
from breastfusion.evaluation.report import write_report

CLASSES = ["benign", "malignant", "normal"]
MODELS = {"logreg": 0.6, "rf": 0.9, "fusion": 2.5, "image_only": 1.4, "tabular_only": 1.0}
TIMINGS = {"audit_s": 3.2, "radiomics_s": 41.0, "classical_s": 12.5, "fusion_s": 812.3, "image_only_s": 700.1,
           "tabular_only_s": 30.2, "final_fusion_s": 190.0, "report_sections_s": 25.0, "total_s": 1814.3}
EXPERT_NOTE = ("Radiomics features are computed inside a lesion mask. When that mask is drawn by an expert, the "
               "features carry the expert's information.")


def _preds(name: str, signal: float, n: int, seed: int) -> pd.DataFrame:
    """SYNTHETIC out-of-fold predictions, 5 folds."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += signal
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    df = pd.DataFrame({"case_id": [f"c{i:03d}" for i in range(n)], "fold": np.arange(n) % 5,
                       "label": np.array(CLASSES)[y]})
    for k, c in enumerate(CLASSES):
        df[f"prob_{c}"] = P[:, k]
    df["predicted"] = np.array(CLASSES)[P.argmax(1)]
    df["model"] = name
    return df


def _report(tmp_path: Path, *, n: int = 150, sections=None, notes=None) -> str:
    results = {}
    for i, (name, signal) in enumerate(MODELS.items()):
        p = _preds(name, signal, n, seed=i)
        results[name] = {"predictions": p, "metrics": evaluate(p, CLASSES, n_boot=40, seed=0)}
    summary = {"cases": n, "classes": {c: n // 3 for c in CLASSES}, "radiomics": "from lesion masks",
               "audit": {"unreadable": 0, "near_duplicate_groups": 2}, "timings (s)": TIMINGS}
    notes = notes if notes is not None else [
        "Every case in this run comes from the built-in SYNTHETIC phantom cohort.", EXPERT_NOTE,
        "Splits: stratified_group, 5 folds, seed 0."]
    path = write_report(tmp_path, title="layout", model_results=results, dataset_summary=summary,
                        config_text="name: demo\nseed: 0\n", notes=notes, synthetic=True, sections=sections)
    return path.read_text(encoding="utf-8")


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}"[^>]*>(.*?)</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


def _visible_text(html: str) -> str:
    html = re.sub(r"<style>.*?</style>", " ", html, flags=re.S)
    html = re.sub(r'<section id="config".*?</section>', " ", html, flags=re.S)  # the config is verbatim YAML
    return re.sub(r"<[^>]+>", " ", html)


def test_summary_comes_first_and_names_the_best_model(tmp_path):
    html = _report(tmp_path)
    h2 = re.findall(r"<h2[^>]*>(.*?)</h2>", html, re.S)
    assert h2[0].strip() == "Summary", h2[:3]
    summary = _section(html, "summary")
    assert html.index('<section id="summary"') < html.index("<details")
    # the models side by side: one row per model, human labels, the three headline metrics with CIs
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", summary, re.S)
    best = [r for r in rows if "best" in r.lower()]
    assert len(best) == 1 and "Fusion" in best[0], best
    for label in ("Macro-F1", "Macro-AUC", "Balanced accuracy", "95% CI"):
        assert label in summary, label
    for label in ("Logistic regression", "Random forest", "Image only", "Tabular only"):
        assert label in summary, label
    assert summary.count("\u2013") >= 3 * len(MODELS)  # a CI in every cell
    # what the figures are: cross-validated, out-of-fold, how many folds
    assert "cross-validat" in summary.lower() and "5 folds" in summary
    # the best model's ROC curves and confusion matrix are in the summary
    imgs = re.findall(r'<img [^>]*alt="([^"]*)"', summary)
    assert any("Fusion" in a and "ROC" in a for a in imgs) and any("Fusion" in a and "confusion" in a for a in imgs)


def test_summary_lists_the_caveats(tmp_path):
    cal = ReportSection("calibration", "Calibration and deferral",
                        ["Temperature scaling, then conformal sets.",
                         "fusion: not calibrated (the out-of-fold predictions make no error)."])
    html = _report(tmp_path, n=60, sections=[cal])
    caveats = _section(html, "summary")
    low = caveats.lower()
    assert "synthetic" in low
    assert "expert" in low and "mask" in low
    assert "small cohort" in low and "60 cases" in low
    assert "fusion: not calibrated" in low


def test_per_model_details_are_folded(tmp_path):
    html = _report(tmp_path)
    details = re.findall(r'<details class="model"[^>]*>\s*<summary>(.*?)</summary>', html, re.S)
    assert len(details) == len(MODELS)
    assert not re.search(r'<details class="model"[^>]* open', html)  # folded
    assert any("Fusion" in d and "Macro-F1" in d for d in details)
    # the config is folded too, after the models
    assert html.index('<details class="model"') < html.index('id="config"')


def test_no_raw_keys_and_timings_in_human_units(tmp_path):
    html = _report(tmp_path)
    text = _visible_text(html)
    raw = sorted(set(re.findall(r"\b[a-z]+(?:_[a-z]+)*_s\b", text)))
    assert not raw, raw
    for key in ("image_only", "tabular_only", "macro_f1", "balanced_accuracy", "near_duplicate_groups"):
        assert key not in text, key
    assert "Image only" in text and "Audit" in text
    assert "13.5 min" in text  # 812.3 s of fusion training
    assert "3.2 s" in text


def test_css_constrains_width_and_images_scale_down(tmp_path):
    html = _report(tmp_path)
    css = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    rules = dict((sel.strip(), body) for sel, body in re.findall(r"([^{}]+)\{([^}]*)\}", css))
    widths = [int(w) for w in re.findall(r"max-width:\s*(\d+)px", rules.get("main", ""))]
    assert widths and max(widths) <= 1280
    img_rules = [b for s, b in rules.items() if re.search(r"(^|[\s,])img\b", s)]
    assert any(re.search(r"max-width:\s*100%", b) for b in img_rules)
    for s, b in rules.items():  # no image is given a fixed pixel width it could not shrink from
        if "img" in s:
            assert not re.search(r"(?<!max-)width:\s*\d+px", b), (s, b)
    # wide tables scroll inside their own box
    assert re.search(r"overflow-x:\s*auto", rules.get(".wide", ""))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs a headless Chromium (apt-get install chromium)")
def test_page_fits_1280_px_and_is_short(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (a test extra)")
    _report(tmp_path)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((tmp_path / "report.html").resolve().as_uri())
            width = page.evaluate("document.documentElement.scrollWidth")
            height = page.evaluate("document.body.scrollHeight")
        finally:
            browser.close()
    assert width <= 1280, width
    # five models: the unfolded page was over 15,000 px; the summary and folded details fit in a few screens
    assert height < 6000, height


def test_summary_says_which_models_used_the_expert_mask(tmp_path):
    results = {}
    for i, name in enumerate(("fusion", "image_only")):
        p = _preds(name, 1.5, 90, seed=i)
        results[name] = {"predictions": p, "expert_mask": name != "image_only"}
    html = write_report(tmp_path, title="mask", model_results=results, evaluate_kwargs={"n_boot": 20}).read_text()
    summary = _section(html, "summary")
    assert "Expert mask in features" in summary
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", summary, re.S)
    fusion = next(r for r in rows if "Fusion (image + tabular)" in r)
    image = next(r for r in rows if "Image only" in r)
    assert fusion.endswith(">yes</td>") and image.endswith(">no</td>"), (fusion, image)
