"""Crash consistency: SIGKILL graft runs at every write point and at random times, then recover.

    .venv/bin/python benchmarks/crash.py                  # the full harness (over 100 kills) -> benchmarks/results/crash.txt
    .venv/bin/python benchmarks/crash.py --fast           # about 10 kills (tests/test_crash.py runs this)
    .venv/bin/python benchmarks/crash.py --scenarios classify export --random 1 --keep

Scenarios, each on a tiny random-init timm model and a few generated images (tests/helpers.py,
tests/box_data.py), on the CPU:

- ``classify``: ``graft train`` of a classifier, two-phase 2+2 epochs, auto decisions, the embedding
  cache, and a decoded-image budget small enough that a few images go to the disk cache;
- ``classify-overwrite``: the same command with ``--overwrite`` over a finished older run (another
  seed): its write points up to the new run's first snapshot (the old run moved aside, the first
  writes), where the old run's files are the "old versions";
- ``detect``: ``graft train`` of an FCOS detector, 2+2 epochs, auto augmentation (its trial), its
  frozen phase's backbone features spilled to the cache folder (``detect.cache_mb=0``);
- ``expand``: ``graft expand`` of the classifier run with a new class, 3 epochs, a snapshot each;
- ``export``: ``graft export`` of the classifier run, over an older export (other parity images).

Write points. Every file graft writes into a watched folder (the run folder, the export's folder,
the cache folder ``GRAFT_CACHE_DIR``, which each scenario has to itself) ends with ``os.replace``
of a complete temporary file (``graft.io.atomic_write``; the exporter renames its own). In the
process that runs graft, ``os.replace`` is wrapped: the N-th rename into a watched folder is
logged (its number, target and the SHA-256 of what is about to become the target) to a side file
outside the watched folders, flushed and fsynced, and at the chosen N the process sends itself
SIGKILL, either just *before* the rename (the new file complete, the target still old) or just
*after* it (before the folder is fsynced). Two uninterrupted runs must make the same writes and end
with the same final files (a nondeterministic run could not be judged); they count the write
points (with ``--fast``, one run); then each
N = 1 .. end is killed (``before``; ``after`` too for the scenarios in ``--after``: classify, expand
and export by default). Random-time kills (``--random`` per scenario): SIGKILL from the harness after
a seeded random delay within the time the uninterrupted run took to reach its last write.

After each kill, every file in the watched folders must be its version from before the command,
or one the log shows completely written (SHA-256), or a temporary (or feature spill) file of the
killed process; it
must parse (JSON, safetensors, snapshots with ``torch.load(weights_only=True)``, YAML, CSV, PNG,
``.npy``, ONNX, the report's closing tag). A folder that must not change (the expansion's source
run) must be byte for byte as before. Then the run is recovered as a user would:
``--resume RUNDIR/snapshots/last`` when it exists (else the newest numbered snapshot, said so),
or, killed before any snapshot, the same command again (with ``--overwrite`` only if the plain
command refuses); an export is run again. The recovered run must exit 0, leave no temporary or
spill file in the run folder or the cache, have files that parse, the uninterrupted run's final
``model.safetensors`` bit for bit (every tensor) and its ``history.csv`` (times aside); an
export's ``model.onnx`` must be byte-identical to an uninterrupted export and its sidecar equal
(creation time aside).

Every graft command runs in a child forked from this process, which imports torch and graft once
and runs no torch computation itself (so the children start in milliseconds, not seconds), each
with one torch thread (``--threads``). The work folder is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import work_folder  # benchmarks/work_folder.py, beside this script
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the suite's small-data helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = ROOT / "benchmarks" / "results" / "crash.txt"
THREADS = 1  # torch threads per graft process (--threads): a small machine shared with other work
SCENARIOS = ("classify", "classify-overwrite", "detect", "expand", "export")
# atomic_write's .NAME.PID-RANDOM.tmp; the exporter's own .NAME.PID.tmp
TEMP_NAME = re.compile(r"^\..+\.(\d+)(-[^.]+)?\.tmp$")
LOCK_SUFFIX = ".lock"  # filelock's lock files in the cache: empty, created in place
SPILL_NAME = re.compile(r"^graft-det-features-(\d+)-.*\.f16$")  # a detector's features spilled to the cache while it runs

TINY_CLASSIFY = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "32", "--batch-size", "8", "--epochs", "2", "--fine-tune-epochs", "2",
                 "--device", "cpu", "--set", "data.num_workers=0", "--set", "data.decode_cache_mb=0.05", "--quiet"]
TINY_DETECT = ["--model", "fcos", "--set", "model.name=test_efficientnet", "--weights", "none", "--img-size", "64", "--batch-size", "4", "--epochs", "2",
               "--fine-tune-epochs", "2", "--device", "cpu", "--set", "data.num_workers=0", "--set", "detect.cache_mb=0", "--quiet"]  # features spill to the cache folder


# ------------------------------------------------------------------ in the child: the write probe


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _real(path: str | os.PathLike) -> str:
    """The absolute path with its folder's symlinks resolved (the file itself may not exist yet)."""
    p = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def _versions(src: str, dst: str) -> list[list[str]]:
    """What a rename of ``src`` to ``dst`` puts in place: one file, or a folder's files (the
    ``--overwrite`` stash moves ``snapshots/`` whole)."""
    if os.path.isdir(src):
        return [[os.path.join(dst, os.path.relpath(os.path.join(d, n), src)), sha256(os.path.join(d, n))] for d, _, names in os.walk(src) for n in names]
    return [[dst, sha256(src)]] if os.path.isfile(src) else []


