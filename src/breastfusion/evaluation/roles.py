"""The report section "Column roles": what each clinical-sheet column is to the models, and the leakage guard's
verdict on each input column (:mod:`breastfusion.data.roles`, :mod:`breastfusion.data.leakage`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from breastfusion.config import DataConfig
from breastfusion.data.cases import CASE_ID
from breastfusion.data.leakage import LeakageResult, read_column
from breastfusion.errors import DataError
from breastfusion.evaluation.insight import ReportSection


def roles_section(cases: pd.DataFrame, role_map, data: DataConfig, result: LeakageResult | None) -> ReportSection:
    """The report section "Column roles": every feature column with its role, type and missing count, and the
    guard's AUC for each input column (a flagged one marked)."""
    sec = ReportSection("column-roles", "Column roles")
    sec.paragraphs.append(
        f"{len(role_map.inputs)} of {len(role_map.roles)} clinical-sheet columns are model inputs. Roles come from "
        "data.roles and data.tabular_columns: the radiologist's reading (BI-RADS lexicon) is an input only when "
        "listed in data.tabular_columns; the reader score is never an input (it is what the models are compared "
        "with); excluded columns (how the truth was established, the histology, the conclusion) never are.")
    if role_map.reader_inputs:
        sec.paragraphs.append("The models read the radiologist's reading as input ("
                              + ", ".join(role_map.reader_inputs) + "): they are not independent of the radiologist, "
                              "so a comparison with the radiologist measures what they add to the reading, not a "
                              "second opinion.")
    if result is not None:
        sec.paragraphs.append(
            f"Leakage guard: each input column's AUC alone for the label (macro one-vs-rest), measured inside the "
            f"training folds only, median over {result.n_folds} folds; a column at or above {result.threshold} is "
            "flagged and stops the run unless declared in data.roles.intended. Lesion radiomics are not scored.")
        intended = [c.name for c in result.flagged if c.intended]
        if intended:
            sec.paragraphs.append("FLAGGED but declared intended (the run went on): " + ", ".join(
                f"{n} (AUC {result.columns[n].auc:.3f})" for n in intended) + ".")
    rows = []
    ids = cases[CASE_ID].astype(str).tolist() if CASE_ID in cases.columns else None
    for c, role in role_map.roles.items():
        try:
            r = read_column(cases[c].reset_index(drop=True), c, data, row_ids=ids)
            kind, missing = r.kind, r.n_missing
        except DataError as exc:
            kind, missing = f"unreadable ({exc})"[:120], None
        lk = result.columns.get(c) if result is not None else None
        guard = ""
        if lk is not None and lk.flagged:
            guard = "FLAGGED (intended)" if lk.intended else "FLAGGED"
        rows.append({"Column": c, "Role": role,
                     "Type": kind, "Missing": missing,
                     "Guard AUC": "—" if lk is None or not np.isfinite(lk.auc) else f"{lk.auc:.3f}",
                     "Guard": guard})
    sec.table = pd.DataFrame(rows)
    return sec
