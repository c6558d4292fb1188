"""Model surgery, tested by counting: what each function froze, grouped or re-initialised."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from graft.configuration import LayerRule, ModelConfig, SolverConfig
from graft.errors import ConfigError
from graft.models import surgery
from graft.models.backbones import build_model
from graft.models.classifier import GraftClassifier
from graft.engine.solver import make_optimizer

NUM_CLASSES = 3


def tiny(name: str = "test_efficientnet", *, frozen_bn_eval: bool = True, bn_inference: bool = False, seed: int = 0) -> GraftClassifier:
    """``bn_inference`` off by default here: most tests below are about which BatchNorm layers follow
    their parameters (``frozen_bn_eval``); graft's own default keeps them all in inference mode."""
    model, _ = build_model(ModelConfig(name=name, weights="none", frozen_bn_eval=frozen_bn_eval, bn_inference=bn_inference), NUM_CLASSES, seed=seed)
    return model


class Blocks(nn.Module):
    """A backbone with twelve numbered blocks, so 'blocks.1' has siblings 'blocks.10' and 'blocks.11'."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def numel(model: nn.Module, names: set[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def bn_modules(model: nn.Module, prefix: str = "backbone.") -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.modules.batchnorm._BatchNorm)}


# ------------------------------------------------------------------------------ counting


def test_count_parameters_pinned_for_each_freezing_option():
    """The numbers for timm 1.0.31's test_efficientnet with a 3-class head (256 features)."""
    model = tiny()
    head = 256 * NUM_CLASSES + NUM_CLASSES
    assert model.num_features == 256
    assert surgery.count_parameters(model) == {"total": 99967, "trainable": 99967, "frozen": 0}

    surgery.freeze_backbone(model)
    assert surgery.count_parameters(model) == {"total": 99967, "trainable": head, "frozen": 99967 - head}

    surgery.unfreeze_all(model)
    surgery.freeze(model, before=surgery.resolve_fine_tune_at(model, None))  # the default: last third learns
    counts = surgery.count_parameters(model)
    assert counts["total"] == 99967
    assert counts["trainable"] + counts["frozen"] == 99967
    layers = surgery.backbone_layers(model)
    learning = sum(p.numel() for _, m in layers[20:] for p in m.parameters(recurse=False))
    assert counts["trainable"] == learning + head


def test_count_parameters_matches_manual_sum():
    model = tiny("test_resnet")
    model.head.fc.weight.requires_grad_(False)
    counts = surgery.count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["frozen"] == model.head.fc.weight.numel()
    assert counts["trainable"] == counts["total"] - counts["frozen"]


# ------------------------------------------------------------------------------ freezing


def test_backbone_layers_are_parameter_owners_in_order():
    model = tiny()
    layers = surgery.backbone_layers(model)
    assert len(layers) == 30
    assert layers[0][0] == "backbone.conv_stem"
    assert layers[-1][0] == "backbone.bn2"
    names = [n for n, _ in layers]
    assert not any(n.startswith("head") for n in names)
    # together they own every backbone parameter exactly once
    owned = [f"{n}.{p}" for n, m in layers for p, _ in m.named_parameters(recurse=False)]
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters() if n.startswith("backbone."))


@pytest.mark.parametrize("k", [0, 1, 7, 20, 30])
def test_freeze_before_freezes_exactly_the_first_k_layers(k):
    model = tiny()
    layers = surgery.backbone_layers(model)
    expected = {f"{n}.{p}" for n, m in layers[:k] for p, _ in m.named_parameters(recurse=False)}
    frozen = surgery.freeze(model, before=k)
    assert set(frozen) == expected
    assert len(frozen) == len(expected)
    all_names = {n for n, _ in model.named_parameters()}
    assert trainable(model) == all_names - expected
    assert surgery.count_parameters(model)["frozen"] == numel(model, expected)
    # the head always learns
    assert {"head.fc.weight", "head.fc.bias"} <= trainable(model)


def test_freeze_returns_only_newly_frozen():
    model = tiny()
    first = surgery.freeze(model, before=5)
    second = surgery.freeze(model, before=8)
    assert len(first) > 0 and len(second) > 0
    assert not set(first) & set(second)
    assert surgery.freeze(model, before=8) == []


