"""Runs racing for the shared cache (tests/test_cache_race.py, benchmarks/cache_race.py).

As a script, ``python cache_race_driver.py MODE -- GRAFT ARGS`` runs graft's CLI. MODE ``run``: the
plain command. MODE ``kill-in-write``: the first embedding entry this process writes is cut to half
its bytes and the process SIGKILLs itself, mid-write, holding the entry's lock.

``race`` starts that killed writer, waits until it holds the entry's lock, starts ``racers`` plain
runs on the same cache while a reader thread reads every entry over and over, and reports what
each saw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DRIVER = Path(__file__).resolve()


def start(mode: str, cache: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "GRAFT_CACHE_DIR": str(cache), "PYTHONPATH": str(DRIVER.parent)}
    return subprocess.Popen([sys.executable, str(DRIVER), mode, "--", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete(path: Path) -> bool:
    """The entry parses and its checksum covers its rows (what graft checks before using one)."""
    from safetensors import safe_open

    from graft.tasks.classify.embeddings import FORMAT, _checksum

    with safe_open(str(path), "pt") as f:  # one open: a second one could find the next version renamed in
        meta = f.metadata()
        emb = f.get_tensor("embeddings")
    return meta["format"] == FORMAT and meta["sha256"] == _checksum(meta["key"], json.loads(meta["digests"]), emb)


class Reader(threading.Thread):
    """Reads every embedding entry under ``root`` over and over while the runs race."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.done, self.reads, self.partial = root, threading.Event(), 0, []

    def run(self) -> None:
        while not self.done.is_set():
            for path in self.root.glob("embeddings/*/*.safetensors"):
                try:
                    ok = complete(path)
                except FileNotFoundError:
                    continue
                except Exception as err:  # noqa: BLE001 - any failure to read is a partial entry
                    ok = False
                    self.partial.append(f"{path.name}: {err}")
                self.reads += 1
                if not ok:
                    self.partial.append(path.name)
            time.sleep(0.002)


def race(work: Path, config: Path, racers: int) -> dict:
    """``racers`` runs of ``config`` and one killed writer on one cache: exit codes, how many images
    each racer's embedding cache computed, the reader's reads and partial entries, the temporary
    files left, and the run folders."""
    cache = work / "cache"
    killed = start("kill-in-write", cache, "train", "--config", config, "--out", work / "killed")
    deadline = time.time() + 120
    while not list(cache.glob("embeddings/*/*.lock")) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the killed writer holds the entry's lock: the others start while it computes
    reader = Reader(cache)
    reader.start()
    started = time.perf_counter()
    runs = [start("run", cache, "train", "--config", config, "--out", work / f"race{i}") for i in range(racers)]
    results = [(p.wait(600), p.stderr.read()) for p in runs]
    seconds = time.perf_counter() - started
    reader.done.set()
    reader.join()
    return {
        "killed_exit": killed.wait(60),
        "exits": [code for code, _ in results],
        "errors": [err[-2000:] for code, err in results if code != 0],
        "computed": [int(err.split("embedding cache: ")[1].split(" image views")[0]) if "embedding cache: " in err else None for _, err in results],
        "reads": reader.reads,
        "partial": reader.partial,
        "temps_left": [str(p) for p in cache.rglob("*.tmp")],
        "runs": [work / f"race{i}" for i in range(racers)],
        "seconds": seconds,
    }


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    if mode == "kill-in-write":
        import safetensors.torch

        real = safetensors.torch.save_file

        def half_then_die(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            if "embeddings" in tensors:
                size = os.path.getsize(filename)
                with open(filename, "r+b") as f:
                    f.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = half_then_die
    from graft.cli import main as graft

    return graft(argv)


if __name__ == "__main__":
    sys.exit(main())
