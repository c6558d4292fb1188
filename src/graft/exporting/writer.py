"""``graft export``: a finished run as a file another program can run (ONNX or TorchScript), with
a sidecar that says everything needed to use it, and a parity check that the file predicts as the
run does.

The parity check runs the export through ``graft.exporting.exported`` (the sidecar's preprocessing in NumPy
and PIL, onnxruntime for ONNX) and the run through graft's own PyTorch code, on real images of the
run's validation split, and compares: classifiers, logits within a tolerance and the same top-1;
detectors, every box matched (same class, IoU >= 0.99, score within a tolerance). The model file is
written to a temporary name, checked, and only then moved into place with its sidecar: an export
that disagrees with its model is never left behind.

Both formats are traced (``torch.onnx.export(dynamo=False)`` and ``torch.jit.trace``): torchvision's
detectors are written for the tracing exporter (their post-processing has ONNX-specific paths),
and one route for both kinds of model keeps the parity figures comparable. Classifiers get a
dynamic batch axis; detectors take one image at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from graft.version import __version__
from graft.console import plural
from graft.data.images import ImageError, load_image
from graft.errors import ConfigError, ExportError
from graft.exporting.exported import ExportedModel, sidecar_path
from graft.io import file_digest, fsync_folder, read_json, sweep_temps, write_json

FORMATS = {"onnx": "onnx", "torchscript": "pt"}
DEFAULT_OPSET = 17
PARITY_IMAGES = 16


class ExportSpec(Protocol):
    """What a task tells the exporter (``TaskPackage.export_spec``)."""

    task: str  # the sidecar's ``task``

    def traced(self, run: Any, half: bool) -> Traced:
        """The module to trace (a copy of ``run.model``, in float16 where ``half``) and its example input."""

    def describe(self, run: Any, half: bool) -> dict[str, Any]:
        """The sidecar's task-specific entries: ``preprocessing``, ``input``, ``outputs`` and more."""

    def exported(self, path: Path, meta: dict[str, Any]) -> ExportedModel:
        """The export at ``path`` run as the task's exported model."""

    def parity(self, run: Any, exported: ExportedModel, checked: list, half: bool) -> dict[str, Any]:
        """The export against the run on ``checked`` (path, image) pairs: ``passed``, ``summary``, figures."""


@dataclass
class Traced:
    module: nn.Module  # in eval mode, on the CPU
    example: torch.Tensor
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    parity: dict[str, Any]


def default_path(run_dir: Path, fmt: str, half: bool) -> Path:
    return run_dir / "export" / f"model{'-fp16' if half else ''}.{FORMATS[fmt]}"


def _target(out: str | os.PathLike | None, run_dir: Path, fmt: str, half: bool) -> Path:
    """Where the export goes: ``out``, or into it when it is a folder (existing, or written with
    a trailing slash) under the default name; an extension of the other format is refused."""
    if out is None:
        return default_path(run_dir, fmt, half)
    target = Path(out)
    if target.is_dir() or str(out).endswith(("/", os.sep)):
        return target / default_path(run_dir, fmt, half).name
    other = {f".{ext}" for name, ext in FORMATS.items() if name != fmt}
    if target.suffix.lower() in other:
        raise ConfigError(f"--out {out} names a {target.suffix} file, but the format is {fmt}: name it .{FORMATS[fmt]}, or pass --format {next(n for n, e in FORMATS.items() if f'.{e}' == target.suffix.lower())}")
    return target


