"""Classification metrics as plain, JSON-able Python (no numpy types leak out).

Counted with numpy from the confusion matrix, with scikit-learn's definitions (``zero_division=0``;
the tests compare with it): importing ``sklearn.metrics`` costs every graft command about a second.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["classification_metrics", "topk_accuracy"]


def _labels_array(values: Sequence[int], name: str, k: int) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= k)]
    if bad.size:
        raise ValueError(f"{name} holds class index {int(bad[0])}, outside 0..{k - 1} ({k} classes)")
    return arr


def classification_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    classes: list[str],
    *,
    losses: Sequence[float] | None = None,
) -> dict:
    """Accuracy, loss, macro F1, per-class precision/recall/F1/support and the confusion matrix.

    Returns a JSON-able dict::

        accuracy: float in [0, 1], or None when there are no samples
        loss: mean of ``losses``, or None (no losses given, or empty)
        n: number of samples
        macro_f1: unweighted mean F1 over the classes that occur in ``y_true`` or ``y_pred``
                  (classes absent from both do not drag it down); None when there are no samples
        per_class: {class_name: {"precision", "recall", "f1", "support"}} for every class in
                   ``classes``, in order, including classes with support 0 (zero_division=0)
        confusion_matrix: K x K list of lists of int, rows = true class, columns = predicted class

    Class indices in ``y_true``/``y_pred`` refer to positions in ``classes``.
    """
    k = len(classes)
    if k == 0:
        raise ValueError("classes must not be empty")
    yt = _labels_array(y_true, "y_true", k)
    yp = _labels_array(y_pred, "y_pred", k)
    if len(yt) != len(yp):
        raise ValueError(f"y_true has {len(yt)} entries but y_pred has {len(yp)}")
    n = int(len(yt))

    loss = None
    if losses is not None:
        arr = np.asarray(list(losses) if not isinstance(losses, np.ndarray) else losses, dtype=np.float64)
        if arr.size:
            loss = float(arr.mean())

    if n == 0:
        per_class = {
            name: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for name in classes
        }
        return {
            "accuracy": None,
            "loss": loss,
            "n": 0,
            "macro_f1": None,
            "per_class": per_class,
            "confusion_matrix": [[0] * k for _ in range(k)],
        }

    cm = np.bincount(yt * k + yp, minlength=k * k).reshape(k, k)  # rows: true class, columns: predicted
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1_denominator = support + predicted  # 2tp + fp + fn
    f1 = np.divide(2 * tp, f1_denominator, out=np.zeros(k), where=f1_denominator > 0)

    per_class = {}
    for i, name in enumerate(classes):
        per_class[str(name)] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
    present = sorted(set(yt.tolist()) | set(yp.tolist()))
    macro_f1 = float(np.mean([f1[i] for i in present]))

    return {
        "accuracy": float(np.mean(yt == yp)),
        "loss": loss,
        "n": n,
        "macro_f1": macro_f1,
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in cm.tolist()],
    }


def topk_accuracy(probs: np.ndarray, y_true: Sequence[int], k: int) -> float | None:
    """Fraction of samples whose true class is among the ``k`` highest-scoring classes.

    ``probs`` is (N, K) scores or probabilities (logits work too: only the order matters).
    Ties are broken towards the lower class index, as ``argmax`` does, so top-1 equals plain
    accuracy of ``argmax`` predictions. ``k`` larger than K counts as K. Returns None when N == 0
    (like ``classification_metrics``'s accuracy, so the value stays JSON-able).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = np.asarray(probs, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"probs must be 2-D (samples x classes), got shape {scores.shape}")
    n, num_classes = scores.shape
    yt = _labels_array(y_true, "y_true", num_classes)
    if len(yt) != n:
        raise ValueError(f"probs has {n} rows but y_true has {len(yt)} entries")
    if n == 0:
        return None
    kk = min(int(k), num_classes)
    # Stable sort of negated scores: descending order, ties keep the lower index first.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    hits = (order == yt[:, None]).any(axis=1)
    return float(hits.mean())
