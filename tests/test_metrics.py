import json

import numpy as np
import pytest

from graft.tasks.classify.metrics import classification_metrics, topk_accuracy

# Hand-computed example, 3 classes:
#   y_true = [0, 0, 0, 1, 1, 2]
#   y_pred = [0, 0, 1, 1, 2, 2]
# cat : TP 2, FP 0, FN 1 -> P 1,   R 2/3, F1 0.8,  support 3
# dog : TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2,  support 2
# bird: TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 2/3,  support 1
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]
CLASSES = ["cat", "dog", "bird"]


def test_hand_computed_example():
    m = classification_metrics(Y_TRUE, Y_PRED, CLASSES, losses=[0.5, 1.0, 1.5])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["loss"] == pytest.approx(1.0)
    assert list(m["per_class"]) == CLASSES
    expected = {
        "cat": (1.0, 2 / 3, 0.8, 3),
        "dog": (0.5, 0.5, 0.5, 2),
        "bird": (0.5, 1.0, 2 / 3, 1),
    }
    for name, (p, r, f1, support) in expected.items():
        pc = m["per_class"][name]
        assert pc["precision"] == pytest.approx(p)
        assert pc["recall"] == pytest.approx(r)
        assert pc["f1"] == pytest.approx(f1)
        assert pc["support"] == support
        assert type(pc["support"]) is int
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_zero_support_classes_are_listed_and_json_serialisable():
    classes = CLASSES + ["fish", "owl"]
    # "fish" never occurs nor is predicted; "owl" never occurs but is predicted once (wrongly).
    y_true = np.array(Y_TRUE + [2])
    y_pred = np.array(Y_PRED + [4])
    m = classification_metrics(y_true, y_pred, classes, losses=np.array([0.25, 0.75]))
    assert list(m["per_class"]) == classes
    assert m["per_class"]["fish"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["owl"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["bird"]["support"] == 2
    cm = m["confusion_matrix"]
    assert len(cm) == 5 and all(len(row) == 5 for row in cm)
    assert cm[3] == [0, 0, 0, 0, 0]  # fish row
    assert [row[4] for row in cm] == [0, 0, 1, 0, 0]  # owl column: one bird predicted as owl
    # macro F1 averages over classes seen in y_true or y_pred: "fish" does not count, "owl" does.
    f1s = [m["per_class"][c]["f1"] for c in ["cat", "dog", "bird", "owl"]]
    assert m["macro_f1"] == pytest.approx(sum(f1s) / 4)
    # numpy inputs must still give plain Python outputs
    text = json.dumps(m)
    assert json.loads(text) == m
    assert type(m["accuracy"]) is float and type(m["loss"]) is float and type(cm[0][0]) is int


def test_empty_and_invalid_inputs():
    m = classification_metrics([], [], CLASSES)
    assert m["n"] == 0 and m["accuracy"] is None and m["loss"] is None
    assert m["confusion_matrix"] == [[0] * 3] * 3
    json.dumps(m)
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], CLASSES)
    with pytest.raises(ValueError):
        classification_metrics([0, 3], [0, 1], CLASSES)


def test_topk_accuracy():
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # true 0: top-1 hit
            [0.5, 0.4, 0.1],  # true 1: top-2 hit
            [0.2, 0.5, 0.3],  # true 0: only top-3
            [0.1, 0.1, 0.8],  # true 2: top-1 hit
        ]
    )
    y = [0, 1, 0, 2]
    assert topk_accuracy(probs, y, 1) == pytest.approx(0.5)
    assert topk_accuracy(probs, y, 2) == pytest.approx(0.75)
    assert topk_accuracy(probs, y, 3) == pytest.approx(1.0)
    assert topk_accuracy(probs, y, 10) == pytest.approx(1.0)  # k > K counts as K
    # top-1 agrees with argmax accuracy, ties included (argmax picks the lower index)
    tied = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.4, 0.4]])
    assert topk_accuracy(tied, [0, 0, 1], 1) == pytest.approx(1.0)
    assert topk_accuracy(tied, [1, 1, 2], 1) == pytest.approx(0.0)
    assert type(topk_accuracy(probs, y, 1)) is float
    assert topk_accuracy(np.zeros((0, 3)), [], 1) is None
    with pytest.raises(ValueError):
        topk_accuracy(probs, y, 0)


@pytest.mark.parametrize("k, n, seed", [(2, 50, 0), (5, 7, 1), (10, 300, 2), (4, 1, 3)])
def test_counts_match_scikit_learn(k, n, seed):
    """graft counts with numpy (importing sklearn.metrics cost every command a second); the
    figures are scikit-learn's, classes that never occur and zero divisions included."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, max(1, k - 1), n)  # the last class never occurs in y_true
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, k, n))
    m = classification_metrics(y_true.tolist(), y_pred.tolist(), [f"c{i}" for i in range(k)])
    p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)), average=None, zero_division=0)
    for i, row in enumerate(m["per_class"].values()):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f1[i], support[i]))
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist()
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))
