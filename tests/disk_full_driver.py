"""``python disk_full_driver.py NAME [--once] -- GRAFT ARGS``: graft's CLI with a real file size limit.

When graft's atomic writer opens the temporary file for a target called ``NAME`` (a snapshot such as
``epoch-0003``, or a cache entry's suffix such as ``.safetensors``), this process's RLIMIT_FSIZE drops
to 0: that write, and every later one, fails with a real EFBIG from the kernel (nothing is mocked;
CPython ignores SIGXFSZ, so the write returns the error). With ``--once`` the limit is lifted again
at the next write: space that something else freed.
"""

from __future__ import annotations

import resource
import sys
import tempfile


def main() -> int:
    name, once, argv = sys.argv[1], "--once" in sys.argv[2 : sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1 :]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    real = tempfile.mkstemp
    state = {"limited": False, "hits": 0}

    def mkstemp(*args, prefix=None, **kwargs):
        target = (prefix or "").lstrip(".").rsplit(".", 1)[0]  # ".NAME.PID-" -> "NAME"
        if state["limited"] and once:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            state["limited"] = False
        if prefix and prefix.startswith(".") and (target == name or (name.startswith(".") and target.endswith(name))) and state["hits"] == 0:
            state["hits"] += 1
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
            state["limited"] = True
        return real(*args, prefix=prefix, **kwargs)

    tempfile.mkstemp = mkstemp
    from graft.cli import main as graft

    return graft(argv)


if __name__ == "__main__":
    sys.exit(main())
