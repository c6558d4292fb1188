"""``RUNDIR/report.html``: a finished run as one page that a person can open or mail.

Everything on the page comes from the run folder's own files (``model.json``, ``metrics.json``,
``config.yaml``, ``splits.json``, ``weights_report.json``, ``expand_metrics.json`` and the plots), so
the page written at the end of a run and the one ``graft report RUNDIR`` writes later are the same.
The page is self-contained: images are base64 data URIs, CSS and the few lines of JS that sort the
tables are inline, and nothing is fetched from anywhere. A section whose file is missing is left
out, so an older run still gets a page. Every text from the data goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import yaml

from graft.errors import GraftError
from graft.io import write_text
from graft.report.page import CSS, JS, cell, esc, figure, img, name_list, pairs, pct, table
from graft.version import __version__

__all__ = ["REPORT_FILE", "ReportSpec", "write_report", "write_report_after_run"]

REPORT_FILE = "report.html"

CELLS = {"pct": pct, "num": lambda v: f"{v:.3f}", "int": str}  # how a per-class column shows its figures


@dataclass(frozen=True)
class ReportSpec:
    """What the page shows where tasks differ (``TaskPackage.report_spec``): the rest of the page
    is the same for every task."""

    task_title: str  # "image classification"
    headline: tuple[tuple[str, str], ...]  # (metrics.json key, label) of the headline cards
    test_key: str  # the headline figure that is None when the run had no test split
    forgetting_is_share: bool  # forgetting as a percentage (accuracy lost) or with three decimals (mAP lost)
    above_backbone: str  # what learns above the backbone; "{head}" becomes model.json's head layer
    new_part: dict[str, str]  # what learns for the new classes, by the expansion's block ("" for any other)
    split_boxes: bool  # the splits table counts boxes as well as images
    per_class: tuple[tuple[str, str, str], ...]  # (column title, per_class key, a CELLS name)
    train_column: str  # "train images", "train boxes"
    score_note: bool  # precision and recall are at metrics.json's score threshold "conf"
    expansion: tuple[tuple[str, str], ...]  # (expand_metrics.json key, label) of the expansion's cards
    figures: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]  # (anchor, title, ((png, alt), ...))


def write_report(run_dir: str | Path, spec: ReportSpec, out: str | Path | None = None) -> Path:
    """Write the report of the finished run in ``run_dir`` to ``out`` (default ``RUNDIR/report.html``),
    atomically. Raises ``GraftError`` naming the folder when it is not a finished run, or the file
    that could not be read or shown."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise GraftError(f"{run_dir} {what}; give a run folder written by graft train or graft expand")
    missing = [name for name in ("model.json", "metrics.json") if not (run_dir / name).is_file()]
    if missing:
        hint = (f"; it has not finished: continue it with graft train --resume {run_dir / 'snapshots' / 'last'}"
                if (run_dir / "snapshots").is_dir() else "; give a run folder written by graft train or graft expand")
        raise GraftError(f"{run_dir} is not a finished graft run (no {' or '.join(missing)}){hint}")
    page = render(run_dir, spec)
    return write_text(Path(out) if out else run_dir / REPORT_FILE, page)


