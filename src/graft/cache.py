"""The shared cache folder (``~/.cache/graft``): where it is, writing to it, and keeping it bounded.

What lives there, one folder per kind:

- ``embeddings/``: a frozen backbone's embeddings per (backbone, preprocessing, view), safetensors;
- ``decoded/``: images decoded and resized once, ``.npy`` per (file content, size);
- ``features/``: a detector's backbone features spilled to disk while its run lasts.

Entries are written through ``store``: under a per-entry lock (``filelock``), so two runs building
the same key compute it once and the second reuses it, and through ``graft.io.atomic_write``
(process-unique temporary names), so a reader never sees half an entry even without the lock. A
write that fails for want of space is a warning and "not cached", never a failed run.

The folder is capped (``GRAFT_CACHE_MAX_GB``, default 10 GB): when it grows past the cap the
least recently used entries go. "Used" is the file's modification time, renewed on every read
(``mark_used``): access times are unreliable on ``noatime``/``relatime`` mounts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from graft.console import warn
from graft.errors import ConfigError
from graft.io import atomic_write, human_bytes, process_alive, sweep_temps, temp_owner

# 10 GB holds the decoded images of about 40,000 photos at 224 px (the largest kind by far) or the
# embeddings of millions; it is small beside a disk, and bounded, unlike the 74 GB of work folders
# that once stopped every command on a build machine.
DEFAULT_MAX_GB = 10.0
KINDS = {
    "embeddings": "backbone embeddings (frozen-backbone phases, expansions)",
    "decoded": "decoded, resized images",
    "features": "detector features spilled to disk by a running run",
}
LOCK_WAIT_S = 3600.0  # another run computing the same entry: wait for it rather than compute it twice


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """``train.cache_dir`` when set, else ``$GRAFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graft``, else ``~/.cache/graft``."""
    if configured:
        return Path(configured)
    if os.environ.get("GRAFT_CACHE_DIR"):
        return Path(os.environ["GRAFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graft"


def max_bytes() -> int | None:
    """The cap from ``$GRAFT_CACHE_MAX_GB`` (``0`` or ``none``: no cap), else the default."""
    raw = os.environ.get("GRAFT_CACHE_MAX_GB", "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * 1e9)
    if raw.lower() in ("0", "none", "off", "unlimited"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"GRAFT_CACHE_MAX_GB={raw!r} is not a number of gigabytes (or 0 for no cap)") from None
    if value < 0:
        raise ConfigError(f"GRAFT_CACHE_MAX_GB={raw!r} is negative; give gigabytes, or 0 for no cap")
    return int(value * 1e9)


@dataclass(frozen=True)
class Entry:
    """One file in the cache."""

    path: Path
    kind: str
    bytes: int
    used: float  # seconds since the epoch: the last write or read


def _is_entry(name: str) -> bool:
    return not name.endswith(".lock") and temp_owner(name) is None


def entries(root: str | os.PathLike) -> list[Entry]:
    """Every entry under ``root``, locks and temporary files left out."""
    root = Path(root)
    found = []
    for kind in KINDS:
        for dirpath, _, filenames in os.walk(root / kind):
            for name in filenames:
                if not _is_entry(name):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # evicted or replaced meanwhile
                    continue
                found.append(Entry(path, kind, st.st_size, st.st_mtime))
    return found


def mark_used(path: str | os.PathLike) -> None:
    """Renew an entry's place in the eviction order (a read counts as a use)."""
    try:
        os.utime(path)
    except OSError:
        pass


@contextmanager
def entry_lock(path: str | os.PathLike, *, wait_s: float = LOCK_WAIT_S) -> Iterator[bool]:
    """Hold ``PATH.lock`` (an ``flock``: the kernel releases it when the holder dies, even by
    SIGKILL). Yields whether the lock is held: where it cannot be (a read-only folder, a wait past
    ``wait_s``) the caller goes on without it, which is safe because entries are renamed into place
    whole; at worst two processes compute the same entry."""
    path = Path(path)
    lock = FileLock(str(path) + ".lock", timeout=wait_s)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        held = True
    except Timeout:
        warn(f"waited {wait_s:.0f}s for another process writing {path}; computing it here as well")
        held = False
    except OSError:
        held = False
    try:
        yield held
    finally:
        if held:
            lock.release()


def store(path: str | os.PathLike, write: Callable[[Path], None], *, what: str, expected_bytes: int | None = None) -> bool:
    """Write a cache entry atomically (``write(tmp)``); False, with a warning, when it could not be
    written (the run goes on without it). Keeps the folder under its cap afterwards."""
    path = Path(path)
    try:
        atomic_write(path, write, expected_bytes=expected_bytes)
    except OSError as err:  # DiskFullError is one; a read-only or vanished folder another
        warn(f"not cached: {what} ({err})")
        return False
    _Budget.added(_root_of(path), path)
    return True


def _root_of(path: Path) -> Path:
    for parent in path.parents:
        if parent.name in KINDS:
            return parent.parent
    return path.parent


class _Budget:
    """Each cache root's size as this process last counted it, plus what it has written since."""

    sizes: dict[Path, int] = {}

    @classmethod
    def added(cls, root: Path, path: Path) -> None:
        cap = max_bytes()
        if cap is None:
            return
        if root not in cls.sizes:
            cls.sizes[root] = sum(e.bytes for e in entries(root))
        else:
            try:
                cls.sizes[root] += path.stat().st_size
            except OSError:
                pass
        if cls.sizes[root] > cap:
            prune(root, cap)
            cls.sizes[root] = sum(e.bytes for e in entries(root))


