"""Forward passes without gradients, for every task: mixed precision on a GPU, chunks on a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch



def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# Input pixels per forward pass without gradients on a CPU. Bigger batches overflow the CPU's
# caches: the bundled Lite0 backbone took 133 ms per 384 px image at batch 16 and 38 ms at batch 1-2,
# 39 ms per 224 px image at batch 32 and 17 ms at batch 4, 3.6 ms per 96 px image at batch 32 and
# 2.3 ms at 16 (2 AMD EPYC cores; each the fastest batch measured near 150k pixels).
CPU_CHUNK_PIXELS = 150_000


def in_chunks(fn: Callable[[torch.Tensor], Any], images: torch.Tensor) -> Any:
    """``fn(images)`` for a no-grad pass, run on a CPU over chunks of about ``CPU_CHUNK_PIXELS``
    and joined: the same outputs (a tensor, a list of per-level maps, or a list of per-image
    results), 1.5-3.5x sooner than one big batch. On a GPU, one call."""
    if images.ndim != 4 or images.device.type != "cpu":
        return fn(images)
    step = max(1, CPU_CHUNK_PIXELS // (images.shape[-2] * images.shape[-1]))
    if step >= len(images):
        return fn(images)
    parts = [fn(chunk) for chunk in images.split(step)]
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if first and isinstance(first[0], torch.Tensor):  # one map per pyramid level
        return [torch.cat(level) for level in zip(*parts)]
    return [item for part in parts for item in part]  # one result per image
