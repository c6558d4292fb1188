"""The parts of `graft expand` that need no model: which folders are new classes, the stored class
statistics, the exemplar choice, and the calibration guard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from graft.errors import DataError, SnapshotError
from graft.tasks.classify.expansion.calibrate import fit_calibration, upper_bound
from graft.data.class_names import plan_classes
from graft.tasks.classify.expansion.negatives import ExpandEmbeddings, balanced_weights
from graft.tasks.classify.class_stats import ClassStats, herding

OLD = ["blue", "green", "red"]


# ---------------------------------------------------------------------------- plan_classes


def test_plan_classes_sorts_new_classes_and_finds_rehearsal_folders():
    new, rehearsal = plan_classes(OLD, ["zebra", "red", "apple", "blue"], Path("data"))
    assert new == ["apple", "zebra"]
    assert rehearsal == ["blue", "red"]


def test_plan_classes_keeps_the_old_order_whatever_the_old_list():
    new, rehearsal = plan_classes(["red", "blue"], ["yellow", "cyan"], Path("d"))
    assert new == ["cyan", "yellow"] and rehearsal == []


@pytest.mark.parametrize("name", ["Red", "RED", "re d", "re_d", "r-ed", " red"])
def test_plan_classes_case_or_space_twin_of_an_old_class_is_an_error(name):
    with pytest.raises(DataError) as err:
        plan_classes(OLD, ["purple", name], Path("data"))
    msg = str(err.value)
    assert name in msg and "'red'" in msg


def test_plan_classes_two_new_folders_differing_only_by_case_is_an_error():
    with pytest.raises(DataError, match="'Cat'.*'cat'|'cat'.*'Cat'"):
        plan_classes(OLD, ["cat", "Cat"], Path("data"))


def test_plan_classes_without_new_classes_is_an_error():
    with pytest.raises(DataError, match="no new classes in data"):
        plan_classes(OLD, ["red", "green"], Path("data"))


# ---------------------------------------------------------------------------- class statistics


def synthetic_embeddings(n: int = 400, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three Gaussian classes with distinct means and a correlated spread."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0] * d, [3.0] * d, [-2.0, 2.0] * (d // 2)])
    mix = torch.randn(d, d, generator=g) * 0.5
    labels = torch.arange(3).repeat_interleave(n)
    x = means[labels] + torch.randn(3 * n, d, generator=g) @ mix
    return x, labels, means


def test_class_stats_fit_sample_save_load_round_trip(tmp_path):
    x, labels, _ = synthetic_embeddings()
    stats = ClassStats.fit(x, labels, ["a", "b", "c"], "backbone-fingerprint")
    assert stats.classes == ["a", "b", "c"] and stats.dim == 6
    assert stats.counts.tolist() == [400, 400, 400]
    assert torch.allclose(stats.mean[1], x[labels == 1].mean(0), atol=1e-5)
    assert torch.allclose(stats.var[2], x[labels == 2].var(0), rtol=1e-4, atol=1e-5)
    assert torch.equal(stats.low, x.min(0).values) and torch.equal(stats.high, x.max(0).values)

    path = stats.save(tmp_path / "class_stats.safetensors")
    loaded = ClassStats.load(path)
    for f in dataclasses.fields(ClassStats):
        a, b = getattr(stats, f.name), getattr(loaded, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name

    g = torch.Generator().manual_seed(1)
    draws = loaded.sample(torch.full((20000,), 1), g)
    assert draws.shape == (20000, 6)
    assert torch.allclose(draws.mean(0), loaded.mean[1], atol=0.05)
    assert torch.allclose(draws.var(0), loaded.var[1], rtol=0.1)
    assert bool((draws >= loaded.low).all()) and bool((draws <= loaded.high).all())


def test_class_stats_draws_are_clamped_to_the_range_seen():
    x, labels, _ = synthetic_embeddings(n=20)
    stats = ClassStats.fit(x, labels, ["a", "b", "c"], "fp")
    stats.var = stats.var * 100  # far wider than the data: most draws would leave the range
    stats.components = stats.components * 10
    draws = stats.sample(torch.arange(3).repeat(2000), torch.Generator().manual_seed(0))
    assert bool((draws >= stats.low).all()) and bool((draws <= stats.high).all())
    assert bool((draws == stats.high).any()) and bool((draws == stats.low).any())


def test_class_stats_sampling_is_seeded():
    x, labels, _ = synthetic_embeddings(n=30)
    stats = ClassStats.fit(x, labels, ["a", "b", "c"], "fp")
    idx = torch.tensor([0, 2, 1, 1])
    a = stats.sample(idx, torch.Generator().manual_seed(5))
    b = stats.sample(idx, torch.Generator().manual_seed(5))
    c = stats.sample(idx, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_class_stats_select_keeps_the_named_classes():
    x, labels, _ = synthetic_embeddings(n=30)
    stats = ClassStats.fit(x, labels, ["a", "b", "c"], "fp")
    sub = stats.select(["c", "a"])
    assert sub.classes == ["c", "a"]
    assert torch.equal(sub.mean, stats.mean[[2, 0]]) and torch.equal(sub.counts, stats.counts[[2, 0]])


def test_unreadable_class_stats_is_a_snapshot_error(tmp_path):
    bad = tmp_path / "class_stats.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(SnapshotError, match="cannot read class statistics"):
        ClassStats.load(bad)


# ---------------------------------------------------------------------------- herding


def test_herding_returns_distinct_indices_nearest_the_mean_first():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) + 2.0
    chosen = herding(x, 10)
    assert len(chosen) == 10 and len(set(chosen)) == 10
    assert all(0 <= i < 50 for i in chosen)
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    assert chosen[0] == int(((unit - unit.mean(0)) ** 2).sum(1).argmin())
    assert herding(x, 10) == chosen  # deterministic


def test_herding_asking_for_more_than_there_are_returns_each_once():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    assert sorted(herding(x, 12)) == [0, 1, 2, 3, 4]


def test_herding_mean_of_chosen_is_closer_than_a_random_pick():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 8, generator=g) * torch.linspace(0.5, 3, 8) + 1.0
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    target = unit.mean(0)
    chosen = herding(x, 8)
    herd = (unit[chosen].mean(0) - target).norm()
    randoms = [(unit[torch.randperm(200, generator=g)[:8]].mean(0) - target).norm() for _ in range(50)]
    assert herd < min(randoms)


# ---------------------------------------------------------------------------- calibration guard


def greedy_logits(n_old: int = 40, n_new: int = 8, wrong: int = 0, seed: int = 0, noise: float = 0.0):
    """Old-class samples the old rows classify correctly (except the first ``wrong``) with a margin
    of 2..6, and new rows whose logits are huge on every sample: uncalibrated, they take everything.
    ``noise`` blurs the new logits so that no scale and shift separates old from new samples."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(n_old) % 3, 3 + torch.arange(n_new) % 2])
    old = torch.randn(n_old + n_new, 3, generator=g)
    old[torch.arange(n_old), labels[:n_old]] += 2 + 4 * torch.rand(n_old, generator=g)
    for i in range(wrong):  # the old rows get these wrong
        old[i, labels[i]] -= 20
    new = 100 + torch.randn(n_old + n_new, 2, generator=g)
    new[torch.arange(n_old, n_old + n_new), labels[n_old:] - 3] += 5
    if noise:
        new += noise * torch.randn(new.shape, generator=torch.Generator().manual_seed(seed + 10))
    return old, new, labels


