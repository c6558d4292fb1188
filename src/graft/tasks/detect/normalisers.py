"""Detector losses that stay the same when a batch is split over several processes.

The trainer weights each process's loss by its share of the global batch, which makes the
averaged gradient exact for a loss that is a mean over images (RetinaNet's, Faster R-CNN's with
their fixed samples per image). FCOS instead divides its sums by the *batch's* number of
foreground locations: computed per process, that normaliser differs from one process's, and so
would the gradient. ``GlobalFCOSHead`` divides by the foreground count of the whole global
batch (summed over the ranks), expressed as this rank's share of its images, so that N
processes compute the gradient one process would (as detectron2 and AdelaiDet reduce it).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection.fcos import FCOSHead

from graft.engine import distributed


class GlobalFCOSHead(FCOSHead):
    """FCOS's head, its loss normalised by the global batch's foreground count."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):  # noqa: ANN001 (torchvision's signature)
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if not distributed.active():
            return losses
        local = float(sum(int((m >= 0).sum()) for m in matched_idxs))
        everywhere, images = distributed.all_sum([local, len(targets)])
        share = max(1.0, everywhere) * len(targets) / images  # max(1, F): as torchvision divides
        return {k: v * (max(1.0, local) / share) for k, v in losses.items()}


def with_global_normalisers(model: nn.Module) -> nn.Module:
    """Give every FCOS head of ``model`` (branches too) the global normaliser; same weights."""
    for module in model.modules():
        if type(module) is FCOSHead:
            module.__class__ = GlobalFCOSHead
    return model
