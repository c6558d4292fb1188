"""graft: adapt pretrained image models to your own images.

The Python API in eight names::

    import graft
    cfg = graft.config(data={"dir": "pets/"}, train={"strategy": "two-phase", "epochs": 5})
    result = graft.fit(cfg, "runs/pets")            # train; writes the run folder
    run = graft.load_run("runs/pets")               # a finished run
    run.predict(["photo.jpg"], top_k=3)             # -> [Prediction(path, top=[(class, prob), ...])]
    run.evaluate("more_pets/")                      # -> {"accuracy", "loss", "per_class", ...}
    det = graft.fit(graft.config(task="detect", data={"dir": "boxes/"}), "runs/det")  # COCO, YOLO or VOC
    graft.load_run("runs/det").predict(["aerial.jpg"], conf=0.3)  # -> [ImageDetections(path, boxes)]
    graft.expand("runs/pets", "new_pets/", "runs/pets+2")  # add classes, keep the old ones
    graft.export("runs/pets", "onnx")               # runs/pets/export/model.onnx, checked against the run
    graft.load_export("runs/pets/export/model.onnx").predict(["photo.jpg"])  # onnxruntime only

Lower levels (data scanning, model building, surgery, the loop) are importable from their
modules: ``graft.data.folder.scan_folder``, ``graft.models.backbones.build_model``,
``graft.models.surgery``, ``graft.engine.loop.Trainer``.
"""

from __future__ import annotations

from typing import Any

from graft.version import __version__


def config(file: str | None = None, overrides: list[str] = (), **sections: dict[str, Any]):
    """A validated ``GraftConfig`` from an optional YAML file, ``a.b=value`` overrides and section dicts."""
    from graft.configuration import resolve_config

    flags = {f"{section}.{key}": value for section, values in sections.items() if isinstance(values, dict) for key, value in values.items()}
    flags.update({key: value for key, value in sections.items() if not isinstance(value, dict)})  # top-level keys: task
    return resolve_config(file, list(overrides), flags)


def fit(cfg: Any, out: str, *, resume: str | None = None, overwrite: bool = False, quiet: bool = False):
    """Train into the run folder ``out`` (or continue the snapshot ``resume``); returns a ``TrainResult``."""
    from graft.pipeline.train import train

    return train(cfg, out, resume=resume, overwrite=overwrite, quiet=quiet)


def expand(
    run: str,
    data: str,
    out: str,
    *,
    mode: str = "frozen",
    exemplars: int | None = None,
    file: str | None = None,
    overrides: list[str] = (),
    overwrite: bool = False,
    quiet: bool = False,
    **sections: dict[str, Any],
):
    """Add the classes in ``data`` (folders not named like one of ``run``'s classes) to the finished
    run ``run``, writing the expanded run to ``out``; returns an ``ExpandResult`` whose
    ``expand_metrics`` says how the old classes fared. ``sections`` override config keys as in ``config``."""
    from graft.pipeline.expand import expand as _expand
    from graft.pipeline.expand import expand_config, load_source

    flags = {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
    flags.update({"expand.mode": mode, "expand.exemplars": exemplars})
    source = load_source(run)
    cfg = expand_config(source, data, config_file=file, overrides=list(overrides), flags=flags)
    return _expand(cfg, out, overwrite=overwrite, quiet=quiet)


def load_run(run_dir: str, device: str = "auto"):
    """A finished run as a ``TrainedModel`` with ``predict`` and ``evaluate``."""
    from graft.pipeline.predict import load_run as _load

    return _load(run_dir, device)


def export(run_dir: str, fmt: str = "onnx", *, out: str | None = None, half: bool = False, images: str | None = None):
    """Export the finished run to ONNX or TorchScript, kept only if it predicts as the run does;
    returns an ``ExportResult`` (path, sidecar, parity figures)."""
    from graft.pipeline.export import export_run

    return export_run(run_dir, fmt, out=out, half=half, images=images)


def load_export(path: str):
    """An exported model with its sidecar; ``predict`` as the run's model (classes, or boxes),
    without PyTorch for ONNX."""
    from graft.pipeline.export import load_export as _load_export

    return _load_export(path)


__all__ = ["__version__", "config", "expand", "export", "fit", "load_export", "load_run"]
