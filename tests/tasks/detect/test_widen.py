"""Widening a sigmoid-head detector: old class logits bit-identical, old detections unchanged even
when the new classes score higher everywhere, and a second widening keeps both earlier blocks."""

from __future__ import annotations

import copy

import pytest
import torch

from graft.configuration import parse_config
from graft.tasks.detect.build import build_detection_model
from graft.tasks.detect.widen import BlockConv2d, class_blocks, widen_detector


def tiny(head: str, classes: int = 2):
    cfg = parse_config({"task": "detect", "model": {"name": "test_efficientnet", "weights": "none"}, "data": {"img_size": 64}, "detect": {"head": head}})
    model, _ = build_detection_model(cfg, classes, seed=0)
    # trained-looking weights: every parameter random, so the old block's logits are not all equal
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.detector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def cls_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        features = list(model.detector.backbone(model.detector.transform.normalise(images)).values())
        return model.detector.head.classification_head(features)


def make_new_block_shout(model) -> None:
    """The newest block scores high everywhere: with shared caps it would crowd the old classes out."""
    with torch.no_grad():
        model.detector.head.classification_head.cls_logits.blocks[-1].bias.fill_(8.0)


@pytest.mark.parametrize("head", ["fcos", "retinanet"])
def test_old_logits_and_detections_are_unchanged_after_widening_twice(head) -> None:
    original = tiny(head)
    original.detector.detections_per_img = 5  # small caps, so that crowding would show
    original.detector.topk_candidates = 20
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    before_logits = cls_logits(original, images)
    with torch.no_grad():
        before = original(images)

    model = copy.deepcopy(original)
    added = widen_detector(model, 1, seed=0)
    make_new_block_shout(model)
    widen_detector(model, 2, seed=1)
    make_new_block_shout(model)
    assert class_blocks(model) == [2, 1, 2] and model.num_classes == 5
    anchors = model.detector.head.classification_head.num_anchors
    assert added["new_parameters"] == model.detector.head.classification_head.cls_logits.blocks[1].weight.numel() + anchors

    after_logits = cls_logits(model, images)
    assert after_logits.shape[-1] == 5
    assert torch.equal(after_logits[..., :2], before_logits)  # bit-identical, not merely close
    with torch.no_grad():
        after = model(images)
    for b, a in zip(before, after):
        old = a["labels"] < 2
        assert torch.equal(a["boxes"][old], b["boxes"]) and torch.equal(a["scores"][old], b["scores"]) and torch.equal(a["labels"][old], b["labels"])
        assert (a["labels"] >= 2).any()  # the new classes do detect, beside the old ones
        assert torch.all(a["scores"][:-1] >= a["scores"][1:])  # merged in score order


def test_block_conv_keeps_torchvisions_anchor_class_layout() -> None:
    """RetinaNet has 9 anchors per location: channel a*K + k is anchor a, class k."""
    torch.manual_seed(0)
    old, new = torch.nn.Conv2d(4, 9 * 2, 3, padding=1), torch.nn.Conv2d(4, 9 * 1, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    y = BlockConv2d([old, new], 9, [2, 1])(x).view(1, 9, 3, 5, 5)
    assert torch.equal(y[:, :, :2], old(x).view(1, 9, 2, 5, 5)) and torch.equal(y[:, :, 2:], new(x).view(1, 9, 1, 5, 5))


def test_widened_state_dict_loads_into_a_model_widened_the_same_way() -> None:
    model = tiny("fcos")
    widen_detector(model, 1)
    rebuilt = tiny("fcos")
    widen_detector(rebuilt, 1, seed=5)
    rebuilt.load_state_dict(model.state_dict())
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(cls_logits(rebuilt, images), cls_logits(model, images))


def test_softmax_heads_and_no_new_classes_are_refused() -> None:
    with pytest.raises(ValueError, match="would change every old score \\(softmax\\): add a branch instead"):
        widen_detector(tiny("fasterrcnn"), 1)
    with pytest.raises(ValueError, match="no new classes"):
        widen_detector(tiny("fcos"), 0)
