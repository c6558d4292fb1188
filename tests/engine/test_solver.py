"""The solver: optimizer construction and the learning-rate schedule of every policy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from graft.configuration import SolverConfig
from graft.errors import ConfigError
from graft.models import surgery
from graft.engine.solver import LRSchedule, make_optimizer

BASE = 0.1


def groups(*lr_mults: float, weight_decay: float = 0.0) -> list[dict]:
    out = []
    for i, m in enumerate(lr_mults):
        p = nn.Parameter(torch.zeros(2))
        out.append({"params": [p], "names": [f"p{i}"], "lr": BASE * m, "initial_lr": BASE * m, "weight_decay": weight_decay})
    return out


def schedule(total: int = 100, per_epoch: int = 10, lr_mults: tuple[float, ...] = (1.0,), **solver) -> LRSchedule:
    cfg = SolverConfig(base_lr=BASE, **solver)
    opt = make_optimizer(groups(*lr_mults), cfg)
    return LRSchedule(opt, cfg, total_iters=total, iters_per_epoch=per_epoch)


def lrs(s: LRSchedule, n: int) -> list[float]:
    """The lr used by each of the next ``n`` iterations."""
    out = []
    for _ in range(n):
        out.append(s.lr)
        s.step()
    return out


# ------------------------------------------------------------------------------ policies


def test_fixed():
    s = schedule(lr_policy="fixed")
    assert lrs(s, 100) == [pytest.approx(BASE)] * 100


def test_step():
    s = schedule(lr_policy="step", stepsize=2, gamma=0.5, per_epoch=5, total=40)
    got = lrs(s, 40)
    for it, lr in enumerate(got):
        assert lr == pytest.approx(BASE * 0.5 ** (it // 10)), it
    assert got[9] == pytest.approx(BASE) and got[10] == pytest.approx(BASE / 2) and got[39] == pytest.approx(BASE / 8)


def test_multistep():
    s = schedule(lr_policy="multistep", stepvalue=[1, 3], gamma=0.1, per_epoch=4, total=20)
    got = lrs(s, 20)
    assert got[:4] == [pytest.approx(BASE)] * 4
    assert got[4:12] == [pytest.approx(BASE * 0.1)] * 8
    assert got[12:] == [pytest.approx(BASE * 0.01)] * 8


def test_multistep_milestones_need_not_be_sorted():
    a = lrs(schedule(lr_policy="multistep", stepvalue=[3, 1], per_epoch=4, total=20), 20)
    b = lrs(schedule(lr_policy="multistep", stepvalue=[1, 3], per_epoch=4, total=20), 20)
    assert a == b


def test_cosine_ends_near_zero():
    s = schedule(lr_policy="cosine", total=100)
    got = lrs(s, 100)
    assert got[0] == pytest.approx(BASE)
    assert got[50] == pytest.approx(BASE / 2)
    assert got[25] == pytest.approx(BASE * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a > b for a, b in zip(got, got[1:]))  # strictly decreasing
    assert got[-1] < BASE * 1e-3
    assert s.lr == pytest.approx(0.0, abs=1e-12)  # at total_iters
    s.step()
    assert s.lr == pytest.approx(0.0, abs=1e-12)  # and stays there past the end


def test_one_cycle_peaks_at_thirty_percent():
    s = schedule(lr_policy="one-cycle", total=100)
    got = lrs(s, 100)
    peak = max(range(100), key=got.__getitem__)
    assert peak == 30
    assert got[peak] == pytest.approx(BASE)
    assert got[0] == pytest.approx(BASE / 25)
    assert all(a < b for a, b in zip(got[:30], got[1:31]))  # rising
    assert all(a > b for a, b in zip(got[30:], got[31:]))  # falling
    assert got[-1] < BASE / 1000
    assert s.lr == pytest.approx(BASE / 25e4)


def test_one_cycle_ignores_warmup():
    assert lrs(schedule(lr_policy="one-cycle", warmup_epochs=2), 100) == lrs(schedule(lr_policy="one-cycle"), 100)


def test_plateau_drops_by_gamma_after_patience():
    s = schedule(lr_policy="plateau", plateau_patience=2, gamma=0.5)
    s.epoch_end(1.0)  # first epoch: an improvement over nothing
    assert s.lr == pytest.approx(BASE)
    s.epoch_end(1.0)  # bad epoch 1
    s.epoch_end(1.00005)  # bad epoch 2 (within the 1e-4 threshold: not an improvement)
    assert s.lr == pytest.approx(BASE)
    s.epoch_end(1.2)  # bad epoch 3: more than `patience` without improvement
    assert s.lr == pytest.approx(BASE * 0.5)
    assert s.state_dict()["bad_epochs"] == 0
    s.epoch_end(0.5)  # improvement resets the count
    s.epoch_end(0.6)
    s.epoch_end(0.6)
    assert s.lr == pytest.approx(BASE * 0.5)
    s.epoch_end(0.6)
    assert s.lr == pytest.approx(BASE * 0.25)
    # iterations do not undo a plateau drop
    lrs(s, 5)
    assert s.lr == pytest.approx(BASE * 0.25)


def test_plateau_ignores_missing_and_nan_losses():
    s = schedule(lr_policy="plateau", plateau_patience=0, gamma=0.1)
    s.epoch_end(1.0)
    for _ in range(3):
        s.epoch_end(None)
        s.epoch_end(float("nan"))
    assert s.lr == pytest.approx(BASE)
    s.epoch_end(2.0)  # patience 0: the first bad epoch drops
    assert s.lr == pytest.approx(BASE * 0.1)


def test_epoch_end_is_a_no_op_for_other_policies():
    s = schedule(lr_policy="fixed", plateau_patience=0)
    for loss in (1.0, 2.0, 3.0, 4.0):
        s.epoch_end(loss)
    assert s.lr == pytest.approx(BASE)
    assert s.state_dict()["plateau_scale"] == 1.0


@pytest.mark.parametrize("policy", ["fixed", "cosine", "step"])
def test_warmup_ramps_linearly(policy):
    s = schedule(lr_policy=policy, warmup_epochs=1, per_epoch=4, total=40, stepsize=5)
    got = lrs(s, 6)
    assert got[:4] == [pytest.approx(BASE * k / 5) for k in (1, 2, 3, 4)]
    steps = [b - a for a, b in zip(got[:4], got[1:5])]
    assert steps == [pytest.approx(BASE / 5)] * 4  # constant increments up to the full rate
    assert got[4] == pytest.approx(BASE)


def test_fractional_warmup_epochs():
    s = schedule(lr_policy="fixed", warmup_epochs=0.5, per_epoch=6)
    assert lrs(s, 4) == [pytest.approx(BASE * k / 4) for k in (1, 2, 3)] + [pytest.approx(BASE)]


def test_cosine_starts_after_warmup():
    s = schedule(lr_policy="cosine", warmup_epochs=1, per_epoch=10, total=110)
    got = lrs(s, 110)
    assert got[10] == pytest.approx(BASE)
    assert got[60] == pytest.approx(BASE / 2)
    assert got[-1] < BASE * 1e-3


def test_every_group_follows_its_own_initial_lr():
    s = schedule(lr_policy="step", stepsize=1, gamma=0.1, per_epoch=2, lr_mults=(1.0, 0.1, 10.0))
    lrs(s, 2)
    assert [g["lr"] for g in s.optimizer.param_groups] == [pytest.approx(BASE * m * 0.1) for m in (1.0, 0.1, 10.0)]
    assert s.lr == pytest.approx(BASE * 10.0 * 0.1)


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("policy", ["cosine", "one-cycle", "plateau", "multistep"])
def test_state_dict_round_trip_continues_identically(policy):
    kwargs = dict(lr_policy=policy, warmup_epochs=1, plateau_patience=1, stepvalue=[2, 5], gamma=0.5)
    a = schedule(**kwargs)
    losses = [1.0, 0.9, 0.95, 0.97, 0.99, 0.5, 0.6, 0.7]
    for loss in losses[:4]:
        lrs(a, 10)
        a.epoch_end(loss)
    state = a.state_dict()
    assert set(state) == {"iteration", "plateau_scale", "best", "bad_epochs"}
    assert state["iteration"] == 40

    b = schedule(**kwargs)
    for g in b.optimizer.param_groups:
        g["lr"] = 123.0  # a deliberately wrong rate that loading must correct
    b.load_state_dict(state)
    assert b.lr == pytest.approx(a.lr)
    assert b.state_dict() == state
    for loss in losses[4:]:
        assert lrs(b, 10) == lrs(a, 10)
        a.epoch_end(loss)
        b.epoch_end(loss)
    assert b.state_dict() == a.state_dict()
    if policy == "plateau":
        assert a.state_dict()["plateau_scale"] < 1.0  # the drops really happened


def test_state_dict_survives_torch_save(tmp_path):
    a = schedule(lr_policy="plateau")
    a.epoch_end(1.0)
    path = tmp_path / "sched.pt"
    torch.save(a.state_dict(), path)
    b = schedule(lr_policy="plateau")
    b.load_state_dict(torch.load(path, weights_only=True))
    assert b.state_dict() == a.state_dict()
    fresh = schedule(lr_policy="plateau").state_dict()
    assert fresh["best"] == math.inf
    b.load_state_dict(fresh)
    assert b.state_dict()["best"] == math.inf


# ------------------------------------------------------------------------------ make_optimizer


def test_make_optimizer_types():
    cfg = SolverConfig(base_lr=BASE, momentum=0.8)
    sgd = make_optimizer(groups(1.0), cfg.model_copy(update={"type": "sgd"}))
    assert type(sgd) is torch.optim.SGD
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.8) and sgd.param_groups[0]["nesterov"] is True
    plain = make_optimizer(groups(1.0), cfg.model_copy(update={"type": "sgd", "momentum": 0.0}))
    assert plain.param_groups[0]["nesterov"] is False
    adam = make_optimizer(groups(1.0), cfg.model_copy(update={"type": "adam"}))
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["betas"] == (0.8, 0.999)
    adamw = make_optimizer(groups(1.0), cfg.model_copy(update={"type": "adamw"}))
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["betas"] == (0.8, 0.999)
    rms = make_optimizer(groups(1.0), cfg.model_copy(update={"type": "rmsprop"}))
    assert type(rms) is torch.optim.RMSprop
    assert rms.param_groups[0]["momentum"] == pytest.approx(0.8) and rms.param_groups[0]["alpha"] == pytest.approx(0.9)


def test_make_optimizer_keeps_group_settings():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    gs = surgery.param_groups(model, lr=0.02, weight_decay=0.3)
    opt = make_optimizer(gs, SolverConfig(type="adamw", base_lr=0.02, weight_decay=0.3))
    decays = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert decays == {
        "0.weight": pytest.approx(0.3),
        "0.bias": 0.0,
        "1.weight": 0.0,
        "1.bias": 0.0,
        "2.weight": pytest.approx(0.3),
        "2.bias": 0.0,
    }
    assert all(g["initial_lr"] == pytest.approx(0.02) for g in opt.param_groups)


def test_make_optimizer_empty_groups_is_a_config_error():
    with pytest.raises(ConfigError, match="every parameter is frozen"):
        make_optimizer([], SolverConfig())
    model = nn.Linear(2, 2)
    surgery.freeze(model, patterns=["*"])
    with pytest.raises(ConfigError, match="model.freeze"):
        make_optimizer(surgery.param_groups(model, lr=0.1, weight_decay=0.0), SolverConfig())


def test_make_optimizer_unknown_type():
    with pytest.raises(ConfigError, match="'lion'"):
        make_optimizer(groups(1.0), SimpleNamespace(type="lion", base_lr=0.1, momentum=0.9))


def test_schedule_drives_a_real_optimizer_step():
    cfg = SolverConfig(type="sgd", base_lr=1.0, momentum=0.0, lr_policy="step", stepsize=1, gamma=0.5)
    p = nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [p], "names": ["p"], "lr": 1.0, "initial_lr": 1.0, "weight_decay": 0.0}], cfg)
    s = LRSchedule(opt, cfg, total_iters=4, iters_per_epoch=1)
    moves = []
    for _ in range(3):
        before = p.item()
        opt.zero_grad()
        (-p).sum().backward()  # gradient -1: each step moves p by +lr
        opt.step()
        s.step()
        moves.append(p.item() - before)
    assert moves == [pytest.approx(1.0), pytest.approx(0.5), pytest.approx(0.25)]
