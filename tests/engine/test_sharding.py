"""How a batch and an evaluation are split over processes, checked without starting any: every
rank's part of a global batch, every sample of an evaluation exactly once, equal step counts."""

from __future__ import annotations

import pytest

from graft.data.dataset import EpochBatchSampler
from graft.engine import distributed


def parts(n: int, batch: int, world: int, epoch: int = 3, start: int = 0) -> list[list[list[int]]]:
    """Each rank's batches (indices only) for one epoch."""
    out = []
    for rank in range(world):
        sampler = EpochBatchSampler(n, batch, seed=7, rank=rank, world=world)
        sampler.set_epoch(epoch, start)
        out.append([[i for i, _ in keys] for keys in sampler])
    return out


@pytest.mark.parametrize("n,batch,world", [(30, 8, 2), (37, 8, 2), (41, 10, 3), (64, 16, 4), (9, 8, 2)])
def test_the_ranks_together_take_one_process_batches_in_its_order(n, batch, world) -> None:
    one = parts(n, batch, 1)[0]
    ranks = parts(n, batch, world)
    assert len({len(r) for r in ranks}) == 1  # the same number of steps on every rank: nobody waits
    joined = [sum((r[b] for r in ranks), []) for b in range(len(ranks[0]))]
    # the same global batches, in order, split into contiguous parts; a last batch with fewer than
    # 2 images per process is dropped (one process drops only a last batch of 1)
    expected = one if len(one[-1]) >= 2 * world or len(one) == 1 else one[:-1]
    assert joined == expected
    for b in range(len(joined)):
        sizes = [len(r[b]) for r in ranks]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_a_resumed_epoch_continues_the_same_global_batches_with_any_number_of_processes() -> None:
    full = parts(52, 8, 1)[0]
    for world in (1, 2):
        ranks = parts(52, 8, world, start=2)
        assert [sum((r[b] for r in ranks), []) for b in range(len(ranks[0]))] == full[2:]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_an_evaluation_shard_covers_every_sample_once(world) -> None:
    for n in range(0, 23):
        shards = [distributed.shard(n, of=world, at=r) for r in range(world)]
        assert [i for s in shards for i in s] == list(range(n))
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_one_process_needs_no_process_group() -> None:
    assert distributed.world() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.all_gather(3) == [3]
    assert distributed.all_sum([1, 2.5]) == [1.0, 2.5] and distributed.share_of_total(4.0, 8) == 4.0
    assert distributed.on_main(lambda: 42) == 42 and distributed.sharded_map([1, 2, 3], lambda xs: [x * 2 for x in xs]) == [2, 4, 6]


def test_the_devices_flag_is_removed_from_what_the_processes_run() -> None:
    from graft.cli import _without_devices

    assert _without_devices(["train", "--devices", "2", "--out", "r", "--devices=4", "--quiet"]) == ["train", "--out", "r", "--quiet"]