def taken_share(old, new, labels, cal, only_correct: bool = False) -> float:
    k = old.shape[1]
    is_old = labels < k
    o, n, y = old[is_old].double(), cal.scale * new[is_old].double() + cal.shift, labels[is_old]
    taken = n.max(1).values > o.max(1).values
    if only_correct:
        taken = taken[o.argmax(1) == y]
    return float(taken.double().mean())


@pytest.mark.parametrize(("method", "max_old_loss"), [("norm", 0.0), ("norm", 0.1), ("bias", 0.0), ("bias", 0.05)])
def test_calibration_guard_limits_old_samples_taken_by_huge_new_logits(method, max_old_loss):
    # For bias, blurred logits: the fit converges quickly, and on its own takes some old samples.
    old, new, labels = greedy_logits(noise=3.0 if method == "bias" else 0.0)
    cal = fit_calibration(old, new, labels, method=method, norm_scale=1.0, max_old_loss=max_old_loss)
    assert cal.old_samples == 40 and cal.new_samples == 8
    assert cal.old_taken is not None and cal.old_taken <= max_old_loss + 1e-6  # old_taken is a float32 mean
    assert taken_share(old, new, labels, cal) <= max_old_loss  # checked independently of old_taken
    assert taken_share(old, new, labels, cal) == pytest.approx(cal.old_taken)
    assert any("shift lowered" in n for n in cal.notes)
    if method == "norm":
        assert cal.scale == 1.0 and cal.shift < -90  # lowered from 0 to below the old logits
    else:
        unguarded = fit_calibration(old, new, labels, method=method, norm_scale=1.0, max_old_loss=1.0)
        assert unguarded.old_taken > max_old_loss and not unguarded.notes
        assert cal.scale == unguarded.scale and cal.shift < unguarded.shift


