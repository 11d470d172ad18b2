"""The waterfall: the original path, then each speed switch added cumulatively, then --fast; each row in a fresh
process, all in one run, with the peer (diffusers) and the stage costs, and a 40-step projection per row.

    python -m benchmarks.waterfall --res 480p --full --out benchmarks/results/h200_480p.json
    python -m benchmarks.waterfall --res 720p --stages --peer --out benchmarks/results/h200_720p.json

Projected video seconds = text encoding (T5 to GPU, two prompts, back) + 40 x measured step + expert offload
transfers (original path only: 2 uploads + 2 downloads of one expert) + VAE decode. `--full` runs one whole
generation of the last row's options and reports measured vs projected.

`--task i2v` runs the rows with the image-to-video pipeline (36-channel experts, the condition y with every forward,
a 16:9 first frame: the t2v token count; its stages add the condition's VAE encode); `--beside_t2v` adds the last
row's options once more with the t2v pipeline, in the same run, for the I2V / T2V ratio per forward:

    python -m benchmarks.waterfall --task i2v --res 720p --rows 1,8 --beside_t2v --stages \
        --out benchmarks/results/h100_720p_i2v_waterfall.json
(row 1: the reference's 80 GB recipe, bf16 experts offloaded; row 8: --fast.)

`--cache_cost magcache,easycache` also times, in each row's process, a step whose DiT calls a step cache reuses
against a computed one (through the real loop), and projects MagCache's 40-step DiT and video time from the
measured computed step, the measured reused step and the schedule at its published settings (labelled "projected";
not for ti2v, which has no published ratio curve: its reused step is still measured):

    python -m benchmarks.waterfall --res 720p --rows 8 --cache_cost magcache,easycache \
        --out benchmarks/results/h100_720p_cache_projection.json

`--task ti2v` runs TI2V-5B (one 48-channel model, image mode: the first latent frame fixed, per-token timesteps) at
its 720p, 1280x704, and 121 frames; its projection is for its 50 steps:

    python -m benchmarks.waterfall --task ti2v --res 720p --rows 0,8 --stages --out h100_720p_ti2v_waterfall.json
(row 0: the original path, fp32 weights, as the reference runs on an 80 GB card; row 8: --fast.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.emulate import ENV as EMULATE_ENV
from benchmarks.random_models import TASKS

ROOT = Path(__file__).resolve().parents[1]

# (label, options added to the previous row); "derived" rows reuse the previous DiT run (only transfers change)
WATERFALL = [
    ("original path (cuDNN attention)", {"attn_backend": "cudnn"}),
    ("+ convert_model_dtype (bf16 weights)", {"convert_model_dtype": True}),
    ("+ offload_model false (experts resident)", {"offload_model": False}),
    ("+ fast_time_embedding", {"fast_time_embedding": True}),
    ("+ fast_rope", {"fast_rope": True}),
    ("+ batched_cfg", {"batched_cfg": True}),
    ("+ tf32", {"tf32": True}),
    ("+ compile (= --fast, cuDNN)", {"compile": True}),
    ("--fast (attention auto: FA3 if installed)", {"attn_backend": "auto"}),
    ("+ fused_qk_rope (Triton; not in --fast)", {"fused_qk_rope": True}),
]
DERIVED = {"+ offload_model false (experts resident)"}
STEPS = 40
STEPS_BY_TASK = {"ti2v": 50}  # the task's default steps, for the projection (else STEPS)


def run_child(args: list[str], timeout: float, nproc: int = 1) -> dict:
    """Run `python -m benchmarks.rows ...` in a fresh process (under torchrun when nproc > 1); return its RESULT
    json or an error record."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "benchmarks.rows", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(args)}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["process_s"] = time.perf_counter() - t0
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}", "cmd": " ".join(args)}


