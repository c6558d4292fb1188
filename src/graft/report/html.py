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
from collections.abc import Callable, Iterable
from html import escape
from pathlib import Path
from typing import Any

import yaml

from graft.version import __version__
from graft.errors import GraftError
from graft.io import write_text

__all__ = ["REPORT_FILE", "write_report", "write_report_after_run", "format_metric"]

REPORT_FILE = "report.html"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
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
    page = render(run_dir)
    return write_text(Path(out) if out else run_dir / REPORT_FILE, page)


def write_report_after_run(run_dir: str | Path) -> Path | None:
    """The end of a run: a report that cannot be written is a warning, never a failed run."""
    try:
        return write_report(run_dir)
    except Exception as err:  # the model and metrics are written; losing the page must not lose the run
        print(f"warning: {Path(run_dir) / REPORT_FILE} was not written ({err}); try again with: graft report {run_dir}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- reading the run


class _Run:
    """The run folder's files, read once; a missing file is ``None``, an unreadable one an error naming it."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.info = self.json("model.json")
        self.metrics = self.json("metrics.json")
        self.config = self.yaml("config.yaml") or self.info.get("config") or {}
        self.splits = self.json("splits.json")
        self.weights = self.json("weights_report.json")
        self.expand = self.json("expand_metrics.json")
        self.detect = self.metrics.get("task") == "detect" or self.info.get("task") == "detect"

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


SHARES = ("old_taken_by_new", "new_taken_by_old", "old_predictions_kept", "old_detections_unchanged")


def format_metric(key: str, value: Any, *, detect: bool = False) -> str:
    """A figure as the page shows it: accuracies and shares as percentages (``93.9%``), mAP, AP
    and a detector's forgetting with three decimals (``0.766``); ``n/a`` when there is none."""
    if value is None:
        return "n/a"
    if "accuracy" in key or key in SHARES or (key == "forgetting" and not detect):
        return _pct(value)
    return f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _e(value: Any) -> str:
    return escape(str(value))


def _tag(name: str, body: str, **attrs: Any) -> str:
    attr = "".join(f' {k.rstrip("_").replace("_", "-")}="{_e(v)}"' for k, v in attrs.items() if v is not None)
    return f"<{name}{attr}>{body}</{name}>"


def _figure(key: str, value: Any, label: str, *, detect: bool, prefix: str = "") -> str:
    """A headline figure; ``data-metric`` names its key so a test can compare it with the JSON."""
    text = format_metric(key, value, detect=detect)
    return _tag("div", _tag("div", _e(label), class_="label") + _tag("div", _e(text), class_="value", data_metric=prefix + key), class_="card")


def _table(headers: list[tuple[str, str]], rows: Iterable[list[tuple[str, Any]]], *, sortable: bool = False) -> str:
    """``headers``: (title, "num" or "text"); each row's cells: (shown text, sort key or None)."""
    head = "".join(_tag("th", _e(title), data_type=kind, title="click to sort" if sortable else None) for title, kind in headers)
    kinds = [kind for _, kind in headers]
    body = "".join("<tr>" + "".join(_tag("td", _e(text), data_sort=key, class_="num" if kind == "num" else None) for (text, key), kind in zip(row, kinds)) + "</tr>" for row in rows)
    return _tag("table", f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>", class_="sortable" if sortable else None)


def _pairs(items: list[tuple[str, Any]]) -> str:
    """A definition list of the items whose value is not None."""
    return _tag("dl", "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items if v is not None and v != ""))


def _img(uri: str | None, alt: str) -> str:
    return "" if uri is None else f'<img src="{uri}" alt="{_e(alt)}">'


def _cell(value: Any, show: Callable[[Any], str] = lambda v: f"{v:.3f}") -> tuple[str, Any]:
    """A numeric table cell: its text, and the number it sorts by ("" for none: sorts first)."""
    return ("n/a", "") if value is None else (show(value), value)


def _names(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- sections


def _headline(run: _Run) -> str:
    m = run.metrics
    keys = ([("val_map", "val mAP"), ("val_map50", "val mAP@.5"), ("test_map", "test mAP"), ("test_map50", "test mAP@.5")]
            if run.detect else [("val_accuracy", "val accuracy"), ("test_accuracy", "test accuracy")])
    cards = "".join(_figure(k, m.get(k), label, detect=run.detect) for k, label in keys)
    note = "" if m.get("test_map" if run.detect else "test_accuracy") is not None else "<p class=note>No test split: test figures are n/a.</p>"
    return f"<div class=cards>{cards}</div>{note}"


def _learns(run: _Run, phase: dict) -> str:
    """What learned in a phase, in words, from its first trainable layer and the kind of run."""
    at = phase.get("trainable_from_layer")
    if run.expand is not None:
        block = "the new classes' detector (a copy of the neck and heads)" if (run.info.get("expanded_from") or [{}])[-1].get("block") == "branch" else "the new classes' block"
        new = block if run.detect else "the new classes' rows of the last layer"
        if at is None:
            return f"{new} only; the original model is frozen"
        return f"backbone layers {at} on and {new}, distilled towards the original"
    top = "the neck and heads" if run.detect else f"the head ({run.info.get('head', {}).get('layer', 'head')})"
    return f"{top} only; the backbone is frozen" if at is None else f"backbone layers {at} on, and {top}"


def _trained(run: _Run) -> str:
    info, m, cfg = run.info, run.metrics, run.config
    data, model, solver, train = (cfg.get(k) or {} for k in ("data", "model", "solver", "train"))
    backbone = info.get("backbone", {})
    detector = info.get("detector") or {}
    classes = info.get("classes") or m.get("classes") or []
    layout = (info.get("data") or {}).get("description") or m.get("data_format") or (run.splits or {}).get("layout")
    decided = m.get("decided") or info.get("decided") or {}
    what = _pairs([
        ("task", "object detection" if run.detect else "image classification"),
        ("model", f"{detector['head']} over {backbone.get('name')}" if detector.get("head") else backbone.get("name")),
        ("started from", backbone.get("weights")),
        ("data", data.get("dir") or (run.splits or {}).get("root")),
        ("data format", layout),
        (f"classes ({len(classes)})", _names(classes)),
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
        if run.detect:
            split_rows.append([(split, None), (str(per.get("images", 0)), None), (str(sum(v for k, v in per.items() if k != "images")), None)])
        else:
            split_rows.append([(split, None), (str(sum(per.values())), None)])
    splits = _table([("split", "text"), ("images", "num")] + ([("boxes", "num")] if run.detect else []), split_rows) if split_rows else ""
    phases = (info.get("trained") or {}).get("phases") or []
    phase_table = _table([("phase", "text"), ("epochs", "num"), ("what learned", "text"), ("learning rate", "num")],
                         [[(p.get("name"), None), (_epochs_run(p, m.get("early_stopping")), None), (_learns(run, p), None), (f"{p['lr']:.3g}" if isinstance(p.get("lr"), (int, float)) else "n/a", None)] for p in phases]) if phases else ""
    rules = [f"{r.get('pattern')}: lr_mult {r.get('lr_mult')}, decay_mult {r.get('decay_mult')}" for r in model.get("lr_mult") or []]
    extra = _pairs([("frozen in every phase", ", ".join(model.get("freeze") or [])), ("learning-rate rules (first match wins)", "; ".join(rules)),
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
    if run.detect:
        head += [("AP", "num"), ("AP@.5", "num"), ("precision", "num"), ("recall", "num"), ("boxes", "num"), ("train boxes", "num")]
    else:
        head += [("precision", "num"), ("recall", "num"), ("F1", "num"), ("support", "num"), ("train images", "num")]
    rows = []
    for name, c in per.items():
        row = [(name, name)] + ([(blocks.get(name, ""), blocks.get(name, ""))] if blocks else [])
        train = (counts.get("train") or {}).get(name)
        if blocks.get(name) == "old" and not train:  # an expansion trains only the new classes: "0" would read as "no data"
            train = "earlier run"
        if run.detect:
            row += [_cell(c.get("ap")), _cell(c.get("ap50")), _cell(c.get("precision")), _cell(c.get("recall")), _cell(c.get("boxes"), str), _cell(train, str)]
        else:
            row += [_cell(c.get("precision"), _pct), _cell(c.get("recall"), _pct), _cell(c.get("f1"), _pct), _cell(c.get("support"), str), _cell(train, str)]
        rows.append(row)
    split = m.get("per_class_split")
    conf = f"; precision and recall at score {m['conf']}" if run.detect and m.get("conf") is not None else ""
    return f"<p class=note>On the {_e(split)} images{_e(conf)}. Click a column's title to sort by it.</p>" + _table(head, rows, sortable=True)


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
    keys = ([("old_map_before", "old classes' mAP before"), ("old_map_after", "old classes' mAP after"), ("old_map50_before", "old mAP@.5 before"),
             ("old_map50_after", "old mAP@.5 after"), ("new_map", "new classes' mAP"), ("new_map50", "new mAP@.5"), ("new_map_new_images", "new mAP, new images alone"), ("overall_map", "overall mAP"),
             ("forgetting", "forgetting (mAP lost)"), ("old_detections_unchanged", "old detections unchanged")]
            if run.detect else
            [("old_accuracy_before", "old classes before"), ("old_accuracy_after", "old classes after"), ("new_accuracy", "new classes"),
             ("overall_accuracy", "overall"), ("forgetting", "forgetting (old accuracy lost)"), ("old_taken_by_new", "old images taken by new classes")])
    cards = "".join(_figure(k, x.get(k), label, detect=run.detect, prefix="expand.") for k, label in keys if k in x)
    source = x.get("source")
    where = x.get("split") or "; ".join(f"{who}: {x[k]}" for who, k in (("old", "old_split"), ("new", "new_split")) if x.get(k))
    about = _pairs([("expanded from", source), ("mode", x.get("mode")), ("old classes", _names(x.get("old_classes") or [])),
                    ("new classes", _names(x.get("new_classes") or [])), ("measured on", where),
                    ("images measured", f"{x.get('old_images')} of old classes, {x.get('new_images')} of new" if "old_images" in x else None),
                    ("calibration", _calibration(x.get("calibration") or {}))])
    params = x.get("parameters") or {}
    param_table = _table([("parameters", "text"), ("count", "num")], [[(k.replace("_", " "), None), (f"{v:,}", None)] for k, v in params.items()]) if params else ""
    before, after = x.get("per_class_before") or {}, x.get("per_class_after") or {}
    per = ""
    if after:
        per = "<h3>Per-class AP before and after</h3>" + _table(
            [("class", "text"), ("block", "text"), ("AP before", "num"), ("AP after", "num"), ("AP@.5 before", "num"), ("AP@.5 after", "num")],
            [[(c, c), ("old", "old") if c in before else ("new", "new"), _cell((before.get(c) or {}).get("ap")), _cell(a.get("ap")),
              _cell((before.get(c) or {}).get("ap50")), _cell(a.get("ap50"))] for c, a in after.items()], sortable=True)
    note = f"<p class=note>{_e(x['note'])}</p>" if x.get("note") else ""
    return f"<div class=cards>{cards}</div>{note}{about}{param_table}{per}"


def _problems(run: _Run) -> str:
    m = run.metrics
    skipped = m.get("skipped_files") or []
    out = ""
    if skipped:
        out += f"<h3>Skipped files ({len(skipped)})</h3>" + _table([("file", "text"), ("reason", "text")], [[(s.get("path"), None), (s.get("reason"), None)] for s in skipped])
    for key, title in (("annotation_problems", "Annotation problems"), ("warnings", "Warnings")):
        items = m.get(key) or []
        if items:
            out += f"<h3>{title} ({len(items)})</h3><ul>" + "".join(f"<li>{_e(p)}</li>" for p in items) + "</ul>"
    return out


def _weights(run: _Run) -> str:
    w = run.weights
    counts = w.get("counts") or {k: len(w.get(k) or []) for k in ("matched", "reinitialized", "skipped")}
    out = _pairs([("weights from", w.get("source"))] + [(f"tensors {k}", v) for k, v in counts.items()])
    out += "".join(f"<p class=note>{_e(n)}</p>" for n in w.get("notes") or [])
    for key in ("matched", "reinitialized", "skipped"):
        names = w.get(key) or []
        if names:
            out += f"<details><summary>{_e(key)} ({len(names)})</summary><pre>" + _e("\n".join(map(str, names))) + "</pre></details>"
    return out


def render(run_dir: Path) -> str:
    """The page as a string; a section whose inputs are missing is left out."""
    run = _Run(run_dir)
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
    add("curves", "Learning curves", "learning_curves.png", lambda: _img(run.image("learning_curves.png"), "learning curves"))
    add("per-class", "Per-class metrics", "metrics.json", lambda: _per_class(run))
    if run.detect:
        add("ap", "Per-class AP and precision-recall", "per_class_ap.png",
            lambda: _img(run.image("per_class_ap.png"), "per-class AP") + _img(run.image("pr_curves.png"), "precision-recall curves"))
        add("mistakes", "Detections, most mistakes first", "detections.png", lambda: _img(run.image("detections.png"), "detections, most mistakes first"))
    else:
        add("confusion", "Confusion matrix", "confusion_matrix.png", lambda: _img(run.image("confusion_matrix.png"), "confusion matrix"))
        add("mistakes", "Predictions, mistakes first", "predictions.png", lambda: _img(run.image("predictions.png"), "predictions, mistakes first"))
    add("data-problems", "Skipped files and warnings", "metrics.json", lambda: _problems(run))
    if run.weights is not None:
        add("weights", "Weights report", "weights_report.json", lambda: _weights(run))

    title = f"graft run {run_dir.resolve().name}"
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime((run_dir / "metrics.json").stat().st_mtime))
    nav = " ".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{b}</section>' for a, t, b in sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{CSS}</style></head>
<body><header><h1>{_e(title)}</h1><p class=note>{_e(run_dir.resolve())} &middot; finished {_e(written)} &middot; graft {_e(run.info.get("graft_version", "?"))}, report by graft {_e(__version__)}</p>
<nav>{nav}</nav></header><main>{body}</main><script>{JS}</script></body></html>
"""


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2327;background:#f6f7f9;line-height:1.45}
header{background:#fff;border-bottom:1px solid #dde1e6;padding:16px 28px}
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.2em;margin:0 0 12px}h3{font-size:1em;margin:18px 0 8px}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none;font-size:.92em}
main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:16px 20px;margin:16px 0}
.note{color:#5c6670;font-size:.9em;margin:4px 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:14px}
.card{border:1px solid #dde1e6;border-radius:6px;padding:10px 16px;min-width:130px;background:#fafbfc}
.card .label{font-size:.85em;color:#5c6670}.card .value{font-size:1.6em;font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:3px 18px;margin:0 0 14px}
dt{color:#5c6670}dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:6px 0 14px;font-size:.92em}
th,td{border-bottom:1px solid #e6e9ed;padding:4px 12px;text-align:left;overflow-wrap:anywhere}
th{background:#f0f2f5}td.num,th[data-type=num]{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e2e7ee}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
img{max-width:100%;height:auto;display:block;margin:6px 0}
pre{font-size:.82em;max-height:300px;overflow:auto;background:#f6f7f9;padding:8px}
"""

JS = """
for (const th of document.querySelectorAll("table.sortable th")) {
  th.tabIndex = 0;
  th.addEventListener("click", () => sortBy(th));
  th.addEventListener("keydown", (e) => { if (e.key === "Enter") sortBy(th); });
}
function sortBy(th) {
  const body = th.closest("table").tBodies[0], i = th.cellIndex, num = th.dataset.type === "num";
  const up = th.getAttribute("aria-sort") !== "ascending";
  for (const other of th.parentNode.children) other.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", up ? "ascending" : "descending");
  const key = (tr) => {
    const v = tr.cells[i].dataset.sort ?? tr.cells[i].textContent;
    return num ? (v === "" || isNaN(v) ? -Infinity : Number(v)) : v;
  };
  const rows = Array.from(body.rows).map((tr) => [key(tr), tr]);
  rows.sort((a, b) => (num ? (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0) : a[0].localeCompare(b[0])) * (up ? 1 : -1));
  for (const [, tr] of rows) body.appendChild(tr);
}
"""
