"""Figures per centre (issue #11, item 5): first in the report, labelled cross-site only under
leave-one-centre-out, and the model chosen on the held-out sites. SYNTHETIC prediction tables."""

import numpy as np
import pandas as pd

from breastfusion.evaluation.report import write_report
from breastfusion.evaluation.sites import choose_on_held_out_sites, cross_site_section, per_site_metrics

CLASSES = ["benign", "malignant"]


def _preds(seed, good_at):
    """Predictions for 2 centres x 60 cases: informative at the centres in ``good_at``, noise elsewhere."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, centre in enumerate(["A", "B"]):
        y = rng.integers(0, 2, 60)
        s = np.where(centre in good_at, y * 0.6 + rng.uniform(0, 0.4, 60), rng.uniform(0, 1, 60))
        for i in range(60):
            rows.append({"case_id": f"{centre}{i}", "label": CLASSES[y[i]], "prob_benign": 1 - s[i],
                         "prob_malignant": s[i], "fold": c, "center": centre})
    return pd.DataFrame(rows)


def test_per_site_and_choice_prefer_the_model_that_holds_at_both_sites():
    cases = _preds(0, "AB")[["case_id", "center"]]
    results = {"holds": {"predictions": _preds(0, "AB")}, "one_site": {"predictions": _preds(0, "A")}}
    table = per_site_metrics(results, cases, CLASSES, n_boot=50)
    assert set(table["centre"]) == {"A", "B"} and len(table) == 4
    best, means = choose_on_held_out_sites(table)
    assert best == "holds"
    assert means["one_site"]["worst_auc"] < 0.75 < means["holds"]["worst_auc"]


def test_section_opens_the_report_and_says_what_the_figures_are(tmp_path):
    cases = _preds(0, "AB")[["case_id", "center"]]
    results = {"holds": {"predictions": _preds(0, "AB")}, "one_site": {"predictions": _preds(0, "A")}}
    loco = cross_site_section(results, cases, CLASSES, strategy="leave_one_center_out", n_boot=50)
    mixed = cross_site_section(results, cases, CLASSES, strategy="stratified_group_kfold", n_boot=50)
    assert "cross-site (external)" in loco.paragraphs[0] and "chosen on the held-out sites" in loco.paragraphs[1]
    assert "NOT cross-site" in mixed.paragraphs[0]
    assert cross_site_section(results, cases.assign(center="A"), CLASSES, strategy="x") is None
    html = write_report(tmp_path / "r", title="t", model_results=results, sections=[loco]).read_text()
    assert html.index("Across sites") < html.index('id="summary"')
