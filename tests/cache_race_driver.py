"""``python cache_race_driver.py MODE -- GRAFT ARGS``: graft's CLI in a process that races others
for the shared cache (tests/test_cache_race.py, benchmarks/cache_race.py).

MODE ``run``: the plain command. MODE ``kill-in-write``: the first embedding entry this process
writes is cut to half its bytes and the process SIGKILLs itself, mid-write, holding the entry's lock.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    mode, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    if mode == "kill-in-write":
        import safetensors.torch

        real = safetensors.torch.save_file

        def half_then_die(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            if "embeddings" in str(tensors.keys()):
                size = os.path.getsize(filename)
                with open(filename, "r+b") as f:
                    f.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = half_then_die
    from graft.cli import main as graft

    return graft(argv)


if __name__ == "__main__":
    sys.exit(main())
