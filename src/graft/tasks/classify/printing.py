"""``graft predict`` with a classifier, a run's or an export's: top-k classes per image as text,
JSON or CSV. Imports no torch (an ONNX export predicts with onnxruntime alone).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Any

from graft.console import plural
from graft.errors import GraftError



def print_predictions(run: Any, args: argparse.Namespace) -> int:
    """``graft predict`` with a classifier (a run or an export): top-k classes per image."""
    if args.conf is not None or args.iou is not None or args.save_images:
        raise GraftError(f"--conf, --iou and --save-images are for detectors; {args.run} is a classifier")
    preds = run.predict(args.inputs, top_k=args.top_k, batch_size=args.batch_size)
    if not preds:
        raise GraftError(f"no image files found in {', '.join(args.inputs)}")
    k = max(1, min(args.top_k, len(run.classes)))
    if args.format == "json":
        print(json.dumps([{"path": p.path, "predictions": [{"class": c, "probability": round(v, 6)} for c, v in p.top], "error": p.error} for p in preds], indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path"] + [f"{x}{i}" for i in range(1, k + 1) for x in ("class", "prob")] + ["error"])
        for p in preds:
            cells = [c for cv in p.top for c in (cv[0], f"{cv[1]:.6f}")]
            w.writerow([p.path] + cells + [""] * (2 * k - len(cells)) + [p.error or ""])
        sys.stdout.write(buf.getvalue())
    else:
        width = max(len(p.path) for p in preds)
        for p in preds:
            body = "ERROR " + p.error if p.error else "  ".join(f"{c} {100 * v:5.1f}%" for c, v in p.top)
            print(f"{p.path:<{width}}  {body}")
    failed = [p for p in preds if p.error]
    if failed:
        print(f"error: {len(failed)} of {plural(len(preds), 'file')} could not be read (e.g. {failed[0].error})", file=sys.stderr)
        return 2
    return 0
