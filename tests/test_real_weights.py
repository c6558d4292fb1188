"""The bundled ImageNet weights, for real: a cat photo is a cat, and the demo learns."""

from __future__ import annotations

import json

import pytest
import torch

from graft.data.images import load_image
from graft.data.transforms import eval_transform, preprocessing_for
from graft.demo import run_demo
from graft.tasks.classify.demo import skimage_photo
from graft.models.backbones import build_model, imagenet_model
from graft.configuration import ModelConfig

# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def imagenet():
    return imagenet_model()


def test_bundled_weights_classify_a_cat_photo_as_a_cat(imagenet):
    photo = load_image(skimage_photo("chelsea"))
    pre = preprocessing_for(imagenet)
    assert (pre.input_size, pre.mean, pre.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.inference_mode():
        probs = imagenet(eval_transform(pre)(photo).unsqueeze(0)).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


def test_graft_backbone_carries_the_same_imagenet_features(imagenet):
    """build_model's backbone (classifier removed) gives the embeddings the ImageNet head was trained on."""
    model, report = build_model(ModelConfig(), num_classes=2)
    assert set(report.skipped) == {"classifier.weight", "classifier.bias"}
    assert report.reinitialized == ["head.fc.weight", "head.fc.bias"]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.inference_mode():
        ours = model.embed(x)
        theirs = imagenet.forward_head(imagenet.forward_features(x), pre_logits=True)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.slow
def test_demo_learns_the_textures_well_above_chance(tmp_path):
    result = run_demo(tmp_path / "demo", epochs=1, fine_tune_epochs=1, quiet=True)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["classes"] == ["brick", "grass", "gravel"]
    assert metrics["val_accuracy"] >= 0.8  # chance is 1/3
    for plot in ("learning_curves.png", "confusion_matrix.png", "predictions.png"):
        assert (result.run_dir / plot).stat().st_size > 10_000