def install_probe(log_path: Path, roots: list[Path], kill_at: int | None, mode: str) -> None:
    """Wrap ``os.replace``: count and log renames into ``roots``; SIGKILL at the ``kill_at``-th."""
    real_replace = os.replace
    watched = [os.path.realpath(r) for r in roots]
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (for the process's life)
    count = 0
    started = time.monotonic()

    def replace(src, dst, *args, **kwargs):
        nonlocal count
        target = _real(dst)
        if not any(target == r or target.startswith(r + os.sep) for r in watched):
            return real_replace(src, dst, *args, **kwargs)
        count += 1
        kill = count == kill_at
        record = {"n": count, "target": target, "versions": _versions(os.fspath(src), target), "kill": mode if kill else None, "t": round(time.monotonic() - started, 4)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())
        if kill and mode == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real_replace(src, dst, *args, **kwargs)
        if kill and mode == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    os.replace = replace


def fork_graft(argv: list[str], *, env: dict[str, str], log_path: Path, console: Path, roots: list[Path], kill_at: int | None = None, mode: str = "before") -> int:
    """``graft ARGV`` in a forked child (probe installed); returns its process id."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 97
    try:
        fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.update(env)
        import torch

        torch.set_num_threads(THREADS)  # the uninterrupted runs and the resumes alike
        install_probe(log_path, roots, kill_at, mode)
        from graft.cli import main as graft_main

        code = graft_main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 (the child reports any failure through its exit status)
        traceback.print_exc()
        code = 98
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def wait(pid: int, *, kill_after: float | None = None, limit: float = 600.0) -> tuple[str, int, float]:
    """Wait for the child (SIGKILL it at ``kill_after`` seconds, or when over ``limit``):
    ("killed", signal, seconds), ("exit", status, seconds) or ("hung", 0, seconds)."""
    start = time.monotonic()
    sent = hung = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        elapsed = time.monotonic() - start
        if kill_after is not None and not sent and elapsed >= kill_after:
            os.kill(pid, signal.SIGKILL)
            sent = True
            continue
        if elapsed > limit and not hung:
            os.kill(pid, signal.SIGKILL)
            hung = True
        time.sleep(min(0.005, max(0.0, kill_after - elapsed)) if kill_after is not None and not sent else 0.005)
    seconds = time.monotonic() - start
    if hung:
        return "hung", 0, seconds
    if os.WIFSIGNALED(status):
        return "killed", os.WTERMSIG(status), seconds
    return "exit", os.WEXITSTATUS(status), seconds


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # never expected: lines are written whole and fsynced
            rows.append({"n": -1, "target": "?", "versions": [], "kill": None, "torn_log_line": line})
    return rows


# ------------------------------------------------------------------ checks (in the harness process)


def files_under(roots: list[Path]) -> list[Path]:
    out = []
    for root in roots:
        if root.is_dir():
            for d, _, names in os.walk(root):
                out += [Path(d) / n for n in names]
    return sorted(out)


def manifest(roots: list[Path]) -> dict[str, str]:
    return {str(p): sha256(p) for p in files_under(roots)}


def relative_manifest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in files_under([folder])}


def is_temp(path: Path) -> bool:
    return TEMP_NAME.match(path.name) is not None


def scratch_owner(path: Path) -> int | None:
    """The process id of a file a killed process may leave (a temporary file, a detector's spill
    file), or None for any other file."""
    m = TEMP_NAME.match(path.name) or SPILL_NAME.match(path.name)
    return int(m.group(1)) if m else None


def is_lock(path: Path) -> bool:
    return path.name.endswith(LOCK_SUFFIX) and path.stat().st_size == 0


def parse_problem(path: Path) -> str | None:
    """Why ``path`` does not parse as what its name says, or None."""
    name = path.name
    try:
        if path.parent.name == "snapshots":
            import torch

            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or "format" not in payload:
                return "a snapshot without its format key"
        elif name.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    f.get_tensor(key)
        elif name.endswith((".yaml", ".yml")):
            import yaml

            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif name.endswith(".csv"):
            rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
            if not rows or len({len(r) for r in rows}) != 1:
                return "a CSV with no rows or ragged rows"
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
        elif name.endswith(".npy"):
            import numpy as np

            np.load(path)
        elif name.endswith(".onnx"):
            import onnx

            onnx.load(str(path))
        elif name.endswith(".html") and not path.read_text(encoding="utf-8").rstrip().endswith("</html>"):
            return "an HTML page without its closing tag"
    except Exception as err:  # noqa: BLE001 (any failure to parse is the finding)
        return f"{type(err).__name__}: {str(err)[:160]}"
    return None


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a safetensors file as (dtype, shape, raw bytes), read from the format itself."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    return {k: (v["dtype"], tuple(v["shape"]), body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items() if k != "__metadata__"}


def history_rows(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def final_state(kind: str, out: Path) -> Any:
    """What a finished command must reproduce: every tensor of model.safetensors, or the export."""
    if kind == "export":
        return sha256(out / "export" / "model.onnx"), sidecar_without_time(out / "export" / "model.onnx.json")
    return tensors(out / "model.safetensors")


def sidecar_without_time(path: Path) -> Any:
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.pop("created", None)
    return meta


# ------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    name: str
    kind: str  # train | expand | export
    argv: list[str]
    out: Path  # the folder the command writes (an export: the run folder, which holds export/)
    cache: Path
    pre: Path | None = None  # what ``out`` holds before the command (None: nothing)
    frozen: list[Path] = field(default_factory=list)  # folders that must not change (the expansion's source)
    kill_until: str | None = None  # kill only up to this write (a name pattern), inclusive: classify-overwrite
    keeps_old: bool = False  # the run in ``pre`` must survive a kill whole (in place, or being moved aside in .replacing/, or in .replaced/): --overwrite
    # from the uninterrupted run
    writes: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    reference: Path | None = None

    @property
    def roots(self) -> list[Path]:
        return [self.out, self.cache, *self.frozen]

    def env(self) -> dict[str, str]:
        return {"GRAFT_CACHE_DIR": str(self.cache), "HF_HUB_OFFLINE": "1"}

    def label(self, target: str) -> str:
        """A write's target as the results name it: relative to the run folder, or CACHE/..."""
        for root, prefix in ((self.cache, "CACHE/"), (self.out, ""), *((f, f"{f.name}/") for f in self.frozen)):
            r = os.path.realpath(root)
            if target == r or target.startswith(r + os.sep):
                rel = os.path.relpath(target, r)
                if prefix == "CACHE/":
                    rel = re.sub(r"/[0-9a-f]{2}/", "/", rel)
                    rel = re.sub(r"[0-9a-f]{16,}[^./]*", "<key>", rel)
                return prefix + rel
        return target

    def prepare(self) -> None:
        """The state before the command: ``out`` as ``pre`` (or absent), an empty cache."""
        for folder in (self.out, self.cache):
            shutil.rmtree(folder, ignore_errors=True)
        if self.pre is not None:
            shutil.copytree(self.pre, self.out, symlinks=True)
        self.cache.mkdir(parents=True)


class Harness:
    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.counter = 0
        self.records: list[dict] = []
        self.scenarios: dict[str, Scenario] = {}
        self.graft_path = ""
        self.finished_first = 0  # random delays that outlasted the run

    # ---------------------------------------------------------------- running graft

    def graft(self, s: Scenario, argv: list[str], *, kill_at: int | None = None, mode: str = "before", kill_after: float | None = None, limit: float | None = None) -> dict:
        self.counter += 1
        log, console = self.logs / f"{self.counter:04d}.writes.jsonl", self.logs / f"{self.counter:04d}.console.txt"
        pid = fork_graft(argv, env=s.env(), log_path=log, console=console, roots=s.roots, kill_at=kill_at, mode=mode)
        how, code, seconds = wait(pid, kill_after=kill_after, limit=limit or max(120.0, 20 * s.seconds))
        return {"pid": pid, "how": how, "code": code, "seconds": seconds, "log": read_log(log), "console": console.read_text(errors="replace")}

    def uninterrupted(self, s: Scenario, twice: bool = True) -> None:
        """Run the command twice without a kill: both runs must make the same writes in the same
        order and the same final model (else no kill could be judged); the second counts the
        write points, times the run (the first also loads the libraries' pages from disk) and is
        kept as the reference. Once only (``twice`` false) for a starting state or with --fast."""
        runs = []
        for _ in range(2 if twice else 1):
            s.prepare()
            done = self.graft(s, s.argv, limit=900)
            if done["how"] != "exit" or done["code"] != 0:
                raise SystemExit(f"{s.name}: the uninterrupted run failed ({done['how']} {done['code']}):\n{done['console'][-3000:]}")
            runs.append((done, final_state(s.kind, s.out)))
        (first, first_final), (second, second_final) = runs if twice else runs * 2
        if twice and [s.label(w["target"]) for w in first["log"]] != [s.label(w["target"]) for w in second["log"]]:
            raise SystemExit(f"{s.name}: two uninterrupted runs wrote different files or in another order")
        if twice and first_final != second_final:
            raise SystemExit(f"{s.name}: two uninterrupted runs ended with different final files: resumes cannot be compared with either")
        s.writes, s.seconds = second["log"], second["seconds"]
        s.reference = self.work / "reference" / s.name
        shutil.rmtree(s.reference, ignore_errors=True)
        shutil.copytree(s.out, s.reference, symlinks=True)
        self.scenarios[s.name] = s
        times = f"{first['seconds']:.1f}s and {s.seconds:.1f}s" if twice else f"{s.seconds:.1f}s"
        print(f"{s.name}: uninterrupted in {times}, {len(s.writes)} write points" + (", the same writes and final files" if twice else ""), flush=True)

    # ---------------------------------------------------------------- one kill

    def kill(self, s: Scenario, *, at: int | None = None, mode: str = "before", delay: float | None = None) -> dict:
        s.prepare()
        before = manifest(s.roots)
        run = self.graft(s, s.argv, kill_at=at, mode=mode, kill_after=delay)
        rec: dict[str, Any] = {"scenario": s.name, "at": at, "mode": mode if at else "random", "delay": delay, "problems": [], "notes": []}
        log = run["log"]
        rec["writes_reached"] = len(log)  # writes that began their rename (a random kill may land between the log line and the rename)
        if at is not None:
            rec["target"] = s.label(s.writes[at - 1]["target"])
        if run["how"] != "killed" or run["code"] != signal.SIGKILL:
            if delay is not None and run["how"] == "exit" and run["code"] == 0:
                rec["finished_first"] = True  # the random delay outlasted the run: no kill, counted nowhere
                return rec
            rec["problems"].append(f"the run was not killed as planned: {run['how']} {run['code']}; {run['console'][-400:]}")
        elif at is not None:
            got = s.label(log[-1]["target"]) if log else None
            if not log or log[-1]["n"] != at or got != rec["target"]:
                rec["problems"].append(f"the write sequence differs from the uninterrupted run's: write {at} is {got}, not {rec['target']}")
        rec["temps_after_kill"] = self.check_after_kill(s, before, log, run["pid"], rec)
        self.recover(s, rec, before)
        rec["survived"] = not rec["problems"]
        self.records.append(rec)
        where = f"write {at} ({rec['target']}, {mode})" if at else f"random {delay:.2f}s ({rec['writes_reached']} writes reached)"
        status = "ok" if rec["survived"] else "FAILED: " + "; ".join(rec["problems"])
        print(f"{s.name}: kill at {where}: {rec['recovery']}: {status}", flush=True)
        return rec

    def random_kills(self, s: Scenario, k: int, low: float, high: float) -> None:
        """``k`` kills after a random share in [low, high) of the time the uninterrupted run took to
        begin its last write (a run that finishes first, faster than the uninterrupted one was, is
        not counted: another, shorter draw)."""
        done = 0
        span = s.writes[-1]["t"] if s.writes else s.seconds  # when the uninterrupted run began its last write
        shrink = 1.0
        for _ in range(3 * k):
            if done == k:
                break
            rec = self.kill(s, delay=self.rng.uniform(low, high) * span * shrink)
            if rec.get("finished_first"):
                print(f"{s.name}: the run finished before the random kill at {rec['delay']:.2f}s; drawing again", flush=True)
                self.finished_first += 1
                shrink *= 0.7  # this machine runs it faster now than it did uninterrupted
            else:
                done += 1

    def check_after_kill(self, s: Scenario, before: dict[str, str], log: list[dict], pid: int, rec: dict) -> list[str]:
        written: dict[str, set[str]] = {}
        for w in log:
            for path, digest in w["versions"]:
                written.setdefault(path, set()).add(digest)
        temps = []
        for path in files_under([s.out, s.cache]):
            rel = s.label(_real(path))
            owner = scratch_owner(path)
            if owner is not None:
                temps.append(rel)
                if owner != pid:
                    rec["problems"].append(f"after the kill: {rel} is a temporary file of process {owner}, not of the killed one ({pid})")
                continue
            if is_lock(path):
                continue
            digest = sha256(path)
            key = _real(path)
            if digest != before.get(str(path)) and digest not in written.get(key, ()):
                rec["problems"].append(f"after the kill: {rel} is neither its old version nor a completely written new one")
                continue
            why = parse_problem(path)
            if why:
                rec["problems"].append(f"after the kill: {rel} does not parse: {why}")
        if s.keeps_old and s.pre is not None:
            for path, digest in before.items():
                rel = os.path.relpath(path, s.out)
                if rel.startswith(".."):
                    continue
                if not any(p.is_file() and sha256(p) == digest for p in (s.out / rel, s.out / ".replacing" / rel, s.out / ".replaced" / rel)):
                    rec["problems"].append(f"after the kill: the replaced run's {rel} is lost (neither in place nor in .replacing/ or .replaced/)")
        for folder in s.frozen:
            now = manifest([folder])
            was = {k: v for k, v in before.items() if k.startswith(str(folder) + os.sep)}
            if now != was:
                rec["problems"].append(f"after the kill: {folder.name}, which the command only reads, changed")
        return temps

    # ---------------------------------------------------------------- recovery

    def recover(self, s: Scenario, rec: dict, before: dict[str, str]) -> None:
        """As a user would: resume from this command's snapshots/last, else from its newest
        numbered snapshot, else (killed before its first snapshot) run the command again. A
        snapshot still there from the run that --overwrite replaces is not this command's."""
        snaps = s.out / "snapshots"
        mine = [p for p in sorted(snaps.iterdir()) if not is_temp(p) and before.get(str(p)) != sha256(p)] if snaps.is_dir() else []
        numbered = [p for p in mine if p.name[-4:].isdigit()]
        if s.kind == "export":
            argv, how = s.argv, "export again"
        elif snaps / "last" in mine:
            argv, how = [s.kind, "--resume", str(snaps / "last"), "--quiet"], "resume last"
        elif numbered:
            argv, how = [s.kind, "--resume", str(numbered[-1]), "--quiet"], f"resume {numbered[-1].name} (no snapshots/last)"
        else:
            argv, how = s.argv, "run again"
        done = self.graft(s, argv)
        if how == "run again" and done["how"] == "exit" and done["code"] == 2 and "--overwrite" not in argv:
            refusal = [line for line in done["console"].splitlines() if line.startswith("error:")]
            rec["notes"].append(f"the plain re-run refused: {refusal[-1][:200] if refusal else done['console'][-200:]}")
            argv, how = [*argv, "--overwrite"], "run again with --overwrite"
            done = self.graft(s, argv)
        rec["recovery"] = how
        if done["how"] != "exit" or done["code"] != 0:
            rec["problems"].append(f"recovery ({how}) failed: {done['how']} {done['code']}: {done['console'][-600:]}")
            return
        self.check_recovered(s, rec)

    def check_recovered(self, s: Scenario, rec: dict) -> None:
        ref = s.reference
        left = [s.label(_real(p)) for p in files_under([s.out, s.cache]) if scratch_owner(p) is not None]
        if left:
            rec["problems"].append(f"temporary (or spill) files left after recovery: {', '.join(left)}")
        for path in files_under([s.out]):
            if not is_temp(path) and (why := parse_problem(path)):
                rec["problems"].append(f"after recovery: {s.label(_real(path))} does not parse: {why}")
        if s.kind == "export":
            for name in ("model.onnx",):
                if sha256(s.out / "export" / name) != sha256(ref / "export" / name):
                    rec["problems"].append(f"export/{name} differs from the uninterrupted export's")
            if sidecar_without_time(s.out / "export" / "model.onnx.json") != sidecar_without_time(ref / "export" / "model.onnx.json"):
                rec["problems"].append("export/model.onnx.json differs from the uninterrupted export's (creation time aside)")
        else:
            final, expected = s.out / "model.safetensors", ref / "model.safetensors"
            if not final.is_file():
                rec["problems"].append("after recovery: no model.safetensors")
            else:
                a, b = tensors(final), tensors(expected)
                diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                if diff:
                    rec["problems"].append(f"final weights differ from the uninterrupted run's: {len(diff)} of {len(b)} tensors, e.g. {diff[:3]}")
            if (s.out / "history.csv").is_file() and history_rows(s.out / "history.csv") != history_rows(ref / "history.csv"):
                rec["problems"].append("history.csv differs from the uninterrupted run's (times aside)")
        names = {str(p.relative_to(s.out)) for p in files_under([s.out]) if not is_temp(p)}
        want = {str(p.relative_to(ref)) for p in files_under([ref])}
        if names != want:
            rec["notes"].append(f"files differ from the uninterrupted run's: extra {sorted(names - want)}, missing {sorted(want - names)}")
        for folder in s.frozen:
            if relative_manifest(folder) != relative_manifest(self.work / "frozen-copy" / folder.name):
                rec["problems"].append(f"after recovery: {folder.name}, which the command only reads, changed")


# ------------------------------------------------------------------ set-up


def make_data(work: Path) -> dict[str, Path]:
    from box_data import three_splits, write_yolo
    from helpers import make_class_folders

    data = work / "data"
    return {
        "colours": make_class_folders(data / "colours", per_class=6),
        "new": make_class_folders(data / "new", per_class=6, classes={"yellow": (220, 220, 40)}, seed=1),
        "boxes": write_yolo(data / "boxes", three_splits(n_train=8, n_val=3, n_test=3)),
    }


def build(h: Harness, names: list[str], twice: bool = True) -> list[Scenario]:
    """The scenarios in ``names`` (and the ones they start from), each run uninterrupted (twice,
    to check that it is deterministic, unless ``twice`` is false)."""
    w, data = h.work, make_data(h.work)
    made: dict[str, Scenario] = {}

    def cache(name: str) -> Path:
        return w / "caches" / name

    need_classify = bool({"classify", "expand", "export"} & set(names))
    if need_classify:
        s = Scenario("classify", "train", ["train", "--data", str(data["colours"]), "--out", str(w / "runs" / "classify"), *TINY_CLASSIFY], w / "runs" / "classify", cache("classify"))
        h.uninterrupted(s, twice)
        made["classify"] = s
        source = w / "frozen" / "classify"  # the finished run that expand and export start from
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(s.reference, source, symlinks=True)
        shutil.rmtree(w / "frozen-copy", ignore_errors=True)
        shutil.copytree(source, w / "frozen-copy" / "classify", symlinks=True)  # to tell that nothing changed it
    if "classify-overwrite" in names:
        old = Scenario("old", "train", ["train", "--data", str(data["colours"]), "--out", str(w / "runs" / "old"), *TINY_CLASSIFY, "--seed", "1", "--epochs", "1", "--fine-tune-epochs", "1"], w / "runs" / "old", cache("old"))
        h.uninterrupted(old, twice=False)
        out = w / "runs" / "classify-overwrite"
        s = Scenario("classify-overwrite", "train", ["train", "--data", str(data["colours"]), "--out", str(out), *TINY_CLASSIFY, "--overwrite"], out, cache("classify-overwrite"), pre=old.reference, kill_until="snapshots/epoch-0001", keeps_old=True)
        h.uninterrupted(s, twice)
        made[s.name] = s
    if "detect" in names:
        out = w / "runs" / "detect"
        s = Scenario("detect", "train", ["train", "--data", str(data["boxes"]), "--out", str(out), *TINY_DETECT], out, cache("detect"))
        h.uninterrupted(s, twice)
        made[s.name] = s
    if "expand" in names:
        out = w / "runs" / "expand"
        s = Scenario("expand", "expand", ["expand", str(source), "--data", str(data["new"]), "--out", str(out), "--epochs", "3", "--set", "solver.snapshot=1", "--device", "cpu", "--quiet"],
                     out, cache("expand"), frozen=[source])
        h.uninterrupted(s, twice)
        made[s.name] = s
    if "export" in names:
        pre = w / "pre" / "export"  # the run with an older export: other parity images, so its sidecar differs
        old = Scenario("old-export", "export", ["export", str(w / "runs" / "export"), "--parity-images", "2", "--quiet"], w / "runs" / "export", cache("export"), pre=source)
        h.uninterrupted(old, twice=False)
        shutil.rmtree(pre, ignore_errors=True)
        shutil.copytree(old.reference, pre, symlinks=True)
        s = Scenario("export", "export", ["export", str(w / "runs" / "export"), "--quiet"], w / "runs" / "export", cache("export"), pre=pre)
        h.uninterrupted(s, twice)
        made[s.name] = s
    return [made[n] for n in names if n in made]


def kill_points(s: Scenario) -> list[int]:
    last = len(s.writes)
    if s.kill_until:
        last = next((w["n"] for w in s.writes if s.label(w["target"]) == s.kill_until), last)
    return list(range(1, last + 1))


FAST = {  # the suite's subset: (scenario, first write whose name matches, mode)
    "classify": [("CACHE/embeddings/", "before"), ("snapshots/epoch-0001", "after"), ("snapshots/last", "before"), ("model.safetensors", "before"), ("report.html", "after")],
    "export": [("export/model.onnx.json", "before"), ("export/model.onnx", "before")],
    "expand": [("snapshots/epoch-0002", "before")],
    "detect": [("snapshots/epoch-0003", "before")],
}


def fast_points(s: Scenario) -> list[tuple[int, str]]:
    out = []
    for pattern, mode in FAST.get(s.name, []):
        n = next((w["n"] for w in s.writes if s.label(w["target"]).startswith(pattern) and (pattern.endswith("/") or s.label(w["target"]) == pattern)), None)
        if n is None:
            raise SystemExit(f"{s.name}: no write to {pattern} in the uninterrupted run")
        out.append((n, mode))
    return out


# ------------------------------------------------------------------ results


def kill_place(r: dict) -> str:
    return f"write {r['at']} ({r['target']}) {r['mode']}" if r["at"] else f"random {r['delay']:.2f}s"


def summarise(h: Harness, args: argparse.Namespace, seconds: float) -> str:
    lines = [
        "# benchmarks/crash.py: SIGKILL at write points and at random times, then recovery",
        f"# command: python benchmarks/crash.py {' '.join(args.argv)}".rstrip(),
        f"# seed {args.seed}; wall time {seconds:.0f} s; {os.cpu_count()} CPUs; torch threads per run {THREADS}; graft from {h.graft_path}; WORK is the harness's temporary work folder",
        "",
    ]
    total = [r for r in h.records]
    survived = sum(r["survived"] for r in total)
    lines.append(f"kills survived: {survived} of {len(total)}")
    lines.append("")
    lines.append("| scenario | write points | kills before the rename | kills after the rename | random-time kills | survived | recoveries |")
    lines.append("|---|---|---|---|---|---|---|")
    for s in h.scenarios.values():
        rs = [r for r in total if r["scenario"] == s.name]
        if not rs:
            continue
        by_mode = Counter(r["mode"] for r in rs)
        rec = Counter(r["recovery"] for r in rs)
        lines.append(f"| {s.name} | {len(s.writes)} | {by_mode['before']} | {by_mode['after']} | {by_mode['random']} | {sum(r['survived'] for r in rs)} of {len(rs)} | "
                     + "; ".join(f"{k} {v}" for k, v in sorted(rec.items())) + " |")
    lines.append("")
    lines.append("## Write points (uninterrupted runs; N: file, and the kills at it)")
    for s in h.scenarios.values():
        rs = [r for r in total if r["scenario"] == s.name and r["at"]]
        if not rs and not s.writes:
            continue
        kinds = Counter(re.sub(r"\d{4}", "NNNN", s.label(w["target"])) for w in s.writes)
        lines.append(f"\n{s.name}: {s.seconds:.1f} s uninterrupted; `{' '.join(s.argv)}`")
        lines.append("  files: " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
        for w in s.writes:
            kills = [r for r in rs if r["at"] == w["n"]]
            marks = ", ".join(f"{r['mode']}: {'ok' if r['survived'] else 'FAILED'} ({r['recovery']})" for r in kills)
            lines.append(f"  {w['n']:3d} {s.label(w['target'])}" + (f"  [{marks}]" if marks else "  [not killed]"))
    randoms = [r for r in total if r["mode"] == "random"]
    if randoms:
        lines.append("\n## Random-time kills (delay after the fork, drawn within the time the uninterrupted run took to reach its last write;")
        lines.append(f"## writes reached before the kill; {h.finished_first} draws that outlasted the run were drawn again and are not counted)")
        for r in randoms:
            n = len(h.scenarios[r["scenario"]].writes)
            lines.append(f"  {r['scenario']}: {r['delay']:.2f} s, {r['writes_reached']} of {n} writes reached: {'ok' if r['survived'] else 'FAILED'} ({r['recovery']})")
    problems = [r for r in total if r["problems"]]
    lines.append("\n## Problems")
    lines += [f"  {r['scenario']} {kill_place(r)}: {p}" for r in problems for p in r["problems"]] or ["  none"]
    notes = Counter(n for r in total for n in r["notes"])
    lines.append("\n## Notes (not failures)")
    lines += [f"  {v}x {k}" for k, v in notes.items()] or ["  none"]
    temps = Counter(t for r in total for t in r.get("temps_after_kill", []))
    lines.append(f"\ntemporary and spill files found right after kills (expected; the recovery must remove them): {sum(temps.values())}")
    return ("\n".join(lines) + "\n").replace(str(h.work), "WORK")


# ------------------------------------------------------------------ main


def preload() -> None:
    """Import here, once, every module the children use (graft's own, torch, torchvision, timm,
    matplotlib, onnx; not onnxruntime, which starts a thread): each forked child then starts at
    once. Nothing here computes with torch."""
    import importlib
    import pkgutil

    import graft

    for mod in pkgutil.walk_packages(graft.__path__, "graft."):
        if mod.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(mod.name)
        except Exception:  # noqa: BLE001, S110 (an optional extra that is not installed: the child would fail the same way)
            pass
    for name in ("matplotlib.pyplot", "onnx", "torchvision", "timm", "safetensors.torch", "yaml", "PIL.Image"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=None, help="default: all (with --fast: classify, export, expand, detect)")
    parser.add_argument("--after", nargs="*", choices=SCENARIOS, default=["classify", "expand", "export"], help="scenarios also killed just after each rename (default classify expand export)")
    parser.add_argument("--random", type=int, default=5, metavar="K", help="random-time kills per scenario (default 5)")
    parser.add_argument("--fast", action="store_true", help="the suite's subset: about 10 kills at chosen write points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="make the work folder in this folder (default: the system's temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--results", type=Path, default=None, help=f"write the results here (default {RESULTS.relative_to(ROOT)}; with --fast none)")
    parser.add_argument("--json", type=Path, default=None, help="also write every kill's record as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each graft process (default 1)")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = args.threads
    args.argv = argv
    names = args.scenarios or (["classify", "export", "expand", "detect"] if args.fast else list(SCENARIOS))
    started = time.monotonic()
    work = work_folder.make("graft-crash-", args.work)  # a folder of its own, removed at the end (unless --keep)
    free = shutil.disk_usage(work).free
    if free < 2e9:
        raise SystemExit(f"only {free / 1e9:.1f} GB free in {work}: the harness needs about 1 GB")
    import graft

    preload()
    h = Harness(work, args.seed)
    h.graft_path = str(Path(graft.__file__).parent)
    print(f"graft from {h.graft_path}; work folder {work}", flush=True)
    try:
        for s in build(h, names, twice=not args.fast):
            if args.fast:
                for n, mode in fast_points(s):
                    h.kill(s, at=n, mode=mode)
                if s.name == "classify":
                    h.random_kills(s, 1, 0.1, 0.6)
                continue
            for n in kill_points(s):
                h.kill(s, at=n, mode="before")
            if s.name in args.after:
                for n in kill_points(s):
                    h.kill(s, at=n, mode="after")
            h.random_kills(s, args.random, 0.02, 0.98)
        seconds = time.monotonic() - started
        text = summarise(h, args, seconds)
        print(text)
        results = args.results or (None if args.fast else RESULTS)
        if results:
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(text, encoding="utf-8")
        if args.json:
            args.json.write_text(json.dumps({"seconds": seconds, "kills": h.records}, indent=1), encoding="utf-8")
        return 0 if all(r["survived"] for r in h.records) else 1
    finally:
        work_folder.release(work, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
