"""Atomic file writes: a crash or Ctrl-C leaves either the old file or the new one, never half of one.

Every write of a run folder and of the caches comes through ``atomic_write``: a temporary file in
the target's own folder, named after the writing process (``.NAME.PID-RANDOM.tmp``), fsynced,
renamed over the target, and the folder fsynced. A process killed half way leaves at most its
temporary file, which ``sweep_temps`` removes once that process is gone. A full disk (or a file
size limit) becomes a ``DiskFullError`` that names the file and roughly the space it needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graft.errors import DiskFullError

# Errors that mean "the disk (or this process's file size limit, or a quota) has no room".
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_TEMP = re.compile(r"^\..+\.(\d+)-[^.]+\.tmp$")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, expected_bytes: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it into place
    and fsync the folder. ``expected_bytes``: the file's rough size, for the message when the disk
    is full (otherwise what had been written, or the old file's size)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if err.errno in _NO_ROOM:
            raise _no_room(path, err, expected_bytes, written=0) from err
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes 0600, and some writers (safetensors) replace the file with their own 0600
        # one: results should be as readable as any file the user writes.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        no_room = _no_room_errno(err)
        if no_room is None and isinstance(err, Exception):
            no_room = _probe_room(tmp)
        tmp.unlink(missing_ok=True)
        if no_room is not None:
            raise _no_room(path, no_room, expected_bytes, written) from err
        raise
    fsync_folder(path.parent)  # the rename itself survives a power cut only once the folder is synced
    return path


def _no_room_errno(err: BaseException) -> OSError | None:
    """The OSError saying the disk is full, also when a library wrapped it (torch.save raises
    RuntimeError, safetensors its own error) with the errno only in the text or the cause."""
    seen = err
    for _ in range(4):
        if isinstance(seen, OSError) and seen.errno in _NO_ROOM:
            return seen
        text = str(seen)
        for code in _NO_ROOM:
            if os.strerror(code) in text or errno.errorcode[code] in text:
                return OSError(code, os.strerror(code))
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            return None
    return None


def _probe_room(tmp: Path) -> OSError | None:
    """Whether the folder has room for more bytes: libraries report a full disk in their own words
    (torch.save: "unexpected pos 128 vs 0"), so after a failed write, try one more MiB."""
    try:
        with open(tmp, "ab") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return err if err.errno in _NO_ROOM else None
    return None


def _no_room(path: Path, err: OSError, expected: int | None, written: int) -> DiskFullError:
    old = path.stat().st_size if path.is_file() else 0
    need = max(expected or 0, written, old)
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        where = f"; {human_bytes(free)} free there"
    except OSError:
        where = ""
    reason = "the file size limit (ulimit -f) was reached" if err.errno == errno.EFBIG else "no space left on the device" if err.errno == errno.ENOSPC else "the disk quota is exceeded"
    kept = "the previous version is still there" if old else "no part of it was left"
    return DiskFullError(
        f"could not write {path}: {reason} (it needs about {human_bytes(need) if need else 'a few KB'}{where}); {kept}. "
        "Free some space (graft cache prune; old runs' snapshots) and run the command again",
        path=path, needed=need,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def temp_owner(name: str) -> int | None:
    """The process id in an ``atomic_write`` temporary file's name, or None for any other name."""
    m = _TEMP.match(name)
    return int(m.group(1)) if m else None


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, someone else's
        return True
    return True


def sweep_temps(folder: str | os.PathLike, *, recursive: bool = True, older_than_s: float = 24 * 3600) -> list[Path]:
    """Remove temporary files that a killed writer left in ``folder``: those whose process is gone,
    or older than ``older_than_s`` (a process id reused, or a writer on another machine). A live
    writer's temporary file is left alone. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    now = time.time()
    for dirpath, dirnames, filenames in os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]:
        for name in filenames:
            pid = temp_owner(name)
            if pid is None:
                continue
            path = Path(dirpath) / name
            try:
                stale = pid != os.getpid() and (not process_alive(pid) or now - path.stat().st_mtime > older_than_s)
                if stale:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
    return removed


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without folder handles (Windows): the rename is what it offers
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` a second name for ``src`` (hard link, or a copy where links fail), atomically."""
    src, dst = Path(src), Path(dst)

    def write(tmp: Path) -> None:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)

    return atomic_write(dst, write)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (memoised per path, size and modification time)."""
    st = os.stat(path)
    # ctime and inode too: copying tools restore mtime, but a rewrite always moves ctime.
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if memo_key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[memo_key] = h.hexdigest()
    return _DIGESTS[memo_key]