def test_freeze_backbone_leaves_exactly_the_head():
    for name in ("test_efficientnet", "test_resnet", "test_vit"):
        model = tiny(name)
        frozen = surgery.freeze_backbone(model)
        assert trainable(model) == {"head.fc.weight", "head.fc.bias"}, name
        expected = model.num_features * NUM_CLASSES + NUM_CLASSES
        assert surgery.count_parameters(model)["trainable"] == expected, name
        assert set(frozen) == {n for n, _ in model.named_parameters() if n.startswith("backbone.")}, name


def test_freeze_clears_existing_grads():
    model = tiny()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.backbone.conv_stem.weight.grad is not None
    surgery.freeze_backbone(model)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone."))
    assert model.head.fc.weight.grad is not None


def test_unfreeze_all_counts_tensors():
    model = tiny()
    frozen = surgery.freeze_backbone(model)
    assert surgery.unfreeze_all(model) == len(frozen)
    assert surgery.count_parameters(model)["frozen"] == 0
    assert surgery.unfreeze_all(model) == 0


def test_matches_prefix_and_glob_semantics():
    m = surgery.matches
    assert m("backbone.blocks.0", "backbone.blocks.0")
    assert m("backbone.blocks.0.0.conv.weight", "backbone.blocks.0")
    assert not m("backbone.blocks.01.conv.weight", "backbone.blocks.0")
    assert not m("backbone.blocks.10.weight", "backbone.blocks.1")
    assert not m("backbone.blocks", "backbone.blocks.0")
    # globs match the whole name (and '*' crosses dots)
    assert m("backbone.blocks.10.weight", "backbone.blocks.1*")
    assert m("backbone.blocks.3.0.bn1.weight", "backbone.blocks.*.bn1.*")
    assert not m("backbone.blocks.3.0.bn1.weight", "blocks.*")
    assert m("backbone.blocks.3.weight", "backbone.blocks.[2-4].weight")
    assert not m("backbone.blocks.5.weight", "backbone.blocks.[2-4].weight")
    # globs match whole dotted components, like plain names: a glob naming a module takes all inside it
    assert m("backbone.blocks.3.0.conv.weight", "backbone.blocks.[2-4]")
    assert not m("backbone.blocks.10.weight", "backbone.blocks.[0-3]")
    assert m("backbone.blocks.1.0.bn1.weight", "*.bn1")
    assert m("backbone.bn1.bias", "*.bn1")
    assert not m("backbone.bn10.bias", "*.bn1")
    assert m("head.fc.bias", "head.fc.bia?")
    assert surgery.match_any("head.fc.bias", ["nope", "head"])
    assert not surgery.match_any("head.fc.bias", [])


def test_pattern_freeze_with_prefix_does_not_take_siblings():
    model = GraftClassifier(Blocks(), NUM_CLASSES)
    frozen = surgery.freeze(model, patterns=["backbone.blocks.1"])
    assert set(frozen) == {"backbone.blocks.1.weight", "backbone.blocks.1.bias"}
    assert surgery.count_parameters(model)["frozen"] == 4 * 4 + 4
    assert "backbone.blocks.10.weight" in trainable(model)
    assert "backbone.blocks.11.weight" in trainable(model)


