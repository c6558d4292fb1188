"""graft: adapt pretrained image models to your own images.

The Python API in five names::

    import graft
    cfg = graft.config(data={"dir": "pets/"}, train={"strategy": "two-phase", "epochs": 5})
    result = graft.fit(cfg, "runs/pets")            # train; writes the run folder
    run = graft.load_run("runs/pets")               # a finished run
    run.predict(["photo.jpg"], top_k=3)             # -> [Prediction(path, top=[(class, prob), ...])]
    run.evaluate("more_pets/")                      # -> {"accuracy", "loss", "per_class", ...}

Lower levels (data scanning, model building, surgery, the loop) are importable from their
modules: ``graft.data.folder.scan_folder``, ``graft.models.backbones.build_model``,
``graft.models.surgery``, ``graft.train.loop.Trainer``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def config(file: str | None = None, overrides: list[str] = (), **sections: dict[str, Any]):
    """A validated ``GraftConfig`` from an optional YAML file, ``a.b=value`` overrides and section dicts."""
    from graft.config import resolve_config

    flags = {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
    return resolve_config(file, list(overrides), flags)


def fit(cfg: Any, out: str, *, resume: str | None = None, overwrite: bool = False, quiet: bool = False):
    """Train into the run folder ``out`` (or continue the snapshot ``resume``); returns a ``TrainResult``."""
    from graft.train.runner import train

    return train(cfg, out, resume=resume, overwrite=overwrite, quiet=quiet)


def load_run(run_dir: str, device: str = "auto"):
    """A finished run as a ``TrainedModel`` with ``predict`` and ``evaluate``."""
    from graft.predict import load_run as _load

    return _load(run_dir, device)


__all__ = ["__version__", "config", "fit", "load_run"]
