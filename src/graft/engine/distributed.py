"""Many processes, one run: PyTorch's launcher (``torchrun``) sets the environment, this module
joins its process group and offers the few collectives a graft run needs.

Every function here is a no-op (or the identity) in a single process, so callers never branch on
"distributed or not". The rules the rest of graft follows:

- **One global order.** Each rank trains on a disjoint shard of the same seeded batch
  (``graft.data.dataset.EpochBatchSampler``); ``solver.batch_size`` is the *global* batch.
- **Decided once.** Anything decided from data (``auto``, early stopping, a calibration) is
  decided on rank 0 or from gathered figures, and broadcast (``on_main``, ``broadcast``).
- **Written once.** Only rank 0 writes the run folder and the shared caches (``is_main``).
- **Never a hang.** Every collective has the process group's timeout (``GRAFT_DIST_TIMEOUT``
  seconds, default 1800); a rank that raises exits, and torchrun then ends the others.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from graft.errors import ConfigError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800  # a collective of the training loop: every rank is in it within seconds
DEFAULT_WAIT_S = 86400  # the other ranks waiting while rank 0 computes something once (a cache, auto)
_patient: Any = None  # a gloo group with DEFAULT_WAIT_S, for those waits


def launched() -> bool:
    """Is this process one of several that torchrun started (``WORLD_SIZE`` > 1)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_alone = 0  # > 0 inside ``alone()``: this rank works by itself


def active() -> bool:
    """Are several processes training together (and is this rank not working ``alone``)?"""
    return not _alone and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def describe(batch_size: int) -> str:
    """For the run's opening line: how many processes share each batch (empty in one process)."""
    if not active():
        return ""
    return f" x {world()} processes ({dist.get_backend()}), each {batch_size // world()}-{-(-batch_size // world())} images of every {batch_size}-image batch"


def backend_for(device: torch.device) -> str:
    """gloo on CPU, NCCL on CUDA: the backend follows the device, with no CUDA-only path."""
    return "nccl" if device.type == "cuda" else "gloo"


def timeout(name: str = "GRAFT_DIST_TIMEOUT", default: float = DEFAULT_TIMEOUT_S) -> timedelta:
    raw = os.environ.get(name, str(default))
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not '{raw}'") from None
    return timedelta(seconds=seconds)


def join(device: torch.device) -> torch.device:
    """Under torchrun: this rank's device (``cuda:LOCAL_RANK`` when the run is on CUDA) and the
    process group joined, once. In a single process: ``device`` unchanged."""
    if not launched():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}; start at most that many processes per node (--nproc-per-node / --devices)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"several processes on device '{device}' are not supported: use cuda (NCCL) or cpu (gloo)")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        # torchrun's store outlives a restart (--max-restarts): without a prefix per attempt, the
        # ranks of a restarted launch would read the addresses the failed attempt published.
        store, rank_, size = next(dist.rendezvous("env://", timeout=timeout()))
        store = dist.PrefixStore(f"graft/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend_for(device), store=store, rank=rank_, world_size=size, timeout=timeout(), **kwargs)
        global _patient
        _patient = dist.new_group(backend="gloo", timeout=timeout("GRAFT_DIST_WAIT", DEFAULT_WAIT_S))
        _quiet_other_ranks()
    return device


def resume_note(payload: dict[str, Any]) -> str | None:
    """What a resumed run should say when its snapshot was made by another number of processes."""
    saved = payload.get("world", 1)
    if saved == world():
        return None
    return (f"note: the snapshot was made by {saved} process{'es' if saved != 1 else ''}, this run has {world()}: it continues the same "
            "data order from the same batch, but not bit for bit (each process's random state and its part of every batch differ)")


def _quiet_other_ranks() -> None:
    """Progress, notes and warnings come from rank 0 alone. Another rank's own failure still
    reaches the console: errors and tracebacks go to the process's real stderr."""
    if dist.get_rank() == 0 or os.environ.get("GRAFT_LOG_ALL_RANKS"):
        return
    real = sys.__stderr__
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    sys.excepthook = lambda kind, err, tb: traceback.print_exception(kind, err, tb, file=real)


def synchronise_batchnorm(model: torch.nn.Module, device: torch.device) -> None:
    """``train.sync_bn``: BatchNorm layers that train normalise over the global batch. PyTorch's
    SyncBatchNorm runs on GPUs only, so on a CPU this is refused rather than ignored. The layers
    are swapped in place; weights, buffers and which layers stay frozen are unchanged."""
    if device.type != "cuda":
        raise ConfigError("train.sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); on CPU leave it off: each process then normalises its part of the batch")
    for name, child in list(model.named_children()):
        setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel, its gradients averaged over the ranks. Only
    parameters that require a gradient are synchronised, so a frozen part inside costs nothing,
    and wrapping broadcasts rank 0's weights, so every rank starts the phase from the same ones."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers are not broadcast before every forward: that would rewrite, in place, BatchNorm
    # statistics a frozen part outside the wrapper already used in this step's graph. The trainer
    # hands rank 0's buffers to every rank before each validation instead (``same_buffers``).
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None, forward_sync_buffers=False, gradient_as_bucket_view=True)


