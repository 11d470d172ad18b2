"""Few-step rows beside their 40-step baseline, each in a fresh process, all in one run:

    python -m benchmarks.fewstep --res 720p --out benchmarks/results/h200_720p_fewstep.json

1. the 40-step `--fast` row (3+ timed denoising steps of the real loop, CFG on: two forwards per step) and its
   projected video time;
2. a whole few-step generation as `--distilled` runs it (random rank-64 LoRAs in the Lightning layout merged into
   random full-size experts, Euler, 4 steps, shift 5, guidance 1: one forward per step, `--fast` switches), the first
   video (compile included) and `--repeat` steady videos in the same process (what batch mode does), stage by stage;
3. VAE decode at this size in fp32 and bf16 with the error of bf16 against fp32 (the stages row);
4. each `--variant NAME=JSON` (option overrides, e.g. fp8): the same few-step generation with those options, its
   timing beside the baseline's and its error against the baseline's video (same weights, LoRAs, seed and prompt):

    python -m benchmarks.fewstep --res 720p --skip row,stages --options '{... "vae_dtype": "bf16"}' \
        --variant 'fp8 all + flash3_fp8={"fp8_linear": "all", "attn_backend": "flash3_fp8"}'

`--task i2v` runs the same rows with the image-to-video pipeline (the Lightning I2V LoRA layout, a 16:9 first frame
of the --res size: the t2v token count); its stages row adds the VAE encode of the condition (fp32 and bf16):

    python -m benchmarks.fewstep --task i2v --res 720p --out benchmarks/results/h100_720p_i2v_fewstep.json
Random weights bound timing and numerics, not quality: the quality of a few-step video depends on the LoRA.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.random_models import TASKS
from benchmarks.waterfall import environment, finish, projection, run_child
from wan.options import FAST_PRESET

DISTILLED = dict(solver="euler", sampling_steps=4, shift=5.0, guide=(1.0, 1.0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="720p", choices=["480p", "720p", "tiny"])
    p.add_argument("--task", default="t2v", choices=[t for t in TASKS if t != "ti2v"],
                   help="t2v, or i2v (the image-to-video pipeline); ti2v has no few-step LoRA")
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--steps", type=int, default=3, help="timed steps of the 40-step row")
    p.add_argument("--repeat", type=int, default=2, help="steady few-step videos after the first")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--options", default=json.dumps(FAST_PRESET), help="RuntimeOptions as JSON (default --fast)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: row,fewstep,stages")
    p.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="NAME=JSON",
                   help="another few-step row with these option overrides, compared with the baseline's video")
    p.add_argument("--deadline", type=float, default=560)
    p.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    left = lambda: args.deadline - (time.perf_counter() - t0)  # noqa: E731
    common = ["--res", args.res, "--frame_num", str(args.frame_num), "--task", args.task]
    skip = set(args.skip.split(",")) - {""}
    record = {"env": environment(), "task": args.task, "res": args.res, "frame_num": args.frame_num,
              "options": json.loads(args.options)}
    if "stages" not in skip:
        record["stages"] = run_child([*common, "stages", "--vae_dtypes", "fp32,bf16"], left())
        print(f"[{time.perf_counter() - t0:5.0f} s] stages: {json.dumps(record['stages'])[:300]}", flush=True)
    if "row" not in skip:
        row = run_child([*common, "row", "--steps", str(args.steps), "--options", args.options], left())
        if "error" not in row:
            row["projection"] = projection(row, json.loads(args.options), record.get("stages"))
        record["row_40_steps"] = row
        print(f"[{time.perf_counter() - t0:5.0f} s] 40-step row: {json.dumps(row)[:300]}", flush=True)
    if "fewstep" not in skip:
        d = DISTILLED
        few = [*common, "full", "--solver", d["solver"], "--sampling_steps", str(d["sampling_steps"]), "--shift",
               str(d["shift"]), "--guide", *map(str, d["guide"]), "--lora_rank", str(args.lora_rank), "--repeat",
               str(args.repeat)]
        with tempfile.TemporaryDirectory() as tmp:  # the baseline's latent and video, for the variants' errors
            ref = Path(tmp) / "baseline.pt"
            save = ["--save", str(ref)] if args.variant else []
            record["fewstep"] = run_child([*few, "--options", args.options, *save], left())
            print(f"[{time.perf_counter() - t0:5.0f} s] few-step: {json.dumps(record['fewstep'])[:300]}", flush=True)
            for name, overrides in args.variant:
                opts = json.dumps({**json.loads(args.options), **overrides})
                if not ref.is_file():
                    row = {"error": "the baseline few-step row wrote no video to compare with", "name": name}
                else:
                    row = {**run_child([*few, "--options", opts, "--ref", str(ref)], left()), "name": name}
                record.setdefault("variants", []).append(row)
                print(f"[{time.perf_counter() - t0:5.0f} s] {name}: {json.dumps(row)[:300]}", flush=True)
    record["wall_s"] = time.perf_counter() - t0
    finish(record, args.out, markdown)
    return 0


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME={"option": value, ...}' -> (NAME, overrides)."""
    name, sep, js = text.partition("=")
    try:
        overrides = json.loads(js) if sep else None
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: the part after '=' is not JSON ({e})") from None
    if not name.strip() or not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME={{JSON object of option overrides}}")
    return name.strip(), overrides