@pytest.mark.parametrize(("taken", "samples"), [(0, 126), (1, 126), (2, 126), (10, 1000), (3, 20)])
def test_upper_bound_of_the_taken_share_is_clopper_pearsons(taken, samples):
    bound = upper_bound(taken, samples)
    assert taken / samples < bound < 1
    # At the bound, seeing at most `taken` has probability 5%: summed here with torch's binomial.
    seen = torch.distributions.Binomial(samples, probs=torch.tensor(bound, dtype=torch.float64)).log_prob(torch.arange(taken + 1, dtype=torch.float64)).exp().sum()
    assert float(seen) == pytest.approx(0.05, abs=1e-9)
    if taken == 0:
        assert bound == pytest.approx(1 - 0.05 ** (1 / samples))
    assert upper_bound(taken, samples * 10) < bound  # more samples, a tighter bound
    assert upper_bound(samples, samples) == 1.0 and upper_bound(0, 0) == 1.0


def test_calibration_reports_the_bound_of_what_it_measured():
    old, new, labels = greedy_logits(noise=3.0)
    cal = fit_calibration(old, new, labels, method="bias", norm_scale=1.0, max_old_loss=0.05)
    taken = round(cal.old_taken * int((labels < old.shape[1]).sum()))
    assert cal.old_taken_bound == upper_bound(taken, int((labels < old.shape[1]).sum()))


def test_calibration_guard_leaves_a_harmless_shift_alone():
    old, new, labels = greedy_logits()
    new = new - 200  # now the new rows never fire on old samples
    cal = fit_calibration(old, new, labels, method="norm", norm_scale=1.0, max_old_loss=0.0)
    assert cal.shift == 0.0 and cal.old_taken == 0.0 and not cal.notes


def test_calibration_none_changes_nothing():
    old, new, labels = greedy_logits()
    cal = fit_calibration(old, new, labels, method="none", norm_scale=3.0, max_old_loss=0.0)
    assert (cal.scale, cal.shift) == (1.0, 0.0)


def test_calibration_bias_moves_scale_and_shift_off_weight_aligning():
    old, new, labels = greedy_logits()
    g = torch.Generator().manual_seed(3)
    new = 0.3 * new - 28 + 2 * torch.randn(new.shape, generator=g)  # overlapping: the fit has a finite optimum
    cal = fit_calibration(old, new, labels, method="bias", norm_scale=1.0, max_old_loss=1.0)
    assert (cal.scale, cal.shift) != (1.0, 0.0)
    assert torch.isfinite(torch.tensor([cal.scale, cal.shift])).all()


def test_calibration_guard_share_is_of_the_correctly_classified_old_samples():
    old, new, labels = greedy_logits(wrong=20)  # half of the 40 old samples are misclassified by the old rows
    cal = fit_calibration(old, new, labels, method="norm", norm_scale=1.0, max_old_loss=0.1)
    assert taken_share(old, new, labels, cal, only_correct=True) <= 0.1


