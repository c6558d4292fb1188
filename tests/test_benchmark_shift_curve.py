"""benchmarks/expand.py's shift curve: the bounds its README columns report."""

import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("expand_benchmark", Path(__file__).parents[1] / "benchmarks" / "expand.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def accuracies(logits, labels, k, shift):
    shifted = logits.clone()
    shifted[:, k:] += shift
    right = shifted.argmax(1) == labels
    return float(right[labels < k].double().mean()), float(right[labels >= k].double().mean())


def test_the_shift_curve_finds_the_best_point_a_dense_search_finds_and_reports_it_truly():
    g = torch.Generator().manual_seed(0)
    k, n = 4, 3
    labels = torch.arange(k + n).repeat(30)
    logits = torch.randn(len(labels), k + n, generator=g)
    logits[torch.arange(len(labels)), labels] += 1.5  # a model that is mostly right
    old_before = accuracies(logits, labels, k, -100.0)[0]
    joint_old = old_before - 0.05
    curve = bench.shift_curve(logits, labels, k, old_before, joint_old)
    dense = [(s, *accuracies(logits, labels, k, s)) for s in torch.arange(-8, 8, 0.001).tolist()]
    at_goal = max(new for _, old, new in dense if old_before - old <= 0.01)
    at_joint = max(new for _, old, new in dense if old >= joint_old)
    assert curve["new_at_goal_old"]["new_accuracy"] == round(at_goal, 4)
    assert curve["new_at_joint_old"]["new_accuracy"] == round(at_joint, 4)
    assert at_joint > at_goal  # the two points differ here, so each reading is checked
    for point in curve.values():  # the reported shift gives the reported accuracies
        old, new = accuracies(logits, labels, k, point["shift"])
        assert (round(old, 4), round(new, 4)) == (point["old_accuracy"], point["new_accuracy"])