def _fewstep_line(name: str, few: dict) -> str:
    if "error" in few:
        return f"| {name} | error: {few['error'][-150:]} | | | | |"
    st = few["steady_video_s"]
    steady = few["runs"][1:] or few["runs"]
    stages = {k: round(sum(r["stages"].get(k, 0) for r in steady) / len(steady), 2) for k in steady[0]["stages"]}
    dit = stages.get("dit_high", 0) + stages.get("dit_low", 0)
    merge = sum(v for k, v in few.get("load_timings", {}).items() if k.startswith("lora_merge"))
    err = few.get("video_vs_ref")
    err = (f"; vs the baseline video: PSNR {err['psnr_mean_db']:.1f} dB (min {err['psnr_min_db']:.1f}), SSIM "
           f"{err['ssim_mean']:.4f}, latent rel diff {few['latent_rel_diff']:.1e}") if err else ""
    return (f"| {name} | {st['median']:.1f} (min {st['min']:.1f}, max {st['max']:.1f}, n {st['n']}); first video "
            f"{few['first_video_s']:.1f} | {dit / few['sampling_steps']:.3f} s | {few['sampling_steps']} | "
            f"{max(r['peak_gb'] for r in steady):.1f} / {max(r['peak_reserved_gb'] for r in steady):.1f} | "
            f"stages {json.dumps(stages)}; LoRA merge {merge:.1f} s; experts "
            f"{''.join(h[0] for h in few['runs'][-1]['expert_trace'])}{err} |")


def markdown(record: dict) -> str:
    env = record["env"]
    task = "image-to-video, " if record.get("task") == "i2v" else ""
    lines = [f"### {env.get('gpu', 'cpu')}, {task}{record['res']}, {record['frame_num']} frames, torch {env['torch']}, "
             f"commit {env['git_commit']}", "| row | seconds per video | per forward | forwards | peak GB "
             "(allocated / reserved) | notes |", "|---|---|---|---|---|---|"]
    row = record.get("row_40_steps")
    if row and "error" not in row:
        sp = row["step_spread"]
        video = row["projection"].get("video_s")
        lines.append(f"| 40 steps, CFG, --fast (projected) | {video if video is None else round(video, 1)} | "
                     f"{row['per_forward_s']:.3f} s (step median {sp['median']:.2f}, min {sp['min']:.2f}, max "
                     f"{sp['max']:.2f}, n {sp['n']}) | 80 | {row['peak_gb']:.1f} / {row['peak_reserved_gb']:.1f} "
                     f"| {row['backend']} |")
    elif row:
        lines.append(f"| 40 steps, CFG, --fast | error: {row['error'][-150:]} | | | | |")
    few = record.get("fewstep")
    if few:
        lines.append(_fewstep_line(f"4 steps, Euler, guidance 1, rank-{few.get('lora_rank', '?')} LoRAs, --fast "
                                   "(measured)", few))
    for row in record.get("variants", []):
        lines.append(_fewstep_line(f"4 steps, {row['name']}", row))
    st = record.get("stages")
    if st and "error" not in st and "vae" in st:
        for name, v in st["vae"].items():
            err = "" if name == "fp32" else (f"max abs {v['max_abs_vs_fp32']:.1e}, PSNR {v['psnr_vs_fp32_db']:.1f} dB "
                                             "vs fp32")
            lines.append(f"| VAE decode {name} | {v['decode_s']:.2f} | | | {v['peak_gb']:.1f} / "
                         f"{v['peak_reserved_gb']:.1f} | {err} |")
    if st and "error" not in st:
        for name, v in st.get("vae_encode", {}).items():
            err = "" if name == "fp32" else (f"max abs {v['max_abs_vs_fp32']:.1e}, rel {v['rel_vs_fp32']:.1e} vs fp32 "
                                             "(the condition's latent)")
            lines.append(f"| VAE encode of the condition, {name} | {v['encode_s']:.2f} | | | {v['peak_gb']:.1f} / "
                         f"{v['peak_reserved_gb']:.1f} | {err} |")
            if "reuse_encode_s" in v:
                same = "bit for bit the plain encode" if v["reuse_equal"] else "DIFFERS from the plain encode"
                lines.append(f"| VAE encode of the condition, {name}, --fast_encode | {v['reuse_encode_s']:.2f} | | | "
                             f"{v['reuse_peak_gb']:.1f} / {v['reuse_peak_reserved_gb']:.1f} | {same} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