def projection(row: dict, opts: dict, stages: dict | None) -> dict:
    """Seconds of a 40-step video (50 for ti2v) for this row (stage costs from `stages` where measured); with a
    MagCache cost measured and projected in the row (`--cache_cost`), its DiT (and video) time from the schedule:
    cached_dit_s, cached_video_s."""
    steps = STEPS_BY_TASK.get(row.get("task"), STEPS)
    dit = steps * row["per_step_s"]
    out = {"dit_s": dit, "steps": steps}
    mag = (row.get("cache_cost") or {}).get("magcache")
    if mag and "projected_dit_s" in mag:
        out["cached_dit_s"] = mag["projected_dit_s"]
    else:
        mag = None
    if stages and "t5_encode_s" in stages:
        offload = opts.get("offload_model") is not False
        # T5 goes up to encode; only the offloading placement copies it back down (Resident encodes from a temporary
        # copy of pinned host weights and drops it: no down-copy; its upload is from pinned memory, faster than the
        # measured pageable one, so this still over-counts it)
        out["text_s"] = stages["t5_to_gpu_s"] + stages["t5_encode_s"] + (stages["t5_to_cpu_s"] if offload else 0.0)
        out["vae_s"] = stages["vae_decode_s"]
        if "vae_encode_s" in stages:  # image-to-video: the condition's encode
            out["encode_s"] = stages["vae_encode_s"]
        dtype = "bf16" if opts.get("convert_model_dtype") else "fp32"
        if offload and f"expert_{dtype}_to_gpu_s" in stages:
            out["offload_s"] = 2 * (stages[f"expert_{dtype}_to_gpu_s"] + stages[f"expert_{dtype}_to_cpu_s"])
        else:
            out["offload_s"] = 0.0
        out["video_s"] = out["dit_s"] + out["text_s"] + out["vae_s"] + out["offload_s"] + out.get("encode_s", 0.0)
        if mag:
            out["cached_video_s"] = out["video_s"] - out["dit_s"] + out["cached_dit_s"]
    return out


