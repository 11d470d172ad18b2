"""Multi-GPU scaling: the same `--fast` row on 1, 2, 4 (8) GPUs of one machine, each under torchrun.

    python -m benchmarks.scaling --res 720p --nproc 1,2,4 --out benchmarks/results/h200_720p_scaling.json
    python -m benchmarks.scaling --res 720p --nproc 8 --layout cfg     # CFG parallel 2 x Ulysses 4

Layout `ulysses`: Ulysses degree = N. Layout `cfg`: CFG parallel over 2 halves, Ulysses N/2 within each.
Projected DiT seconds per video = 40 x measured step; speedup and efficiency are against the N=1 row of the run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.waterfall import environment, finish, run_child
from wan.options import FAST_PRESET

STEPS = 40


def options_for(n: int, layout: str, base: dict) -> dict:
    if n == 1:
        return dict(base)
    if layout == "cfg":
        if n % 2:
            raise ValueError(f"--layout cfg needs an even number of GPUs, got {n}")
        return {**base, "cfg_parallel": True, "ulysses_size": n // 2, "batched_cfg": False}
    return {**base, "ulysses_size": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="720p", choices=["480p", "720p", "tiny"])
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--nproc", default="1,2,4", help="comma-separated GPU counts")
    p.add_argument("--layout", default="ulysses", choices=["ulysses", "cfg"])
    p.add_argument("--options", default=json.dumps(FAST_PRESET), help="RuntimeOptions fields as JSON (default --fast)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--deadline", type=float, default=560)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    # NVLink multicast stays off on shared machines (and is not needed for these collectives)
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    base = json.loads(args.options)
    ref = Path(tempfile.mkdtemp()) / "single.pt"
    t0 = time.perf_counter()
    rows = []
    for n in (int(x) for x in args.nproc.split(",")):
        opts = options_for(n, args.layout, base)
        left = args.deadline - (time.perf_counter() - t0)
        # the single-GPU row saves its output; multi-GPU rows report their difference to it (same seed and weights)
        extra = ["--save", str(ref)] if n == 1 else (["--ref", str(ref)] if ref.exists() else [])
        row = run_child(["--res", args.res, "--frame_num", str(args.frame_num), "row", "--steps", str(args.steps),
                         "--options", json.dumps(opts), *extra], left, nproc=n) \
            if left > 20 else {"error": "skipped: out of time"}
        row.update(nproc=n, layout=args.layout if n > 1 else "single", options=opts)
        rows.append(row)
        print(f"[{time.perf_counter() - t0:6.0f} s] {n} GPU(s): "
              + (row.get("error") or f"{row['per_forward_s']:.3f} s/forward"),
              flush=True)
    base_row = next((r for r in rows if r["nproc"] == 1 and "error" not in r), None)
    lines = ["| GPUs | layout | s / forward | projected DiT s (40 steps) | speedup | efficiency | peak GB per GPU "
             "| attention "
             "| pred rel diff vs 1 GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['nproc']} | {r['layout']} | error: {r['error'][-120:]} | | | | | | |")
            continue
        dit = STEPS * r["per_step_s"]
        r["projected_dit_s"] = dit
        if base_row:
            r["speedup"] = STEPS * base_row["per_step_s"] / dit
            r["efficiency"] = r["speedup"] / r["nproc"]
        lines.append(f"| {r['nproc']} | {r['layout']} | {r['per_forward_s']:.3f} | {dit:.1f} | "
                     f"{r.get('speedup', float('nan')):.2f} | {r.get('efficiency', float('nan')):.0%} | "
                     f"{r['peak_gb']:.1f} | {r['backend']} | {r.get('pred_rel_diff', 0):.1e} |")
    record = {"env": environment(), "res": args.res, "frame_num": args.frame_num, "rows": rows}
    finish(record, args.out, lambda _: "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
