"""Memory tiers: the resident `--fast` row beside block-streamed rows under emulated smaller cards, one run, each row
a fresh process (`torch.cuda.set_per_process_memory_fraction` after the weights are placed):

    python -m benchmarks.memory_tiers --res 480p --caps 16,24 --out benchmarks/results/h200_480p_memory_tiers.json

Rows time 3+ real denoising steps (CFG, batch-2) and report the peak allocated / reserved memory under the cap.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.waterfall import environment, finish, run_child
from wan.options import FAST_PRESET


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="480p", choices=["480p", "720p", "tiny"])
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--caps", default="16,24", help="comma-separated GB caps for the streamed rows")
    p.add_argument("--slots", type=int, default=2, help="stream_blocks of the streamed rows")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--deadline", type=float, default=560)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    common = ["--res", args.res, "--frame_num", str(args.frame_num), "row", "--steps", str(args.steps)]
    rows = [("resident (--fast)", dict(FAST_PRESET), 0.0)]
    rows += [(f"block-streamed, {args.slots} slots, {cap} GB cap", {**FAST_PRESET, "stream_blocks": args.slots},
              float(cap)) for cap in args.caps.split(",")]
    record = {"env": environment(), "res": args.res, "frame_num": args.frame_num, "rows": []}
    for label, opts, cap in rows:
        left = args.deadline - (time.perf_counter() - t0)
        row = run_child([*common, "--options", json.dumps(opts), "--memory_cap_gb", str(cap)], left) \
            if left > 30 else {"error": "skipped: out of time"}
        row.update(label=label, options=opts)
        record["rows"].append(row)
        print(f"[{time.perf_counter() - t0:5.0f} s] {label}: " + (row.get("error") or
              f"{row['per_forward_s']:.3f} s/forward, peak {row['peak_gb']:.1f} / {row['peak_reserved_gb']:.1f} GB"),
              flush=True)
    finish(record, args.out, markdown)
    return 0


def markdown(record: dict) -> str:
    env = record["env"]
    lines = [f"### {env.get('gpu', 'cpu')}, {record['res']}, {record['frame_num']} frames, torch {env['torch']}, "
             f"commit {env['git_commit']}",
             "| row | s / forward (step median, min, max, n) | x resident | peak GB allocated / reserved | placement |",
             "|---|---|---|---|---|"]
    base = record["rows"][0] if "error" not in record["rows"][0] else None
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][-150:]} | | | |")
            continue
        sp = r["step_spread"]
        ratio = f"{r['per_forward_s'] / base['per_forward_s']:.3f}" if base else "-"
        lines.append(f"| {r['label']} | {r['per_forward_s']:.3f} ({sp['median']:.2f}, {sp['min']:.2f}, "
                     f"{sp['max']:.2f}, {sp['n']}) | {ratio} | {r['peak_gb']:.1f} / {r['peak_reserved_gb']:.1f} | "
                     f"{r['placement']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
