"""``graft`` as torchrun starts it in the distributed tests, with one fault injected by name.

Run as ``python -m torch.distributed.run ... tests/engine/dist_driver.py FAULT graft-args...``:
- ``none``: plain graft;
- ``no-allreduce``: nothing is wrapped in DistributedDataParallel, so no gradient is averaged
  (the mutation the equality tests must catch);
- ``count-writes=FILE``: every file a rank other than 0 opens for writing, every folder it makes
  and every file it renames is listed in FILE.RANK at exit (written with os calls, not counted);
- ``stop-at=N``: rank 0 asks to stop (as Ctrl-C does) after its N-th step;
- ``fail-rank1``: rank 1 raises a GraftError in its second epoch;
- ``kill-rank1-at=N``: rank 1 kills itself (SIGKILL) after its N-th step, in the launch's first
  attempt only (torchrun's ``--max-restarts`` then starts the ranks again).
"""

from __future__ import annotations

import atexit
import builtins
import io
import os
import sys


def main() -> int:
    fault, argv = sys.argv[1], sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    from graft.engine import distributed, loop

    if fault == "no-allreduce":
        distributed.wrap = lambda module, device: module
    elif fault.startswith("count-writes="):
        counted: list[str] = []
        target = fault.split("=", 1)[1]
        real_open, real_io_open = builtins.open, io.open

        def counting(opener):
            def wrapper(file, mode="r", *args, **kwargs):
                if rank != 0 and any(c in mode for c in "wax+") and str(file) != os.devnull:  # the silenced console
                    counted.append(f"open {file}")
                return opener(file, mode, *args, **kwargs)

            return wrapper

        builtins.open, io.open = counting(real_open), counting(real_io_open)
        import pathlib

        real_mkdir, real_replace = pathlib.Path.mkdir, os.replace

        def note(fn):
            def wrapper(*args, **kwargs):
                if rank != 0:
                    counted.append(f"{fn.__name__} {args[0]}")
                return fn(*args, **kwargs)

            return wrapper

        pathlib.Path.mkdir, os.replace = note(real_mkdir), note(real_replace)

        def dump() -> None:
            fd = os.open(f"{target}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, "".join(f"{line}\n" for line in counted).encode())
            os.close(fd)

        atexit.register(dump)
    elif fault.startswith("stop-at="):
        at = int(fault.split("=", 1)[1])
        step = loop.Trainer.step

        def stepping(self, inputs, targets):
            out = step(self, inputs, targets)
            if rank == 0 and self.state.iteration + 1 == at:
                self.stop_requested = True
            return out

        loop.Trainer.step = stepping
    elif fault == "fail-rank1":
        from graft.errors import GraftError

        finish = loop.Trainer.finish_epoch

        def failing(self):
            if rank == 1 and self.state.epoch == 1:
                raise GraftError("injected failure on rank 1")
            return finish(self)

        loop.Trainer.finish_epoch = failing
    elif fault.startswith("kill-rank1-at="):
        import signal

        at = int(fault.split("=", 1)[1])
        step = loop.Trainer.step

        def dying(self, inputs, targets):
            out = step(self, inputs, targets)
            if rank == 1 and self.state.iteration + 1 == at and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        loop.Trainer.step = dying
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault}")
    from graft.cli import main as graft

    return graft(argv)


if __name__ == "__main__":
    sys.exit(main())
