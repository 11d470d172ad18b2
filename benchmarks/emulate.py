"""A smaller card on a bigger one, for the benchmarks: `WAN_EMULATE_GPU_GIB=79.18` runs every benchmark process as
on an H100 80GB (79.18 GiB) when the lent card is an H200.

Applied by each benchmark process (`benchmarks.rows`) before anything is built, and recorded in its result: the
allocator is capped so that what the process may reserve plus what the card already holds (the CUDA context) is
the emulated size, and `torch.cuda.mem_get_info` reports free and total memory against that size, so the CLI's
`--fast` plan (`generate._fast_budget`) sees the emulated card's free memory. Both changes are process-wide and
last for the process: a benchmark process measures one card.
"""
from __future__ import annotations

import os

import torch

ENV = "WAN_EMULATE_GPU_GIB"


def emulate_card(device: torch.device) -> dict | None:
    """Emulate the card of ENV's size on `device` (nothing without ENV). Returns what was emulated, for the record."""
    value = os.environ.get(ENV)
    if not value:
        return None
    gib = float(value)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"error: {ENV}={value} emulates a GPU; this run is on {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    size = gib * 2**30
    if not 0 < size <= total:
        raise SystemExit(f"error: {ENV}={value}: the card has {total / 2**30:.2f} GiB; emulate a smaller size")
    held = total - free  # the CUDA context (and anything reserved already): held on the emulated card too
    torch.cuda.set_per_process_memory_fraction((size - held) / total, index)
    real = torch.cuda.mem_get_info

    def mem_get_info(dev=None):
        f, t = real(dev)
        return max(0, f - (t - int(size))), int(size)

    torch.cuda.mem_get_info = mem_get_info
    return dict(gib=gib, on=torch.cuda.get_device_name(index), real_gib=round(total / 2**30, 2),
                held_at_start_gib=round(held / 2**30, 2))
