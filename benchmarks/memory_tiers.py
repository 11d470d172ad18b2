"""Memory tiers: the resident `--fast` row beside block-streamed rows under emulated smaller cards, one run, each row
a fresh process (`torch.cuda.set_per_process_memory_fraction` after the weights are placed):

    python -m benchmarks.memory_tiers --res 480p --caps 16,24 --out benchmarks/results/h200_480p_memory_tiers.json

Rows time 3+ real denoising steps (CFG, batch-2) and report the peak allocated / reserved memory under the cap;
streamed rows then profile one more step for the copy/compute overlap (benchmarks/overlap.py).
`--whole_run GB` adds one whole generation through the product path `--fast --max_gpu_memory GB` (the memory plan
picks placement and VAE bands; T5 + 4 Euler steps with CFG over both experts + VAE decode) and its peak memory.
`--task ti2v`: TI2V-5B in its image mode at 1280x704 and 121 frames (one model; the whole run encodes the image).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from benchmarks.random_models import TASKS
from benchmarks.waterfall import environment, finish, run_child
from wan.options import FAST_PRESET, fast_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="480p", choices=["480p", "720p", "tiny"])
    p.add_argument("--frame_num", type=int, default=None, help="frames (default: 81; 121 for ti2v)")
    p.add_argument("--task", default="t2v", choices=TASKS, help="t2v, i2v or ti2v (TI2V-5B)")
    p.add_argument("--caps", default="16,24", help="comma-separated GB caps for the streamed rows")
    p.add_argument("--slots", type=int, default=2, help="stream_blocks of the streamed rows")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ffn_chunks", type=int, default=0,
                   help="also a streamed row under the smallest cap with the FFN over this many token chunks")
    p.add_argument("--whole_run", type=float, default=0, help="GB: also one whole generation under this budget")
    p.add_argument("--only_whole_run", action="store_true",
                   help="skip the resident and streamed rows: the whole run alone (it needs the call's time)")
    p.add_argument("--deadline", type=float, default=560)
    p.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.only_whole_run and not args.whole_run:
        p.error("--only_whole_run needs --whole_run GB")
    if args.frame_num is None:
        args.frame_num = 121 if args.task == "ti2v" else 81
    t0 = time.perf_counter()
    # one expert serves both noise levels: the timed steps run one expert anyway, and building and pinning a second
    # 28.6 GB expert would only cost minutes of the call
    task = ["--task", args.task] if args.task != "t2v" else []
    common = ["--res", args.res, "--frame_num", str(args.frame_num), *task, "row", "--steps", str(args.steps),
              "--experts", "1"]
    rows = [("resident (--fast)", dict(FAST_PRESET), 0.0)]
    rows += [(f"block-streamed, {args.slots} slots, {cap} GB cap", {**FAST_PRESET, "stream_blocks": args.slots},
              float(cap)) for cap in args.caps.split(",")]
    if args.ffn_chunks:
        cap = min(float(c) for c in args.caps.split(","))
        rows.append((f"block-streamed, {args.slots} slots, {cap:g} GB cap, FFN in {args.ffn_chunks} token chunks",
                     {**FAST_PRESET, "stream_blocks": args.slots, "ffn_chunks": args.ffn_chunks}, cap))
    if args.only_whole_run:
        rows = []
    record = {"env": environment(), "res": args.res, "frame_num": args.frame_num, "rows": []}
    if args.task != "t2v":
        record["task"] = args.task
    for label, opts, cap in rows:
        left = args.deadline - (time.perf_counter() - t0)
        overlap = ["--overlap"] if opts.get("stream_blocks") else []
        row = run_child([*common, "--options", json.dumps(opts), "--memory_cap_gb", str(cap), *overlap], left) \
            if left > 30 else {"error": "skipped: out of time"}
        row.update(label=label, options=opts)
        record["rows"].append(row)
        print(f"[{time.perf_counter() - t0:5.0f} s] {label}: " + (row.get("error") or
              f"{row['per_forward_s']:.3f} s/forward, peak {row['peak_gb']:.1f} / {row['peak_reserved_gb']:.1f} GB"),
              flush=True)
    if args.whole_run:
        left = args.deadline - (time.perf_counter() - t0)
        opts = fast_options(max_gpu_memory=args.whole_run).changed()  # as `--fast --max_gpu_memory GB`
        guide = ["5", "5"] if args.task == "ti2v" else ["3", "4"]
        run = run_child(["--res", args.res, "--frame_num", str(args.frame_num), *task, "full", "--options",
                         json.dumps(opts), "--sampling_steps", "4", "--solver", "euler", "--shift", "5", "--guide",
                         *guide, "--repeat", "0"], left) if left > 60 else {"error": "skipped: out of time"}
        run.update(budget_gb=args.whole_run, requested=opts)
        record["whole_run"] = run
        print(f"[{time.perf_counter() - t0:5.0f} s] whole run under {args.whole_run:g} GB: " + (run.get("error") or
              f"{run['first_video_s']:.1f} s, peak {run['runs'][0]['peak_gb']:.1f} / "
              f"{run['runs'][0]['peak_reserved_gb']:.1f} GB"), flush=True)
    finish(record, args.out, markdown)
    return 0


def _overlap_note(ov: dict | None) -> str:
    if not ov or not ov.get("block_copies"):
        return ""
    return (f"; profiled step: {ov['block_copies']} block copies, {ov['copy_ms_total']:.0f} ms, "
            f"{100 * ov['covered_fraction']:.0f}% under compute")


def markdown(record: dict) -> str:
    env = record["env"]
    task = f"{record['task']}, " if record.get("task") else ""
    lines = [f"### {env.get('gpu', 'cpu')}, {task}{record['res']}, {record['frame_num']} frames, torch {env['torch']}, "
             f"commit {env['git_commit']}"]
    if record["rows"]:  # none with --only_whole_run
        lines += ["| row | s / forward (step median, min, max, n) | x resident | peak GB allocated / reserved | "
                  "placement |", "|---|---|---|---|---|"]
    base = record["rows"][0] if record["rows"] and "error" not in record["rows"][0] else None
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][-150:]} | | | |")
            continue
        sp = r["step_spread"]
        ratio = f"{r['per_forward_s'] / base['per_forward_s']:.3f}" if base else "-"
        label = r["label"] + (" (one expert built, serving both levels)" if r.get("experts_built") == 1 else "")
        lines.append(f"| {label} | {r['per_forward_s']:.3f} ({sp['median']:.2f}, {sp['min']:.2f}, "
                     f"{sp['max']:.2f}, {sp['n']}) | {ratio} | {r['peak_gb']:.1f} / {r['peak_reserved_gb']:.1f} | "
                     f"{r['placement']}{_overlap_note(r.get('overlap'))} |")
    run = record.get("whole_run")
    if run:
        lines += ["", f"Whole generation under `--fast --max_gpu_memory {run['budget_gb']:g}` (T5, 4 Euler steps with "
                  "CFG over both experts, VAE decode; first video of the process, compile included):", ""]
        if "error" in run:
            lines.append(f"error: {run['error'][-300:]}")
        else:
            first = run["runs"][0]
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in first["stages"].items())
            lines += [f"- plan: {run['memory_plan']}; allocator {run['allocator']}",
                      f"- placement: {run['placement']}",
                      f"- {run['first_video_s']:.1f} s ({stages}); peak {first['peak_gb']:.1f} GB allocated, "
                      f"{first['peak_reserved_gb']:.1f} GB reserved"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
