"""No-grad passes on a CPU run over chunks of images (graft.tasks.classify.evaluate.in_chunks)."""

from __future__ import annotations

import torch

from graft.engine.inference import CPU_CHUNK_PIXELS, in_chunks


def test_chunks_give_what_one_call_gives_for_every_output_kind() -> None:
    # 65k pixels each: chunks of 2. Small integers, so every summation order gives the same mean
    # (with random floats a chunk's reduction may be split over threads differently: flaky).
    images = torch.randint(0, 4, (7, 3, 256, 256), generator=torch.Generator().manual_seed(0)).float()
    calls: list[int] = []

    def tensor(x):
        calls.append(len(x))
        return x.mean((1, 2, 3))

    assert torch.equal(in_chunks(tensor, images), images.mean((1, 2, 3)))
    assert calls == [2, 2, 2, 1] and 2 * 256 * 256 <= CPU_CHUNK_PIXELS

    def levels(x):
        return [x[:, :, ::2, ::2], x[:, :1, ::4, ::4]]

    for got, want in zip(in_chunks(levels, images), levels(images)):
        assert torch.equal(got, want)

    def per_image(x):
        return [{"score": float(v)} for v in x.amax((1, 2, 3))]

    assert in_chunks(per_image, images) == per_image(images)


def test_small_inputs_and_embeddings_go_in_one_call() -> None:
    calls: list[int] = []

    def fn(x):
        calls.append(len(x))
        return x

    in_chunks(fn, torch.rand(16, 3, 96, 96))  # 147k pixels: one call
    in_chunks(fn, torch.rand(300, 1280))  # not images
    assert calls == [16, 300]