def export_model(run: Any, run_dir: Path, spec: ExportSpec, fmt: str = "onnx", *, out: str | os.PathLike | None = None, half: bool = False, opset: int = DEFAULT_OPSET,
                 images: str | os.PathLike | None = None, parity_images: int = PARITY_IMAGES, say: Any = None) -> ExportResult:
    """Export the finished run ``run`` (from ``run_dir``) to ``out`` (default
    ``RUNDIR/export/model.EXT``) and check it against the run on up to ``parity_images`` images
    (the run's validation split, or the image files under ``images``). Raises ``ExportError`` if
    the export disagrees with the run."""
    say = say or (lambda msg: None)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    target = _target(out, run_dir, fmt, half)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_temps(target.parent, recursive=False)  # what a killed export left (its model and sidecar temporaries)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # atomic_write's naming, which sweep_temps knows
        tmp.touch()
    except OSError as err:
        raise ExportError(f"cannot write the export to {target.parent}: {err.strerror or err}") from None
    checked = list(itertools.islice(_parity_images(run, run_dir, images), parity_images))
    if not checked and images is not None:
        why = "does not exist" if not Path(images).exists() else "holds no readable image"
        raise ExportError(f"--images {images} {why}: give a folder (or file) with a few images like the run's to check the export on")
    if not checked:
        raise ExportError("no readable images to check the export on: the run's validation images are gone (moved?); pass --images DIR with a few images like the run's")
    meta = sidecar(run, spec, fmt, half, opset, run_dir)
    started = time.perf_counter()
    try:
        _trace(spec.traced(run, half), fmt, opset, tmp)
        say(f"exported {run_dir} to {fmt}{' (float16)' if half else ''} in {time.perf_counter() - started:.1f}s; checking it against the run on {plural(len(checked), 'image')}")
        exported = spec.exported(tmp, meta)
        parity = spec.parity(run, exported, checked, half)
        meta["parity"] = parity
        if not parity["passed"]:
            raise ExportError(f"the {fmt} export disagrees with the run, so it was not kept: {parity['summary']}")
        write_json(sidecar_path(target), meta)
        with open(tmp, "rb+") as f:  # as atomic_write: the bytes on disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"exporting {run_dir} to {fmt} failed: {type(err).__name__}: {str(err)[:300]}") from err
    finally:
        tmp.unlink(missing_ok=True)
    say(f"parity: {parity['summary']}; wrote {target} and {sidecar_path(target).name}")
    return ExportResult(target, sidecar_path(target), parity)


# ---------------------------------------------------------------------------- writing


def _trace(traced: Traced, fmt: str, opset: int, path: Path) -> None:
    """Write the traced module to ``path`` (both formats trace; see the module's docstring)."""
    module, example = traced.module, traced.example
    names, axes = (traced.input_names, traced.output_names), traced.dynamic_axes
    with warnings.catch_warnings(), torch.no_grad(), _native_output_kept():
        warnings.simplefilter("ignore")  # the tracers' notes on Python control flow and the legacy exporter's deprecation
        if fmt == "onnx":
            torch.onnx.export(module, (example,), str(path), input_names=names[0], output_names=names[1], dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        else:
            torch.jit.trace(module, (example,), check_trace=False).save(str(path))


@contextlib.contextmanager
def _native_output_kept():
    """The ONNX exporter's C++ side prints the whole Torch IR graph (thousands of lines) to the
    process's stdout when an export fails, where graft's JSON goes. Both native streams go to a
    file while exporting; on failure its text becomes a note on the exception (``--debug``)."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no file descriptors to redirect
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException as err:
            log.seek(0)
            text = log.read().decode("utf-8", "replace").strip()
            if text:  # its opening says what it is; the failing op is near its end
                err.add_note("the exporter's own output:\n" + (text if len(text) <= 4000 else f"{text[:1000]}\n[...]\n{text[-3000:]}"))
            raise
        finally:
            for fd, copy_of in ((1, saved[0]), (2, saved[1])):
                os.dup2(copy_of, fd)
                os.close(copy_of)


def sidecar(run: Any, spec: ExportSpec, fmt: str, half: bool, opset: int, run_dir: Path) -> dict[str, Any]:
    """Everything another program needs to use the exported model (``model.onnx.json``)."""
    meta: dict[str, Any] = {
        "format": fmt, "opset": opset if fmt == "onnx" else None, "half": half, "task": spec.task, "classes": list(run.classes),
        "graft_version": __version__, "torch_version": torch.__version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {"run": str(run_dir.resolve()), "model_sha256": file_digest(run_dir / "model.safetensors")},
    }
    meta.update(spec.describe(run, half))
    return meta


# ---------------------------------------------------------------------------- parity


def _parity_images(run: Any, run_dir: Path, images: str | os.PathLike | None):
    """Real images, loaded: the ones under ``images``, else the run's validation split (else its
    test or training split). Unreadable ones are skipped."""
    from graft.prediction import expand_inputs

    if images is not None:
        paths = expand_inputs([images])
    else:
        splits = read_json(run_dir / "splits.json") if (run_dir / "splits.json").is_file() else {}
        root = Path(splits.get("root", "."))
        paths = []
        for split in ("val", "test", "train"):
            entries = splits.get(split) or []
            paths = [root / (e["path"] if isinstance(e, dict) else e[0]) for e in entries]
            if paths:
                break
    for p in paths:
        try:
            yield p, load_image(p)
        except ImageError:
            continue


