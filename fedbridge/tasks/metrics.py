"""Classification metrics, computed the same way for every model and method."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import f1_score


def classification_metrics(y_true: Sequence[int], probs: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (over the classes present in truth or predictions, sklearn's convention)."""
    y_true = np.asarray(y_true, dtype=int)
    if len(y_true) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "n": 0}
    y_pred = np.asarray(probs).argmax(axis=1)
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "n": int(len(y_true)),
    }
