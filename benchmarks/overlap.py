"""How much of the block copies' time the compute stream hides, from a profile of one steady step.

A block copy is a host-to-device memcpy longer than `min_us` (one 0.7 GB bf16 block takes ~13 ms; the small
uploads of inputs and tables are shorter). Its covered time is the part of it during which some kernel (not a
copy or memset) ran on the GPU; the fraction is summed over all block copies of the step.
"""
from __future__ import annotations

BLOCK_COPY_MIN_US = 1000.0


def intervals(events, pick) -> list[tuple[float, float]]:
    """Sorted (start, end) microseconds of the profiler events `pick` accepts."""
    return sorted((e.time_range.start, e.time_range.end) for e in events if pick(e))


def covered(span: tuple[float, float], busy: list[tuple[float, float]]) -> float:
    """Microseconds of `span` covered by the union of the sorted intervals `busy`."""
    lo, hi = span
    total, cursor = 0.0, lo
    for a, b in busy:
        a, b = max(a, cursor), min(b, hi)
        if b > a:
            total += b - a
            cursor = b
    return total


def copy_overlap(events, min_us: float = BLOCK_COPY_MIN_US) -> dict:
    """{block_copies, copy_ms (each), copy_ms_total, covered_fraction} of a profiler's events."""
    copies = intervals(events, lambda e: "Memcpy HtoD" in e.name)
    kernels = intervals(events, lambda e: e.device_type.name == "CUDA" and "Memcpy" not in e.name
                        and "Memset" not in e.name)
    big = [c for c in copies if c[1] - c[0] > min_us]
    total = sum(b - a for a, b in big)
    return {"block_copies": len(big), "copy_ms": [round((b - a) / 1e3, 2) for a, b in big],
            "copy_ms_total": total / 1e3,
            "covered_fraction": sum(covered(c, kernels) for c in big) / total if total else None}
