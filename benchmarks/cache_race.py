"""Shared-cache concurrency: N processes race to build the same embedding cache key.

    .venv/bin/python benchmarks/cache_race.py                    # 2, 4 and 8 processes
    .venv/bin/python benchmarks/cache_race.py --processes 8 --images 40

For each N, one process is SIGKILLed half way through writing the entry (holding its lock) and
N - 1 others run the same `graft train` on the same cache, while a reader thread reads every
entry over and over. Reported: partial entries the reader saw (must be 0), how many racers
computed the embeddings (1: the others waited on the lock and reused them), whether every racer's
final weights equal a run alone's bit for bit, temporary files left until the next start-up
sweep, and the wall time. Work folders are deleted unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cache_race_driver import race, start  # noqa: E402
from helpers import make_class_folders, tiny_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4, 8], help="processes per race, the killed writer included")
    parser.add_argument("--images", type=int, default=20, help="images per class (3 classes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache-race.txt")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graft-cache-race-"))
    lines = []
    try:
        data = make_class_folders(work / "data", per_class=args.images)
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump(tiny_config(data, data={"augment": "none"}, train={"head_lr": 0.01})))
        alone = start("run", work / "cache-alone", "train", "--config", config, "--out", work / "alone")
        assert alone.wait(600) == 0, alone.stderr.read()
        expected = load_file(str(work / "alone" / "model.safetensors"))
        for n in args.processes:
            folder = work / f"race-{n}"
            seen = race(folder, config, n - 1)
            equal = [all(torch.equal(load_file(str(r / "model.safetensors"))[k], v) for k, v in expected.items()) if code == 0 else False
                     for r, code in zip(seen["runs"], seen["exits"])]
            row = {"processes": n, "killed_mid_write": seen["killed_exit"] == -9, "racers_ok": sum(c == 0 for c in seen["exits"]),
                   "racers": n - 1, "computed_by": sum(1 for c in seen["computed"] if c), "reads": seen["reads"], "partial_reads": len(seen["partial"]),
                   "equal_to_alone": sum(equal), "temps_left_for_sweep": len(seen["temps_left"]), "wall_s": round(seen["seconds"], 1)}
            print(json.dumps(row), flush=True)
            lines.append(row)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    header = "processes killed_mid_write racers_ok/racers computed_by reads partial_reads equal_to_alone temps_left wall_s"
    table = [header] + [f"{r['processes']:>9} {str(r['killed_mid_write']):>16} {r['racers_ok']:>6}/{r['racers']:<6} {r['computed_by']:>11} {r['reads']:>5} {r['partial_reads']:>13} "
                        f"{r['equal_to_alone']:>14} {r['temps_left_for_sweep']:>10} {r['wall_s']:>6}" for r in lines]
    args.out.write_text("# benchmarks/cache_race.py " + " ".join(sys.argv[1:]) + "\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    ok = all(r["partial_reads"] == 0 and r["equal_to_alone"] == r["racers"] and r["killed_mid_write"] for r in lines)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
