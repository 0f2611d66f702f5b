"""The prediction table: what every model of the toolkit returns, in one layout.

One row per case: ``case_id``, then the columns that say where the row comes from (``fold`` and ``label`` for
out-of-fold predictions; ``image_path``, ``n_stacks`` ... for a predictor), ``prob_<class>`` for every class in the
bundle's order, ``predicted`` (the most probable class) and ``model``. Classical and deep models, cross-validation
and prediction, ultrasound and histology all build it here, so evaluation, calibration, the report and a user's
script read one schema (checked for every task and variant by ``tests/test_contract.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from breastfusion.data.cases import CASE_ID

FOLD = "fold"
PREDICTED = "predicted"
MODEL = "model"


def prob_column(cls) -> str:
    return f"prob_{cls}"


def prob_columns(classes) -> list[str]:
    return [prob_column(c) for c in classes]


def prediction_table(case_ids, probs, classes, *, model: str, **columns) -> pd.DataFrame:
    """The prediction table of ``probs`` (cases x classes, in ``classes`` order) for ``case_ids``. ``columns``
    (name → one value or one per case) go between ``case_id`` and the probabilities, in the order given."""
    probs = np.asarray(probs)
    df = pd.DataFrame({CASE_ID: np.asarray(case_ids), **columns})
    for j, c in enumerate(classes):
        df[prob_column(c)] = probs[:, j]
    df[PREDICTED] = np.asarray(classes, dtype=object)[probs.argmax(1)] if len(df) else []
    df[MODEL] = model
    return df