def same_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics that trained on each rank's part of the batches) on
    every rank, so that every rank validates and snapshots the same model."""
    if not active():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point() or buffer.dtype == torch.long:
            dist.broadcast(buffer.data, src=0)


def leave() -> None:
    """Leave the process group at the end of a command that succeeded on this rank: after a
    barrier, so no rank closes its connections while another still receives from it (gloo would
    abort that one). A failed rank just exits; torchrun then ends the others."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where tensors for collectives live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object; tensors come back on the CPU)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_device() if dist.get_backend() == "nccl" else None)
    return box[0]


@contextmanager
def alone() -> Iterator[None]:
    """Work on this rank by itself: inside, ``active()`` is False, so a trainer, a cache or an
    evaluation started here neither shards nor waits for the other ranks."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0 alone, its result on every rank: what is computed or decided once.
    An exception on rank 0 ends that rank (torchrun then stops the others)."""
    if not active():
        return compute()
    if is_main():
        with alone():
            result = compute()
        dist.broadcast_object_list([_on_cpu(result)], src=0, group=_patient)
        return result
    # Waiting for rank 0 may take long (a cache over a large dataset): on a group with a timeout
    # of its own (GRAFT_DIST_WAIT, default a day); a rank 0 that dies still ends the wait at once.
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=_patient)
    return box[0]


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples moved to the CPU: what another
    rank unpickles must not land on rank 0's GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over the ranks (float64, so counts stay exact)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def share_of_total(local: float, n: int) -> float:
    """The divisor for a loss that divides a sum over the batch by a total over the batch
    (foreground locations, class weights): the global batch's total, summed over the ranks, as this
    rank's share of its ``n`` samples. The trainer weights each rank's loss by n / N (right for a
    mean over samples), so this makes the averaged gradient the global sum over the global total,
    as one process computes it. One process: ``local``."""
    if not active():
        return local
    total, samples = all_sum([local, n])
    return total * n / samples


def shard(n: int, *, of: int | None = None, at: int | None = None) -> range:
    """This rank's contiguous part of ``range(n)``: sizes differ by at most one, nothing is
    repeated or padded (so gathered evaluations count every sample exactly once)."""
    of = world() if of is None else of
    at = rank() if at is None else at
    base, extra = divmod(n, of)
    start = at * base + min(at, extra)
    return range(start, start + base + (1 if at < extra else 0))


def gather_shards(local: list[Any]) -> list[Any]:
    """The ranks' ``local`` lists (each rank's ``shard``) concatenated in rank order: the whole list."""
    if not active():
        return local
    return [item for part in all_gather(local) for item in part]


def sharded_map(items: Sequence[Any], compute: Callable[[Sequence[Any]], list[Any]]) -> list[Any]:
    """``compute(items)``, each rank computing its shard; every rank gets the whole result."""
    if not active():
        return compute(items)
    part = shard(len(items))
    return gather_shards(list(compute([items[i] for i in part])) if len(part) else [])


def first_error_here() -> bool:
    """Should this rank print the error it is about to exit with? Only the first rank to fail
    does, so a failure that every rank meets (a bad config) is told once, not once per rank.
    Decided through the rendezvous store, which needs no collective from the other ranks."""
    if not dist.is_available() or not dist.is_initialized():  # before the group: every rank meets the same config errors
        return os.environ.get("LOCAL_RANK", "0") == "0"
    if not active():
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.add("graft/errors", 1) == 1
    except Exception:  # the store is gone (the launcher is shutting down): better twice than never
        return True


def launch_here(processes: int, argv: list[str]) -> int:
    """``graft ARGV`` in ``processes`` processes on this machine, started by PyTorch's own launcher
    (``torch.distributed.run``, what ``torchrun --standalone`` runs). Returns the exit status: the
    first failed rank's (that rank printed its message), 130 when interrupted, else 0."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # the ranks speak for themselves
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)
    # torchrun's own folder (the ranks' error files); left to itself it makes a new
    # /tmp/torchelastic_* per launch and never removes it.
    logs = tempfile.mkdtemp(prefix="graft-torchrun-")
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={processes}", f"--log-dir={logs}", "-m", "graft", *argv]))
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    except (SignalException, KeyboardInterrupt):
        return 130
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return 0