def test_calibration_guard_ignores_old_samples_the_old_rows_barely_get_right():
    """One ambiguous old image must not silence the new classes: with the old rows' probability
    below guard_confidence it does not bind; at confidence 0 it does."""
    old, new, labels = greedy_logits(noise=0.0)
    new = new - 200  # the new rows fire on no old sample...
    old[0] = 0.0
    old[0, labels[0]] = 0.1  # ...except this one, which the old rows get right by a hair (p ~ 0.36)
    new[0] = old[0].max() + 50
    lenient = fit_calibration(old, new, labels, method="norm", norm_scale=1.0, max_old_loss=0.0, guard_confidence=0.5)
    strict = fit_calibration(old, new, labels, method="norm", norm_scale=1.0, max_old_loss=0.0, guard_confidence=0.0)
    assert lenient.shift == 0.0 and not lenient.notes
    assert strict.shift < -50 and any("shift lowered" in n for n in strict.notes)


# ---------------------------------------------------------------------------- anchors and negatives


def two_class_stats(heldout: bool = True, anchors: int | None = None) -> ClassStats:
    g = torch.Generator().manual_seed(0)
    emb = torch.cat([torch.randn(30, 6, generator=g), torch.randn(20, 6, generator=g) + 4])
    labels = torch.tensor([0] * 30 + [1] * 20)
    held = torch.randn(12, 6, generator=g) if heldout else None
    held_labels = torch.tensor([0] * 5 + [1] * 7) if heldout else None
    return ClassStats.fit(emb, labels, ["a", "b"], "fp", heldout=held, heldout_labels=held_labels, anchors=anchors)


def test_class_stats_keep_training_anchors_by_herding_and_held_out_ones(tmp_path):
    stats = two_class_stats(anchors=8)
    train = ~stats.anchor_heldout
    assert torch.bincount(stats.anchor_labels[train]).tolist() == [8, 8]
    assert torch.bincount(stats.anchor_labels[stats.anchor_heldout]).tolist() == [5, 7]
    loaded = ClassStats.load(stats.save(tmp_path / "s.safetensors"))
    assert torch.equal(loaded.anchors, stats.anchors) and torch.equal(loaded.anchor_labels, stats.anchor_labels)
    assert torch.equal(loaded.anchor_heldout, stats.anchor_heldout)


def test_class_stats_select_and_merge_relabel_the_anchors():
    stats = two_class_stats(anchors=4)
    only_b = stats.select(["b"])
    assert only_b.classes == ["b"] and set(only_b.anchor_labels.tolist()) == {0}
    assert len(only_b.anchors) == 4 + 4  # held-out ones are capped per class too
    merged = only_b.merge(stats.select(["a"]))
    assert merged.classes == ["b", "a"]
    assert torch.equal(merged.anchors[merged.anchor_labels == 1], stats.anchors[stats.anchor_labels == 0])


def test_many_classes_keep_fewer_anchors_each():
    from graft.tasks.classify.class_stats import ANCHOR_BUDGET

    k = 2 * ANCHOR_BUDGET // 64  # twice as many classes as the budget holds at 64 each
    emb = torch.randn(k * 40, 4, generator=torch.Generator().manual_seed(1))
    stats = ClassStats.fit(emb, torch.arange(k).repeat_interleave(40), [str(i) for i in range(k)], "fp", rank=1)
    assert len(stats.anchors) == k * 32 <= ANCHOR_BUDGET


def test_expand_embeddings_draws_are_fresh_per_epoch_and_repeatable():
    stats = two_class_stats()
    real = torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(2))
    ds = ExpandEmbeddings(real, [2] * 5, stats=stats, stat_labels=[0, 1], per_class=3, seed=9)
    assert len(ds) == 5 + 2 * 3
    assert ds.label_counts(3).tolist() == [3, 3, 5]
    batch = [(i, 4) for i in (0, 6, 9, 2)]
    first, again = ds.__getitems__(batch), ds.__getitems__(batch)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert [label for _, label in first] == [2, 0, 1, 2]
    other_epoch = ds.__getitems__([(i, 5) for i in (0, 6, 9, 2)])
    assert not torch.equal(first[1][0], other_epoch[1][0])  # a drawn sample is fresh each epoch
    assert torch.equal(first[0][0], ds[(0, 4)][0])  # a real embedding comes from its views


def test_balanced_weights_give_every_present_class_the_same_total():
    counts = torch.tensor([10.0, 0.0, 30.0, 60.0])
    w = balanced_weights(counts)
    assert w[1] == 0 and torch.allclose(w * counts, torch.full((4,), 100 / 3).where(counts > 0, torch.tensor(0.0)))
