"""``graft predict`` with a detector, a run's or an export's: one row per box as text, JSON or
CSV, and the drawn images. Imports no torch (an ONNX export predicts with onnxruntime alone).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from graft.console import plural
from graft.errors import GraftError



def print_predictions(run: Any, args: argparse.Namespace) -> int:
    """``graft predict`` with a detector (a run or an export): one row per box, in the image's own pixels."""
    from graft.prediction import draw, drawn_names

    found = run.predict(args.inputs, conf=args.conf, iou=args.iou, batch_size=min(args.batch_size, 8))
    if not found:
        raise GraftError(f"no image files found in {', '.join(args.inputs)}")
    rows = [(d.path, b) for d in found for b in d.boxes]
    if args.format == "json":
        print(json.dumps([{"path": d.path, "boxes": [{"label": b.label, "score": round(b.score, 6), "box": [round(v, 2) for v in (b.x1, b.y1, b.x2, b.y2)]} for b in d.boxes], "error": d.error} for d in found], indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "score", "x1", "y1", "x2", "y2", "error"])
        for d in found:
            if d.error or not d.boxes:  # a row for every input: "no boxes" is not "not processed"
                w.writerow([d.path, "", "", "", "", "", "", d.error or ""])
            for b in d.boxes:
                w.writerow([d.path, b.label, f"{b.score:.6f}", f"{b.x1:.2f}", f"{b.y1:.2f}", f"{b.x2:.2f}", f"{b.y2:.2f}", ""])
        sys.stdout.write(buf.getvalue())
    else:
        width = max(len(d.path) for d in found)
        for d in found:
            if d.error:
                print(f"{d.path:<{width}}  ERROR {d.error}")
            elif not d.boxes:
                print(f"{d.path:<{width}}  (no boxes)")
        for path, b in rows:
            print(f"{path:<{width}}  {b.label:<12} {b.score:.3f}  {b.x1:7.1f} {b.y1:7.1f} {b.x2:7.1f} {b.y2:7.1f}")
    if args.save_images:
        readable = [d for d in found if not d.error]
        for d, name in zip(readable, drawn_names([d.path for d in readable])):
            draw(d.path, d, run.classes, Path(args.save_images), name)
    failed = [d for d in found if d.error]
    if failed:
        print(f"error: {len(failed)} of {plural(len(found), 'file')} could not be read (e.g. {failed[0].error})", file=sys.stderr)
        return 2
    return 0