def git(*args: str) -> str | None:
    """`git ARGS` in this checkout (stdout, stripped), or None without git or .git, or when ROOT is not the top of
    its own repository: a tree copied inside another repository must not report that one's commits."""
    def run(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return run(*args) if Path(run("rev-parse", "--show-toplevel")).resolve() == ROOT else None
    except Exception:  # noqa: BLE001 - a copied tree without .git
        return None


def git_commit() -> str:
    """$GIT_COMMIT if set (a copied tree), else this checkout's HEAD (+ "-dirty"), else "unknown"."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    head = git("rev-parse", "--short", "HEAD")
    if head is None:
        return "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "git_commit": git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    if os.environ.get(EMULATE_ENV):  # every row process runs as on a card of this size (benchmarks/emulate.py)
        env["emulated_gpu_gib"] = float(os.environ[EMULATE_ENV])
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="480p", choices=["480p", "720p", "tiny"])
    p.add_argument("--frame_num", type=int, default=None, help="frames (default: 81; 121 for ti2v)")
    p.add_argument("--task", default="t2v", choices=TASKS,
                   help="t2v, i2v (the image-to-video pipeline) or ti2v (TI2V-5B, its image mode)")
    p.add_argument("--beside_t2v", action="store_true",
                   help="with --task i2v: the last row's options once more on the t2v pipeline (same tokens)")
    p.add_argument("--steps", type=int, default=3, help="timed denoising steps per row (median reported)")
    p.add_argument("--original_attn", default="cudnn", help="attention of the original-path row (sdpa on CPU)")
    p.add_argument("--rows", default="all", help="comma-separated row indices, or all")
    p.add_argument("--stages", action="store_true", help="measure T5, VAE and offload transfers")
    p.add_argument("--peer", action="store_true", help="diffusers WanTransformer3DModel forward")
    p.add_argument("--full", action="store_true", help="one whole 40-step generation with the last row's options")
    p.add_argument("--repeat", type=int, default=1, help="steady generations after the first in the --full process")
    p.add_argument("--profile", default=None, help="profiler summary of one forward of the last row, to this file")
    p.add_argument("--cache_cost", default=None, metavar="METHODS",
                   help="per row: a reused step of these step caches (magcache, easycache) against a computed one, "
                        "and MagCache's projected 40-step time")
    p.add_argument("--deadline", type=float, default=560, help="seconds: skip what would start after this")
    p.add_argument("--out", default=None, help="JSON result file")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    left = lambda: args.deadline - (time.perf_counter() - t_start)  # noqa: E731
    if args.beside_t2v and args.task != "i2v":
        p.error("--beside_t2v compares the i2v rows with t2v: add --task i2v")
    if args.frame_num is None:
        args.frame_num = 121 if args.task == "ti2v" else 81
    common = ["--res", args.res, "--frame_num", str(args.frame_num)]
    record = {"env": environment(), "res": args.res, "frame_num": args.frame_num, "steps_timed": args.steps,
              "rows": [], "stages": None, "peer": None, "full": None}
    if args.task != "t2v":  # t2v records keep their old shape (benchmarks.report reads the committed ones)
        record["task"] = args.task
        common += ["--task", args.task]
    tmp = Path(tempfile.mkdtemp())
    ref = tmp / "original.pt"
    selected = range(len(WATERFALL)) if args.rows == "all" else [int(i) for i in args.rows.split(",")]
    opts: dict = {}
    prev = None
    for i, (label, add) in enumerate(WATERFALL):
        opts = {**opts, **add}
        if i == 0:
            opts["attn_backend"] = args.original_attn
        if i not in selected:
            continue
        if label in DERIVED and prev is not None and "error" not in prev:
            row = {**prev, "derived_from_previous": True}
        elif left() < 20:
            row = {"error": "skipped: out of time"}
        else:
            extra = ["--save", str(ref)] if i == 0 else (["--ref", str(ref)] if ref.exists() else [])
            if args.profile and i == len(WATERFALL) - 1:
                extra += ["--profile", args.profile]
            if args.cache_cost:
                extra += ["--cache_cost", args.cache_cost]
            row = run_child([*common, "row", "--steps", str(args.steps), "--options", json.dumps(opts)] + extra, left())
            row.pop("options", None)
        row.update(label=label, options=dict(opts))
        if "error" not in row:
            row["projection"] = projection(row, opts, record["stages"])
        record["rows"].append(row)
        prev = row
        print(f"[{time.perf_counter() - t_start:6.0f} s] {label}: "
              + (row.get("error") or f"{row['per_forward_s']:.3f} s/forward"), flush=True)

    if args.beside_t2v and record["rows"] and left() > 20:
        last = record["rows"][-1]
        t2v_common = [c for c in common if c not in ("--task", args.task)]
        row = run_child([*t2v_common, "row", "--steps", str(args.steps), "--options", json.dumps(last["options"])],
                        left())
        row.update(label=f"t2v beside: {last['label']}", options=dict(last["options"]))
        record["t2v_beside"] = row
        print(f"[{time.perf_counter() - t_start:6.0f} s] t2v beside: "
              + (row.get("error") or f"{row['per_forward_s']:.3f} s/forward"), flush=True)

    if args.stages and left() > 30:
        record["stages"] = run_child([*common, "stages", "--transfers"], left())
        print(f"[{time.perf_counter() - t_start:6.0f} s] stages: {record['stages']}", flush=True)
        for row in record["rows"]:
            if "error" not in row:
                row["projection"] = projection(row, row["options"], record["stages"])
    if args.peer and args.task != "t2v":
        print("peer: measured for t2v only; skipped", flush=True)
    elif args.peer and left() > 30:
        record["peer"] = run_child([*common, "peer", "--steps", str(args.steps)], left())
        print(f"[{time.perf_counter() - t_start:6.0f} s] peer: {record['peer']}", flush=True)
    if args.full and left() > 60:
        sampling = ["--sampling_steps", "50", "--shift", "5", "--guide", "5", "5"] if args.task == "ti2v" else []
        full = run_child([*common, "full", "--options", json.dumps(opts), "--repeat", str(args.repeat), *sampling],
                         left())
        record["full"] = full
        last = record["rows"][-1] if record["rows"] else {}
        if "error" not in full and "video_s" in last.get("projection", {}):
            run = full["runs"][-1]
            st = run["stages"]
            measured_dit = st.get("dit_high", 0) + st.get("dit_low", 0)
            full["projected_dit_s"] = last["projection"]["dit_s"]
            full["measured_dit_s"] = measured_dit
            full["projection_error"] = last["projection"]["dit_s"] / measured_dit - 1
            full["projected_video_s"] = last["projection"]["video_s"]
            full["video_projection_error"] = last["projection"]["video_s"] / run["total_s"] - 1
        print(f"[{time.perf_counter() - t_start:6.0f} s] full: {json.dumps(full)[:400]}", flush=True)

    record["wall_s"] = time.perf_counter() - t_start
    finish(record, args.out, markdown)
    return 0


def finish(record: dict, out: str | None, table) -> None:
    """Write the run's record to `out` (JSON) if given, then print its markdown table last."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2))
    print(table(record))


def markdown(record: dict) -> str:
    rows = record["rows"]
    base = next((r for r in rows if "error" not in r), None)
    task = {"i2v": "image-to-video, ", "ti2v": "TI2V-5B image mode, "}.get(record.get("task"), "")
    lines = [f"### {record['env'].get('gpu', 'cpu')}, {task}{record['res']}, {record['frame_num']} frames, torch "
             f"{record['env']['torch']}, commit {record['env']['git_commit']}",
             "| row | s / forward | TFLOP/s | projected video s | x vs original | x vs previous | peak GB | attention "
             "| pred rel diff | latent max / mean diff |", "|" + "---|" * 10]
    prev = None
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][-150:]} |" + " |" * 8)
            continue
        video = r["projection"].get("video_s")
        key = "video_s" if video is not None else "dit_s"
        speed = base["projection"][key] / r["projection"][key]
        vs_prev = prev["projection"][key] / r["projection"][key] if prev else 1.0
        if r is base:
            diff = ("(reference)", "(reference)")
        elif "pred_rel_diff" not in r:  # never compared with the original path: say so, never print a zero
            diff = ("not compared", "not compared")
        else:
            diff = (f"{r['pred_rel_diff']:.1e}", f"{r['latent_max_abs_diff']:.1e} / {r['latent_mean_abs_diff']:.1e}")
        lines.append(f"| {r['label']} | {r['per_forward_s']:.3f} | {r['tflops']:.0f} | "
                     f"{'-' if video is None else round(video, 1)} | {speed:.2f} | {vs_prev:.2f} | "
                     f"{r['peak_gb']:.1f} ({r['resident_experts']} expert{'s' if r['resident_experts'] > 1 else ''}) | "
                     f"{r['backend']} | {diff[0]} | {diff[1]} |")
        prev = r
    for r in rows:
        for method, c in (r.get("cache_cost") or {}).items() if "error" not in r else ():
            line = (f"\n{r['label']}, --cache {method}: a reused step {c['reused_step_s']:.3f} s against a computed "
                    f"{c['computed_step_s']:.3f} s ({c['reused_over_computed']:.1%}; measured)")
            if "projected_dit_s" in c:
                n = len(c["schedule_reused_steps"])
                proj = r["projection"]
                steps = proj.get("steps", STEPS)
                video = (f", video {proj['video_s']:.1f} -> {proj['cached_video_s']:.1f} s"
                         if "cached_video_s" in proj else "")
                line += (f"; projected from these and the schedule ({steps - n} of {steps} steps computed): DiT "
                         f"{c['dit_s']:.1f} -> {c['projected_dit_s']:.1f} s ({c['projected_dit_ratio']:.3f}x){video}")
            lines.append(line)
    beside = record.get("t2v_beside")
    if beside and "error" not in beside and rows and "error" not in rows[-1]:
        ratio = rows[-1]["per_forward_s"] / beside["per_forward_s"]
        lines.append(f"| {beside['label']} | {beside['per_forward_s']:.3f} | {beside['tflops']:.0f} | | | | "
                     f"{beside['peak_gb']:.1f} | {beside['backend']} | i2v / t2v per forward: {ratio:.3f} | |")
    elif beside:
        lines.append(f"| t2v beside | error: {beside.get('error', '?')[-150:]} |" + " |" * 8)
    peer = record.get("peer")
    if peer and "error" not in peer:
        sp = (peer.get("batch1") or {}).get("forward_s")  # older files: one timed forward, no spread
        spread = f" (min {sp['min']:.3f}, max {sp['max']:.3f}, n {sp['n']})" if isinstance(sp, dict) else ""
        lines.append(f"| peer: {peer['peer']} | {peer['per_forward_s']:.3f}{spread} | | | | | "
                     f"{peer['peak_gb']:.1f} | default | | |")
    st = record.get("stages")
    if st and "error" not in st:
        lines.append(f"\nstages: T5 encode {st['t5_encode_s']:.2f} s (+{st['t5_to_gpu_s']:.2f} s up, "
                     f"{st['t5_to_cpu_s']:.2f} s down), VAE decode {st['vae_decode_s']:.2f} s "
                     f"({st['vae_peak_gb']:.1f} GB), expert upload bf16 {st.get('expert_bf16_to_gpu_s', 0):.1f} s / "
                     f"fp32 {st.get('expert_fp32_to_gpu_s', 0):.1f} s"
                     + (f"; VAE encode of the condition {st['vae_encode_s']:.2f} s ({st['vae_encode_peak_gb']:.1f} GB)"
                        if "vae_encode_s" in st else ""))
    full = record.get("full")
    if full and "error" not in full:
        run = full["runs"][-1]
        lines.append(f"\nfull generation ({full['sampling_steps']} steps, {full['backend']}): {run['total_s']:.1f} s "
                     f"total, stages {json.dumps({k: round(v, 2) for k, v in run['stages'].items()})}, peak "
                     f"{run['peak_gb']:.1f} GB" + (f"; DiT projected {full['projected_dit_s']:.1f} s vs measured "
                                                 f"{full['measured_dit_s']:.1f} s ({full['projection_error']:+.1%}); "
                                                 f"video projected {full['projected_video_s']:.1f} s vs measured "
                                                 f"{run['total_s']:.1f} s ({full['video_projection_error']:+.1%})"
                                                 if "projection_error" in full else ""))
        if len(full["runs"]) > 1:
            lines.append("repeat: " + ", ".join(f"{r['total_s']:.1f} s / {r['peak_gb']:.1f} GB" for r in full["runs"]))
    elif full:
        lines.append(f"\nfull generation: {full['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