def test_pattern_freeze_with_glob():
    model = GraftClassifier(Blocks(), NUM_CLASSES)
    frozen = surgery.freeze(model, patterns=["backbone.blocks.[0-1]"])
    assert set(frozen) == {f"backbone.blocks.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    surgery.unfreeze_all(model)
    frozen = surgery.freeze(model, patterns=["backbone.blocks.1*"])
    assert set(frozen) == {f"backbone.blocks.{i}.{p}" for i in (1, 10, 11) for p in ("weight", "bias")}
    assert surgery.count_parameters(model)["frozen"] == 3 * 20

    model = tiny()
    frozen = surgery.freeze(model, patterns=["backbone.blocks.*.bn*", "backbone.conv_stem"])
    expected = {n for n, _ in model.named_parameters() if (n.startswith("backbone.blocks.") and ".bn" in n) or n.startswith("backbone.conv_stem.")}
    assert set(frozen) == expected
    assert surgery.count_parameters(model)["frozen"] == numel(model, expected)


def test_before_and_patterns_combine():
    model = tiny()
    layers = surgery.backbone_layers(model)
    frozen = surgery.freeze(model, before=2, patterns=["head.fc.bias"])
    expected = {f"{n}.{p}" for n, m in layers[:2] for p, _ in m.named_parameters(recurse=False)} | {"head.fc.bias"}
    assert set(frozen) == expected


# ------------------------------------------------------------------------------ fine_tune_at


def test_resolve_fine_tune_at():
    model = tiny()
    names = [n for n, _ in surgery.backbone_layers(model)]
    n = len(names)
    assert n == 30
    assert surgery.resolve_fine_tune_at(model, None) == n - math.ceil(n / 3) == 20
    assert surgery.resolve_fine_tune_at(model, 0) == 0
    assert surgery.resolve_fine_tune_at(model, 5) == 5
    assert surgery.resolve_fine_tune_at(model, -5) == 25
    assert surgery.resolve_fine_tune_at(model, -n) == 0
    assert surgery.resolve_fine_tune_at(model, n) == n  # everything frozen, only the head learns
    assert surgery.resolve_fine_tune_at(model, "conv_head") == names.index("backbone.conv_head")
    assert surgery.resolve_fine_tune_at(model, "backbone.conv_head") == names.index("backbone.conv_head")
    first_block2 = next(i for i, name in enumerate(names) if name.startswith("backbone.blocks.2."))
    assert surgery.resolve_fine_tune_at(model, "blocks.2") == first_block2
    assert surgery.resolve_fine_tune_at(model, "blocks.2.0.bn1") == names.index("backbone.blocks.2.0.bn1")


def test_resolve_fine_tune_at_none_on_small_backbone():
    model = GraftClassifier(Blocks(), NUM_CLASSES)
    assert surgery.resolve_fine_tune_at(model, None) == 12 - 4


@pytest.mark.parametrize("at", [31, 100, -31])
def test_resolve_fine_tune_at_out_of_range(at):
    with pytest.raises(ConfigError) as info:
        surgery.resolve_fine_tune_at(tiny(), at)
    msg = str(info.value)
    assert f"train.fine_tune_at={at}" in msg
    assert "30 layers" in msg


@pytest.mark.parametrize("at", ["blocks.99", "nonsense", "blocks.2.0.bn9"])
def test_resolve_fine_tune_at_unknown_name(at):
    with pytest.raises(ConfigError) as info:
        surgery.resolve_fine_tune_at(tiny(), at)
    assert f"'{at}'" in str(info.value)
    assert "graft plan" in str(info.value)


def test_resolve_fine_tune_at_rejects_bool():
    with pytest.raises(ConfigError, match="boolean"):
        surgery.resolve_fine_tune_at(tiny(), True)


def test_resolve_fine_tune_at_name_does_not_take_sibling():
    model = GraftClassifier(Blocks(), NUM_CLASSES)
    assert surgery.resolve_fine_tune_at(model, "blocks.1") == 1
    assert surgery.resolve_fine_tune_at(model, "blocks.10") == 10


def test_vit_root_parameters_are_the_first_layer():
    """A ViT's cls_token and pos_embed belong to the backbone root: they are layer 0, so
    fine_tune_at freezes them with the rest of the early layers."""
    model = tiny("test_vit")
    layers = surgery.backbone_layers(model)
    assert len(layers) == 39
    assert layers[0][0] == "backbone"
    assert sorted(n for n, _ in layers[0][1].named_parameters(recurse=False)) == ["cls_token", "pos_embed"]
    frozen = surgery.freeze(model, before=1)
    assert frozen == ["backbone.cls_token", "backbone.pos_embed"]
    assert surgery.count_parameters(model)["frozen"] == model.backbone.cls_token.numel() + model.backbone.pos_embed.numel()
    surgery.unfreeze_all(model)
    surgery.freeze(model, before=surgery.resolve_fine_tune_at(model, len(layers)))
    assert trainable(model) == {"head.fc.weight", "head.fc.bias"}


# ------------------------------------------------------------------------------ lr_mult groups

RULES = [
    LayerRule(pattern="backbone.blocks.0", lr_mult=0.0),
    LayerRule(pattern="backbone.blocks.*", lr_mult=0.1, decay_mult=0.5),
    LayerRule(pattern="backbone.blocks.1", lr_mult=7.0),  # shadowed by the rule above
    LayerRule(pattern="head", lr_mult=10.0, decay_mult=2.0),
]


def group_of(groups: list[dict]) -> dict[str, dict]:
    out = {}
    for g in groups:
        for name in g["names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = g
    return out


def test_param_groups_first_matching_rule_and_no_decay():
    model = tiny()
    groups = surgery.param_groups(model, lr=0.01, weight_decay=0.1, rules=RULES)
    by_name = group_of(groups)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())

    # lr_mult 0 is left out, as are frozen parameters
    assert not any(n.startswith("backbone.blocks.0.") for n in by_name)
    assert set(by_name) == {n for n in params if not n.startswith("backbone.blocks.0.")}

    for name, g in by_name.items():
        owner = modules[name.rsplit(".", 1)[0]]
        no_decay = params[name].ndim <= 1 or isinstance(owner, nn.modules.batchnorm._BatchNorm)
        if name.startswith("backbone.blocks."):
            lr_mult, decay_mult = 0.1, 0.5  # blocks.1 gets the first matching rule, not lr_mult=7
        elif name.startswith("head."):
            lr_mult, decay_mult = 10.0, 2.0
        else:
            lr_mult, decay_mult = 1.0, 1.0
        if no_decay:
            decay_mult = 0.0
        assert g["lr_mult"] == lr_mult, name
        assert g["decay_mult"] == decay_mult, name
        assert g["lr"] == pytest.approx(0.01 * lr_mult)
        assert g["initial_lr"] == pytest.approx(0.01 * lr_mult)
        assert g["weight_decay"] == pytest.approx(0.1 * decay_mult)

    assert by_name["head.fc.bias"]["weight_decay"] == 0.0
    assert by_name["head.fc.weight"]["weight_decay"] == pytest.approx(0.2)
    assert by_name["backbone.bn1.weight"]["weight_decay"] == 0.0
    assert by_name["backbone.conv_stem.weight"]["weight_decay"] == pytest.approx(0.1)
    assert by_name["backbone.blocks.1.0.conv_exp.weight"]["weight_decay"] == pytest.approx(0.05)
    assert by_name["backbone.blocks.1.0.bn1.weight"]["weight_decay"] == 0.0
    # one group per distinct (lr_mult, decay_mult)
    keys = [(g["lr_mult"], g["decay_mult"]) for g in groups]
    assert len(keys) == len(set(keys))


def test_param_groups_names_align_with_params():
    model = tiny()
    params = dict(model.named_parameters())
    groups = surgery.param_groups(model, lr=1.0, weight_decay=0.0, rules=RULES)
    order = list(params)
    for g in groups:
        assert len(g["names"]) == len(g["params"])
        for name, p in zip(g["names"], g["params"]):
            assert params[name] is p
        assert g["names"] == sorted(g["names"], key=order.index)  # model order


def test_param_groups_every_trainable_param_once_frozen_none():
    model = tiny("test_vit")
    surgery.freeze(model, before=10)
    groups = surgery.param_groups(model, lr=1e-3, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    names = [n for g in groups for n in g["names"]]
    assert set(names) == trainable(model)
    assert sum(p.numel() for g in groups for p in g["params"]) == surgery.count_parameters(model)["trainable"]
    # LayerNorm weights and all biases get no decay
    by_name = group_of(groups)
    assert by_name["backbone.norm.weight"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.5.attn.qkv.bias"]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.5.attn.qkv.weight"]["weight_decay"] == pytest.approx(0.05)


def test_param_groups_decay_everything_when_asked():
    model = tiny()
    groups = surgery.param_groups(model, lr=1e-3, weight_decay=0.05, no_decay_bias_norm=False)
    assert len(groups) == 1
    assert groups[0]["weight_decay"] == pytest.approx(0.05)
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_apply_lr_mult_freezing():
    model = tiny()
    frozen = surgery.apply_lr_mult_freezing(model, RULES)
    expected = {n for n, _ in model.named_parameters() if n.startswith("backbone.blocks.0.")}
    assert set(frozen) == expected and expected
    assert trainable(model) == {n for n, _ in model.named_parameters()} - expected
    assert surgery.count_parameters(model)["frozen"] == numel(model, expected)
    # a zero rule shadowed by an earlier non-zero one freezes nothing
    model = tiny()
    assert surgery.apply_lr_mult_freezing(model, [LayerRule(pattern="head", lr_mult=1.0), LayerRule(pattern="head.fc", lr_mult=0.0)]) == []


# ------------------------------------------------------------------------------ frozen parameters stay untouched


@pytest.mark.parametrize("opt_type", ["sgd", "adamw"])
def test_frozen_params_get_no_grad_and_no_optimizer_state(opt_type):
    torch.manual_seed(0)
    model = tiny()
    surgery.freeze(model, before=20)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = surgery.param_groups(model, lr=0.1, weight_decay=0.1)
    opt = make_optimizer(groups, SolverConfig(type=opt_type, base_lr=0.1))
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    assert frozen and len(frozen) < len(params)
    for n in frozen:
        assert params[n].grad is None, n
        assert params[n] not in opt.state, n
        assert torch.equal(params[n], before[n]), n
    state_ids = {id(p) for p in opt.state}
    assert state_ids == {id(params[n]) for n in params if n not in frozen}
    assert any(not torch.equal(params[n], before[n]) for n in params if n not in frozen)


# ------------------------------------------------------------------------------ reinit


def perturb(model: nn.Module) -> None:
    """Move every parameter and BN statistic away from its init value, so a reset is visible."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.add_(0.3)
                m.running_var.mul_(2.0)


def test_reinit_changes_exactly_the_matched_modules():
    model = tiny()
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = surgery.reinit(model, ["backbone.blocks.1", "head"], generator_seed=0)
    assert done == [
        "backbone.blocks.1.0.conv_exp",
        "backbone.blocks.1.0.bn1",
        "backbone.blocks.1.0.conv_pwl",
        "backbone.blocks.1.0.bn2",
        "head.fc",
    ]
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    expected = {
        k for k in after if (k.startswith("backbone.blocks.1.") or k.startswith("head.")) and not k.endswith("num_batches_tracked")
    }
    assert changed == expected
    assert torch.equal(after["backbone.blocks.1.0.bn1.running_mean"], torch.zeros_like(after["backbone.blocks.1.0.bn1.running_mean"]))
    assert torch.equal(after["backbone.blocks.1.0.bn1.running_var"], torch.ones_like(after["backbone.blocks.1.0.bn1.running_var"]))


def test_reinit_glob_and_seeded_determinism():
    a, b = tiny(), tiny()
    perturb(a)
    perturb(b)
    da = surgery.reinit(a, ["backbone.blocks.*.conv_pwl"], generator_seed=5)
    db = surgery.reinit(b, ["backbone.blocks.*.conv_pwl"], generator_seed=5)
    assert da == db and len(da) == 4 and all(n.endswith("conv_pwl") for n in da)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_reinit_pattern_matching_nothing_is_an_error():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as info:
        surgery.reinit(model, ["head", "backbone.blocks.9"])
    assert "backbone.blocks.9" in str(info.value)
    assert "'head'" not in str(info.value)
    assert surgery.reinit(model, []) == []
    assert before.keys() == model.state_dict().keys()


# ------------------------------------------------------------------------------ frozen BatchNorm


def test_frozen_backbone_bn_in_eval_head_in_train():
    model = tiny()
    surgery.freeze_backbone(model)
    assert model.train() is model
    bns = bn_modules(model)
    assert len(bns) == 13
    assert all(not m.training for m in bns.values())
    assert model.training and model.head.training and model.head.dropout.training
    # only BatchNorm is switched: the backbone itself and its convs stay in train mode
    assert model.backbone.training and model.backbone.conv_stem.training
    # eval() then train() again keeps the rule
    model.eval()
    model.train()
    assert all(not m.training for m in bns.values())
    assert model.head.training


def test_partly_frozen_bn_follows_its_parameters():
    model = tiny()
    surgery.freeze(model, before=10)
    model.train()
    frozen_layers = {n for n, _ in surgery.backbone_layers(model)[:10]}
    for name, m in bn_modules(model).items():
        assert m.training == (name not in frozen_layers), name
    names = surgery.set_frozen_batchnorm_eval(model)
    assert set(names) == frozen_layers & set(bn_modules(model))
    assert names == ["backbone.bn1", "backbone.blocks.0.0.bn1", "backbone.blocks.1.0.bn1", "backbone.blocks.1.0.bn2", "backbone.blocks.2.0.bn1"]


def test_frozen_bn_eval_opt_out_and_eval_mode():
    model = tiny(frozen_bn_eval=False)
    surgery.freeze_backbone(model)
    model.train()
    assert all(m.training for m in bn_modules(model).values())
    model = tiny()
    surgery.freeze_backbone(model)
    model.eval()
    assert not any(m.training for m in model.modules())


def run_epoch(model: GraftClassifier, seed: int = 0) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = make_optimizer(surgery.param_groups(model, lr=0.05, weight_decay=0.0), SolverConfig(type="sgd", base_lr=0.05))
    model.train()
    for _ in range(4):
        x = torch.randn(6, 3, 32, 32, generator=g) * 2 + 1
        y = torch.randint(0, NUM_CLASSES, (6,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.") and ("running_" in k or "num_batches" in k)}


def test_frozen_backbone_bn_statistics_unchanged_after_an_epoch():
    model = tiny()
    surgery.freeze_backbone(model)
    before = bn_buffers(model)
    head_before = model.head.fc.weight.detach().clone()
    run_epoch(model)
    after = bn_buffers(model)
    assert len(before) == 13 * 3
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(head_before, model.head.fc.weight)  # the head did learn


def test_frozen_bn_statistics_drift_when_opted_out():
    model = tiny(frozen_bn_eval=False)
    surgery.freeze_backbone(model)
    before = bn_buffers(model)
    run_epoch(model)
    after = bn_buffers(model)
    means = [k for k in before if k.endswith("running_mean")]
    variances = [k for k in before if k.endswith("running_var")]
    assert all(not torch.equal(before[k], after[k]) for k in means)
    assert all(not torch.equal(before[k], after[k]) for k in variances)
    assert all(int(after[k]) == int(before[k]) + 4 for k in before if k.endswith("num_batches_tracked"))


def test_bn_inference_keeps_trainable_batchnorm_in_inference_mode_while_it_learns():
    model = tiny(bn_inference=True)
    surgery.freeze(model, before=10)  # the top of the backbone learns, BatchNorm layers included
    model.train()
    assert bn_modules(model) and not any(m.training for m in bn_modules(model).values())
    assert model.head.training and model.backbone.training
    learning_bn = [n for n, m in bn_modules(model).items() if any(p.requires_grad for p in m.parameters())]
    assert learning_bn
    stats_before = bn_buffers(model)
    affine_before = {n: bn_modules(model)[n].weight.detach().clone() for n in learning_bn}
    run_epoch(model)
    assert all(torch.equal(stats_before[k], v) for k, v in bn_buffers(model).items())  # statistics kept
    assert any(not torch.equal(affine_before[n], bn_modules(model)[n].weight) for n in learning_bn)  # scale/shift learn
    assert ModelConfig().bn_inference  # graft's default: the Keras tutorial's advice for fine-tuning


def affine_free_model() -> GraftClassifier:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.num_features = 4
    return GraftClassifier(backbone, 2)


def test_affine_free_batchnorm_in_frozen_backbone_is_eval():
    """BatchNorm without parameters follows its parent module."""
    model = affine_free_model()
    surgery.freeze_backbone(model)
    model.train()
    assert not model.backbone[1].training
    assert surgery.set_frozen_batchnorm_eval(model) == ["backbone.1"]
    assert model.head.training


def test_affine_free_batchnorm_in_trainable_backbone_trains():
    model = affine_free_model()
    model.train()
    assert model.backbone[1].training


# ------------------------------------------------------------------------------ widen_head


def test_widen_head_keeps_old_logits_bit_for_bit_and_counts_what_is_new():
    """K -> K + N: the old rows are copied, the old logits are bit-identical on every input, and only
    N * in_features + N parameters are new (the reference answer's 1024x90 -> 1024x92 case, scaled)."""
    import torch

    from graft.configuration import ModelConfig
    from graft.models.backbones import build_model
    from graft.models.surgery import widen_head

    model, _ = build_model(ModelConfig(name="test_resnet", weights="none"), 90)
    model.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    embeddings = torch.randn(33, model.num_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, before_emb = model(x), model.head(embeddings)
    old_weight, old_bias = model.head.fc.weight.clone(), model.head.fc.bias.clone()
    counts = widen_head(model, 2, seed=7)
    assert counts == {"old_classes": 90, "new_classes": 2, "new_parameters": 2 * model.num_features + 2}
    with torch.no_grad():
        after, after_emb = model(x), model.head(embeddings)
    assert after.shape == (5, 92)
    assert torch.equal(after[:, :90], before) and torch.equal(after_emb[:, :90], before_emb)
    assert torch.equal(model.head.fc.weight[:90], old_weight) and torch.equal(model.head.fc.bias[:90], old_bias)
    assert model.head.block_sizes == [90, 2]


def test_widening_twice_keeps_every_earlier_block():
    import torch

    from graft.configuration import ModelConfig
    from graft.models.backbones import build_model
    from graft.models.surgery import widen_head

    model, _ = build_model(ModelConfig(name="test_resnet", weights="none"), 3)
    model.eval()
    e = torch.randn(8, model.num_features, generator=torch.Generator().manual_seed(0))
    first = model.head(e).detach()
    widen_head(model, 2, seed=1)
    second = model.head(e).detach()
    widen_head(model, 1, seed=2)
    third = model.head(e).detach()
    assert model.head.block_sizes == [3, 2, 1]
    assert torch.equal(third[:, :3], first) and torch.equal(third[:, :5], second)


def test_a_widened_model_saves_and_loads_as_a_finished_run(tmp_path):
    """model.json records the head blocks; load_run rebuilds them and predicts identically."""
    import torch
    from safetensors.torch import save_file

    from graft.configuration import GraftConfig
    from graft.io import write_json
    from graft.models.backbones import build_model
    from graft.models.surgery import widen_head
    from graft.pipeline.predict import load_run

    cfg = GraftConfig.model_validate({"model": {"name": "test_resnet", "weights": "none"}})
    model, _ = build_model(cfg.model, 3)
    widen_head(model, 2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    write_json(tmp_path / "model.json", {"classes": list("abcde"), "num_classes": 5, "config": cfg.to_dict(), "head": {"layer": "head.fc", "blocks": [3, 2]},
                                         "preprocessing": {"input_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}})
    run = load_run(tmp_path, device="cpu")
    assert run.model.head.block_sizes == [3, 2]
    e = torch.randn(4, model.num_features)
    with torch.no_grad():
        assert torch.equal(run.model.head.eval()(e), model.head.eval()(e))


def test_widen_head_needs_a_new_class():
    from graft.configuration import ModelConfig
    from graft.models.backbones import build_model
    from graft.models.surgery import widen_head

    model, _ = build_model(ModelConfig(name="test_resnet", weights="none"), 3)
    with pytest.raises(ConfigError, match="at least one new class"):
        widen_head(model, 0)


def test_freeze_and_lr_mult_patterns_that_name_no_parameter_are_refused():
    """A typo ('block' for 'blocks') would silently train what the user meant to freeze."""
    model = tiny()
    surgery.check_rule_patterns(model, ["backbone.blocks.1"], [LayerRule(pattern="backbone.blocks.[0-1]", lr_mult=0.0)])
    with pytest.raises(ConfigError, match=r"model.freeze pattern\(s\) \['backbone.block.\*'\] match no parameter"):
        surgery.check_rule_patterns(model, ["backbone.blocks.1", "backbone.block.*"], [])
    with pytest.raises(ConfigError, match=r"model.lr_mult pattern\(s\) \['backbone.blocks.9'\] match no parameter"):
        surgery.check_rule_patterns(model, [], [LayerRule(pattern="backbone.blocks.9", lr_mult=0.0)])