def write_report_after_run(run_dir: str | Path, spec: ReportSpec) -> Path | None:
    """The end of a run: a report that cannot be written is a warning, never a failed run."""
    try:
        return write_report(run_dir, spec)
    except Exception as err:  # the model and metrics are written; losing the page must not lose the run
        print(f"warning: {Path(run_dir) / REPORT_FILE} was not written ({err}); try again with: graft report {run_dir}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- reading the run


class _Run:
    """The run folder's files, read once; a missing file is ``None``, an unreadable one an error naming it."""

    def __init__(self, run_dir: Path, spec: ReportSpec) -> None:
        self.dir, self.spec = run_dir, spec
        self.info = self.json("model.json")
        self.metrics = self.json("metrics.json")
        self.config = self.yaml("config.yaml") or self.info.get("config") or {}
        self.splits = self.json("splits.json")
        self.weights = self.json("weights_report.json")
        self.expand = self.json("expand_metrics.json")

    def _read(self, name: str, parse: Callable[[str], Any]) -> Any:
        path = self.dir / name
        if not path.is_file():
            return None
        try:
            data = parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
            raise GraftError(f"{path} cannot be read: {type(err).__name__}: {str(err)[:200]}") from None
        if not isinstance(data, dict):
            raise GraftError(f"{path} does not hold a mapping, as graft writes it: it was changed or is not graft's")
        return data

    def json(self, name: str) -> Any:
        return self._read(name, json.loads)

    def yaml(self, name: str) -> Any:
        return self._read(name, yaml.safe_load)

    def image(self, name: str) -> str | None:
        """``name`` as a data URI, or None when the run has no such plot."""
        path = self.dir / name
        if not path.is_file():
            return None
        data = path.read_bytes()
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise GraftError(f"{path} is not a PNG image: it was changed or is damaged (graft train writes it again)")
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ----------------------------------------------------------------------------- formatting


# ----------------------------------------------------------------------------- sections


def _headline(run: _Run) -> str:
    m = run.metrics
    share = run.spec.forgetting_is_share
    cards = "".join(figure(k, m.get(k), label, forgetting_is_share=share) for k, label in run.spec.headline)
    note = "" if m.get(run.spec.test_key) is not None else "<p class=note>No test split: test figures are n/a.</p>"
    return f"<div class=cards>{cards}</div>{note}"


def _learns(run: _Run, phase: dict) -> str:
    """What learned in a phase, in words, from its first trainable layer and the kind of run."""
    at = phase.get("trainable_from_layer")
    if run.expand is not None:
        block = (run.info.get("expanded_from") or [{}])[-1].get("block") or ""
        new = run.spec.new_part.get(block, run.spec.new_part[""])
        if at is None:
            return f"{new} only; the original model is frozen"
        return f"backbone layers {at} on and {new}, distilled towards the original"
    top = run.spec.above_backbone.format(head=(run.info.get("head") or {}).get("layer", "head"))
    return f"{top} only; the backbone is frozen" if at is None else f"backbone layers {at} on, and {top}"


def _trained(run: _Run) -> str:
    info, m, cfg = run.info, run.metrics, run.config
    data, model, solver, train = (cfg.get(k) or {} for k in ("data", "model", "solver", "train"))
    backbone = info.get("backbone", {})
    detector = info.get("detector") or {}
    classes = info.get("classes") or m.get("classes") or []
    layout = (info.get("data") or {}).get("description") or m.get("data_format") or (run.splits or {}).get("layout")
    decided = m.get("decided") or info.get("decided") or {}
    what = pairs([
        ("task", run.spec.task_title),
        ("model", f"{detector['head']} over {backbone.get('name')}" if detector.get("head") else backbone.get("name")),
        ("started from", backbone.get("weights")),
        ("data", data.get("dir") or (run.splits or {}).get("root")),
        ("data format", layout),
        (f"classes ({len(classes)})", name_list(classes)),
        ("input size", (info.get("preprocessing") or {}).get("input_size")),
        ("augmentation", data.get("augment")),
        ("auto decided", decided.get("note")),
        ("solver", f"{solver.get('type')}, base lr {solver.get('base_lr')}, {solver.get('lr_policy')} schedule, batch {solver.get('batch_size')}, seed {solver.get('seed')}" if solver else None),
        ("strategy", (info.get("trained") or {}).get("strategy") or train.get("strategy")),
        ("epochs", m.get("epochs")),
        ("training time", f"{m['train_seconds']:.1f} s" if isinstance(m.get("train_seconds"), (int, float)) else None),
    ])
    counts = m.get("counts") or (run.splits or {}).get("counts") or {}
    split_rows = []
    for split, per in counts.items():
        per = per or {}
        if run.spec.split_boxes:
            split_rows.append([(split, None), (str(per.get("images", 0)), None), (str(sum(v for k, v in per.items() if k != "images")), None)])
        else:
            split_rows.append([(split, None), (str(sum(per.values())), None)])
    splits = table([("split", "text"), ("images", "num")] + ([("boxes", "num")] if run.spec.split_boxes else []), split_rows) if split_rows else ""
    phases = (info.get("trained") or {}).get("phases") or []
    phase_table = table([("phase", "text"), ("epochs", "num"), ("what learned", "text"), ("learning rate", "num")],
                         [[(p.get("name"), None), (_epochs_run(p, m.get("early_stopping")), None), (_learns(run, p), None), (f"{p['lr']:.3g}" if isinstance(p.get("lr"), (int, float)) else "n/a", None)] for p in phases]) if phases else ""
    rules = [f"{r.get('pattern')}: lr_mult {r.get('lr_mult')}, decay_mult {r.get('decay_mult')}" for r in model.get("lr_mult") or []]
    extra = pairs([("frozen in every phase", ", ".join(model.get("freeze") or [])), ("learning-rate rules (first match wins)", "; ".join(rules)),
                    ("re-initialised", ", ".join(model.get("reinit") or [])), ("early stopping", _early(m.get("early_stopping"), phases))])
    return what + splits + phase_table + extra


def _epochs_run(phase: dict[str, Any], stops: Any) -> str:
    """A phase's epochs: as planned, or "5 of 6" where early stopping ended it sooner."""
    records = stops.get("phases") if isinstance(stops, dict) else None
    for r in records if isinstance(records, list) else []:
        if isinstance(r, dict) and r.get("phase") == phase.get("name") and r.get("epochs_run") is not None and r["epochs_run"] != phase.get("epochs"):
            return f"{r['epochs_run']} of {phase.get('epochs')}"
    return str(phase.get("epochs"))


def _early(stops: Any, phases: list[dict[str, Any]]) -> str | None:
    """``metrics.json``'s ``early_stopping`` ({monitor, patience, phases: [...]}) in words."""
    if not isinstance(stops, dict) or not isinstance(stops.get("phases"), list):
        return None
    from graft.engine.hooks import describe_stop

    planned = {p.get("name"): p.get("epochs") for p in phases}
    lines = [describe_stop(r, str(stops.get("monitor")), planned.get(r.get("phase"))).removeprefix("early stopping, ") for r in stops["phases"] if isinstance(r, dict)]
    return (f"patience {stops.get('patience')} on {stops.get('monitor')}: " + "; ".join(lines)) if lines else None


def _per_class(run: _Run) -> str:
    m = run.metrics
    per = m.get("per_class") or {}
    if not per:
        return ""
    counts = m.get("counts") or {}
    blocks = _blocks(run)
    head = [("class", "text")] + ([("block", "text")] if blocks else [])
    head += [(title, "num") for title, _, _ in run.spec.per_class] + [(run.spec.train_column, "num")]
    rows = []
    for name, c in per.items():
        row = [(name, name)] + ([(blocks.get(name, ""), blocks.get(name, ""))] if blocks else [])
        train = (counts.get("train") or {}).get(name)
        if blocks.get(name) == "old" and not train:  # an expansion trains only the new classes: "0" would read as "no data"
            train = "earlier run"
        row += [cell(c.get(key), CELLS[shown]) for _, key, shown in run.spec.per_class] + [cell(train, str)]
        rows.append(row)
    split = m.get("per_class_split")
    conf = f"; precision and recall at score {m['conf']}" if run.spec.score_note and m.get("conf") is not None else ""
    return f"<p class=note>On the {esc(split)} images{esc(conf)}. Click a column's title to sort by it.</p>" + table(head, rows, sortable=True)


def _blocks(run: _Run) -> dict[str, str]:
    """Class name -> "old" or "new" for an expanded run, else empty."""
    if run.expand is None:
        return {}
    return {**{c: "old" for c in run.expand.get("old_classes") or []}, **{c: "new" for c in run.expand.get("new_classes") or []}}


def _calibration(cal: dict) -> str | None:
    """What the calibration's guard measured, and how far that holds given its sample."""
    if cal.get("old_taken") is None:
        return None
    bound = f"; on new images up to {100 * cal['old_taken_bound']:.1f}% (95% bound)" if cal.get("old_taken_bound") is not None else ""
    return f"the new rows take {100 * cal['old_taken']:.1f}% of the {cal.get('old_samples')} old-class held-out samples the calibration was fitted on{bound}"


def _expansion(run: _Run) -> str:
    x = run.expand
    cards = "".join(figure(k, x.get(k), label, forgetting_is_share=run.spec.forgetting_is_share, prefix="expand.") for k, label in run.spec.expansion if k in x)
    source = x.get("source")
    where = x.get("split") or "; ".join(f"{who}: {x[k]}" for who, k in (("old", "old_split"), ("new", "new_split")) if x.get(k))
    about = pairs([("expanded from", source), ("mode", x.get("mode")), ("old classes", name_list(x.get("old_classes") or [])),
                    ("new classes", name_list(x.get("new_classes") or [])), ("measured on", where),
                    ("images measured", f"{x.get('old_images')} of old classes, {x.get('new_images')} of new" if "old_images" in x else None),
                    ("calibration", _calibration(x.get("calibration") or {}))])
    params = x.get("parameters") or {}
    param_table = table([("parameters", "text"), ("count", "num")], [[(k.replace("_", " "), None), (f"{v:,}", None)] for k, v in params.items()]) if params else ""
    before, after = x.get("per_class_before") or {}, x.get("per_class_after") or {}
    per = ""
    if after:
        per = "<h3>Per-class AP before and after</h3>" + table(
            [("class", "text"), ("block", "text"), ("AP before", "num"), ("AP after", "num"), ("AP@.5 before", "num"), ("AP@.5 after", "num")],
            [[(c, c), ("old", "old") if c in before else ("new", "new"), cell((before.get(c) or {}).get("ap")), cell(a.get("ap")),
              cell((before.get(c) or {}).get("ap50")), cell(a.get("ap50"))] for c, a in after.items()], sortable=True)
    note = f"<p class=note>{esc(x['note'])}</p>" if x.get("note") else ""
    return f"<div class=cards>{cards}</div>{note}{about}{param_table}{per}"


def _problems(run: _Run) -> str:
    m = run.metrics
    skipped = m.get("skipped_files") or []
    out = ""
    if skipped:
        out += f"<h3>Skipped files ({len(skipped)})</h3>" + table([("file", "text"), ("reason", "text")], [[(s.get("path"), None), (s.get("reason"), None)] for s in skipped])
    for key, title in (("annotation_problems", "Annotation problems"), ("warnings", "Warnings")):
        items = m.get(key) or []
        if items:
            out += f"<h3>{title} ({len(items)})</h3><ul>" + "".join(f"<li>{esc(p)}</li>" for p in items) + "</ul>"
    return out


def _weights(run: _Run) -> str:
    w = run.weights
    counts = w.get("counts") or {k: len(w.get(k) or []) for k in ("matched", "reinitialized", "skipped")}
    out = pairs([("weights from", w.get("source"))] + [(f"tensors {k}", v) for k, v in counts.items()])
    out += "".join(f"<p class=note>{esc(n)}</p>" for n in w.get("notes") or [])
    for key in ("matched", "reinitialized", "skipped"):
        names = w.get(key) or []
        if names:
            out += f"<details><summary>{esc(key)} ({len(names)})</summary><pre>" + esc("\n".join(map(str, names))) + "</pre></details>"
    return out


def render(run_dir: Path, spec: ReportSpec) -> str:
    """The page as a string; a section whose inputs are missing is left out."""
    run = _Run(run_dir, spec)
    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)

    def add(anchor: str, title: str, source: str, build: Callable[[], str]) -> None:
        try:
            body = build()
        except GraftError:
            raise
        except Exception as err:  # a file that does not hold what graft writes
            raise GraftError(f"{run_dir / source} cannot be shown in the report: {type(err).__name__}: {str(err)[:200]}") from None
        if body:
            sections.append((anchor, title, body))

    add("metrics", "Headline figures", "metrics.json", lambda: _headline(run))
    if run.expand is not None:
        add("expansion", "Old and new classes", "expand_metrics.json", lambda: _expansion(run))
    add("trained", "What was trained", "model.json", lambda: _trained(run))
    add("curves", "Learning curves", "learning_curves.png", lambda: img(run.image("learning_curves.png"), "learning curves"))
    add("per-class", "Per-class metrics", "metrics.json", lambda: _per_class(run))
    for anchor, title, plots in run.spec.figures:
        add(anchor, title, plots[0][0], lambda plots=plots: "".join(img(run.image(png), alt) for png, alt in plots))
    add("data-problems", "Skipped files and warnings", "metrics.json", lambda: _problems(run))
    if run.weights is not None:
        add("weights", "Weights report", "weights_report.json", lambda: _weights(run))

    title = f"graft run {run_dir.resolve().name}"
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime((run_dir / "metrics.json").stat().st_mtime))
    nav = " ".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{b}</section>' for a, t, b in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}</style></head>
<body><header><h1>{esc(title)}</h1><p class=note>{esc(run_dir.resolve())} &middot; finished {esc(written)} &middot; graft {esc(run.info.get("graft_version", "?"))}, report by graft {esc(__version__)}</p>
<nav>{nav}</nav></header><main>{body}</main><script>{JS}</script></body></html>
"""