def prune(root: str | os.PathLike, cap: int | None, *, keep: Callable[[Entry], bool] = lambda e: False) -> list[Entry]:
    """Remove least recently used entries until ``root`` holds at most ``cap`` bytes. An entry being
    read meanwhile stays readable (an open or mapped file outlives its name); a reader that comes
    later finds it missing and computes it again."""
    if cap is None:
        return []
    found = sorted(entries(root), key=lambda e: e.used)
    total = sum(e.bytes for e in found)
    removed = []
    for entry in found:
        if total <= cap:
            break
        if keep(entry) or (entry.kind == "features" and _spill_in_use(entry.path)):
            continue
        try:
            entry.path.unlink()  # its lock file stays: another process may hold or wait on it
        except FileNotFoundError:
            pass
        total -= entry.bytes
        removed.append(entry)
    return removed


def clear(root: str | os.PathLike, kinds: list[str] | None = None) -> list[Entry]:
    """Remove every entry (of ``kinds``), and their lock files; a running run's spill file stays."""
    gone = []
    for entry in entries(root):
        if kinds and entry.kind not in kinds:
            continue
        if entry.kind == "features" and _spill_in_use(entry.path):
            continue
        entry.path.unlink(missing_ok=True)
        gone.append(entry)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(".lock"):
                _drop_idle_lock(Path(dirpath, name))
    return gone


def _drop_idle_lock(path: Path) -> None:
    """Delete a lock file nobody holds. A process that opened it just before still writes correctly
    (the entry is renamed into place atomically); at worst two compute the same entry."""
    lock = FileLock(str(path), timeout=0)
    try:
        with lock:
            path.unlink(missing_ok=True)
    except Timeout:
        pass


# ------------------------------------------------------------------ detector spill files

SPILL_PREFIX = "graft-det-features-"


def spill_name_prefix() -> str:
    """A spill file's name starts with its process id, so the sweep can tell a live run's from a killed one's."""
    return f"{SPILL_PREFIX}{os.getpid()}-"


def _spill_in_use(path: Path) -> bool:
    name = path.name
    if not name.startswith(SPILL_PREFIX):
        return False
    pid = name[len(SPILL_PREFIX):].split("-", 1)[0]
    return pid.isdigit() and process_alive(int(pid))


def sweep(root: str | os.PathLike, *, older_than_s: float = 24 * 3600) -> list[Path]:
    """At start-up: the temporary files and detector spill files that killed runs left behind."""
    root = Path(root)
    removed = sweep_temps(root, older_than_s=older_than_s)
    now = time.time()
    for folder in (root / "features", root):  # spill files lived in the root before they had a folder
        if not folder.is_dir():
            continue
        for path in folder.glob(f"{SPILL_PREFIX}*"):
            try:
                if not _spill_in_use(path) or now - path.stat().st_mtime > older_than_s * 30:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
    return removed


def tidy(root: str | os.PathLike) -> None:
    """What a command does on start: sweep a killed run's leftovers and hold the cap."""
    root = Path(root)
    if not root.is_dir():
        return
    sweep(root)
    evicted = prune(root, max_bytes())
    if evicted:
        warn(f"cache {root}: evicted {len(evicted)} least recently used entries ({human_bytes(sum(e.bytes for e in evicted))}) to stay under GRAFT_CACHE_MAX_GB")


# ------------------------------------------------------------------ what `graft cache list` shows


def describe(entry: Entry) -> str:
    """What an entry holds, from its metadata or name: the model and preprocessing, the image size,
    or the process that spilled it."""
    if entry.kind == "embeddings":
        try:
            from safetensors import safe_open

            with safe_open(str(entry.path), "np") as f:
                meta = f.metadata() or {}
            return f"{meta.get('model', '?')}, {meta.get('images', '?')} images"
        except Exception:  # noqa: BLE001 - a damaged entry is still listed (and rebuilt when used)
            return "unreadable (rebuilt when next used)"
    if entry.kind == "decoded":
        tag = entry.path.stem.split("-", 1)[1] if "-" in entry.path.stem else "?"
        size, _, interpolation = tag.partition("-")
        return f"short side {size} px, {interpolation}"
    pid = entry.path.name[len(SPILL_PREFIX):].split("-", 1)[0]
    return f"process {pid} ({'running' if _spill_in_use(entry.path) else 'gone'})"


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit} ago"
    return "just now"


def summary(root: str | os.PathLike, *, each: bool = False) -> list[str]:
    """``graft cache list``: per kind (and with ``each``, per entry) the count, size, last use and contents."""
    root = Path(root)
    found = entries(root)
    cap = max_bytes()
    total = sum(e.bytes for e in found)
    lines = [f"cache {root}: {human_bytes(total)} in {len(found)} entries; cap {human_bytes(cap) if cap else 'none'} (GRAFT_CACHE_MAX_GB)"]
    now = time.time()
    for kind, meaning in KINDS.items():
        mine = sorted((e for e in found if e.kind == kind), key=lambda e: -e.used)
        if not mine:
            continue
        groups: dict[str, list[Entry]] = {}
        for e in mine:
            groups.setdefault(describe(e) if kind != "embeddings" else describe(e).split(",")[0], []).append(e)
        lines.append(f"{kind:<11} {len(mine):>6} entries {human_bytes(sum(e.bytes for e in mine)):>9}  last used {ago(now - mine[0].used):<12} {meaning}")
        for what, group in sorted(groups.items(), key=lambda kv: -sum(e.bytes for e in kv[1])):
            lines.append(f"  {what}: {len(group)} entries, {human_bytes(sum(e.bytes for e in group))}, last used {ago(now - max(e.used for e in group))}")
        if each:
            lines += [f"    {e.path.relative_to(root)}  {human_bytes(e.bytes)}  {ago(now - e.used)}  {describe(e)}" for e in mine]
    return lines
