"""The fp8 tier on one random full-size expert, in one process: every variant sees the same bf16 weights and inputs.

    python -m benchmarks.fp8 --res 720p --out benchmarks/results/h200_720p_fp8.json      # 4.5 min on an H200 (measured)
    python -m benchmarks.fp8 --drift --out benchmarks/results/h200_fp8_drift.json         # 480p x 17 frames, 35 s
    python -m benchmarks.fp8 --res tiny --device cpu --frame_num 5 --steps 1               # CPU smoke (emulated fp8)

Forward mode (the default):
1. the block's GEMMs alone at the real token count: bf16 `F.linear` against `torch._scaled_mm` with row-wise scales
   (fast accumulation off, as Fp8Linear runs, and on), the activation's quantisation timed apart (compiled), errors
   against fp32;
2. the variants (VARIANTS), each configured and compiled as the pipeline does it (`WanModel.configure` with the
   --fast forms, `compile_blocks`), TF32 and bf16 autocast on: one warm-up forward at the real shape (compile
   included), then --steps timed batch-1 forwards (median, min, max) with the SM clock and power after each, the peak
   memory, the blocks' weight bytes, the prediction's error against the bf16 forward (||a - b|| / ||b|| over the whole
   prediction, max abs), and the error of block --block fed the same hidden state (its output, and its update
   out - in). fp8 variants are twins of the bf16 expert over the same tensors (only converted linears are new
   tensors: about 12 GB more for `all`). A variant that would end after --deadline is recorded as skipped.
Drift mode (--drift): the real denoising loop (`WanT2V.sample` over two random experts, Euler, 4 steps, shift 5,
guidance 1: what the distilled LoRAs run) at a small size, per variant: the latent's error after the steps and the
first step's prediction error, against bf16. Random weights bound the numerics, not the quality of real videos.
On the CPU the fp8 kernels are the emulated ones (`fp8_kernel="emulated"`): a smoke run of this script, not a number.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.random_models import random_expert
from benchmarks.rows import gpu_state, inputs, peak_gb, reset_peak, spread, sync
from benchmarks.waterfall import environment, finish

VARIANTS = [  # (label, fp8_linear, attention backend)
    ("bf16 (--fast, flash3)", "none", "flash3"),
    ("fp8_linear ffn", "ffn", "flash3"),
    ("fp8_linear all", "all", "flash3"),
    ("flash3_fp8 attention, bf16 linears", "none", "flash3_fp8"),
    ("fp8_linear all + flash3_fp8", "all", "flash3_fp8"),
]
GEMMS = [("self q k v o, cross q o", 5120, 5120), ("ffn.0", 5120, 13824), ("ffn.2", 13824, 5120)]
TIMESTEP = 937.0
DRIFT = dict(solver="euler", shift=5.0, guide=(1.0, 1.0))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def twin(model):
    """A WanModel over the same tensors as `model` (no copy): converting the twin's linears replaces them in the twin
    only, so every variant starts from identical bf16 weights."""
    from wan.modules.model import WanModel

    with torch.device("meta"):
        out = WanModel.from_config(model.config)
    out.load_state_dict(model.state_dict(), assign=True)
    return out.eval().requires_grad_(False)


def attention_for(name: str, device: torch.device):
    """The real backend on a GPU; on the CPU sdpa for flash3 and the emulated fp8 attention (applied to every call:
    tiny sequences are shorter than FP8_MIN_KEYS, and a smoke run should exercise it)."""
    from wan.modules.attention import emulated_fp8_attention, resolve_attention

    if device.type == "cuda":
        return resolve_attention(name, device)
    return emulated_fp8_attention(min_keys=0) if name == "flash3_fp8" else resolve_attention("sdpa", device)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def cuda_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of `fn()` (CUDA events) after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def run_gemms(tokens: int, device: torch.device) -> list[dict]:
    """The three linear shapes of a block, M = tokens: bf16 vs fp8 (row-wise scales) alone, errors vs fp32."""
    from wan.modules.fp8 import quantize, quantize_weight

    quant = torch.compile(lambda x: quantize(x, dim=1), dynamic=False)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, k, n in GEMMS:
        x = torch.randn(tokens, k, device=device, generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, device=device, generator=g) * k ** -0.5).to(torch.bfloat16)
        b = (torch.randn(n, device=device, generator=g) * 0.02).to(torch.bfloat16)
        ref = torch.addmm(b.float(), x.float(), w.float().t())  # fp32 (TF32 is off by default)
        w8, sw = quantize_weight(w)
        x8, sx = quant(x)
        flops = 2 * tokens * k * n
        row = dict(gemm=name, k=k, n=n, tokens=tokens)
        row["bf16_ms"] = cuda_ms(lambda: F.linear(x, w, b))
        row["bf16_rel_err"] = rel(F.linear(x, w, b), ref)
        row["quantize_x_ms"] = cuda_ms(lambda: quant(x))
        for fast in (False, True):
            def mm():
                return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.view(1, -1), bias=b,
                                        out_dtype=torch.bfloat16, use_fast_accum=fast)

            key = "fp8_fast_accum" if fast else "fp8"
            row[f"{key}_ms"] = cuda_ms(mm)
            row[f"{key}_rel_err"] = rel(mm(), ref)
        for key in ("bf16", "fp8", "fp8_fast_accum"):
            row[f"{key}_tflops"] = flops / row[f"{key}_ms"] / 1e9
        rows.append(row)
        print(f"  GEMM {name} {k}x{n}: bf16 {row['bf16_ms']:.2f} ms, fp8 {row['fp8_ms']:.2f} ms "
              f"(fast accum {row['fp8_fast_accum_ms']:.2f}), quantise x {row['quantize_x_ms']:.2f} ms", flush=True)
    torch.cuda.empty_cache()
    return rows


def _block_weights_gb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.blocks.parameters()) / 1e9


@torch.no_grad()
def run_forward(args, device: torch.device, left) -> dict:
    from wan.modules.fp8 import convert_linears_to_fp8_
    from wan.text2video import backend_flags
    from wan.utils.compile import compile_blocks

    cuda, tiny = device.type == "cuda", args.res == "tiny"
    kernel = "scaled_mm" if cuda else "emulated"
    out: dict = {"kernel": kernel, "compile": args.compile, "variants": []}
    t0 = time.perf_counter()
    model = random_expert(device, torch.bfloat16 if cuda else torch.float32, seed=0, tiny=tiny)
    sync(device)
    out["build_s"] = time.perf_counter() - t0
    noise, ctx, _, seq_len = inputs(args.res, device, args.frame_num)
    out["tokens"] = seq_len
    t = torch.tensor([TIMESTEP], device=device)
    flops = model.estimate_flops(seq_len)
    if cuda and "gemm" not in args.skip:
        out["gemms"] = run_gemms(seq_len, device)
    index = min(args.block, len(model.blocks) - 1)
    out["block_index"] = index

    def forward(m):
        with autocast(device), backend_flags(tf32=True):
            return m([noise], t, ctx, seq_len)[0]

    def block_call(m, x, emb):
        with autocast(device), backend_flags(tf32=True):
            return m.blocks[index](x, emb["e0"], emb["seq_lens"], emb["rope"], emb["context"], None)

    ref_pred = ref_block = block_in = emb = None
    prev = None
    selected = range(len(VARIANTS)) if args.variants == "all" else [int(i) for i in args.variants.split(",")]
    for i, (label, which, attn) in enumerate(VARIANTS):
        if i not in selected:
            continue
        entry = dict(label=label, fp8_linear=which)
        need = 10 + (prev["warmup_s"] + args.steps * prev["per_forward_s"] if prev else 0)
        if left() < need:
            entry["skipped"] = f"out of time: needs about {need:.0f} s, {left():.0f} s left before --deadline"
            out["variants"].append(entry)
            print(f"[{label}] {entry['skipped']}", flush=True)
            continue
        m = model if i == 0 else twin(model)
        summary = convert_linears_to_fp8_(m, which, kernel, device)
        attention = attention_for(attn, device)
        m.configure(attention, fast_rope=True, fast_time_embedding=True)
        if args.compile:
            compile_blocks(m)
        sync(device)
        t1 = time.perf_counter()
        pred = forward(m)  # warm-up at the real shape: compile, autotuning, FA3 and cuBLAS plans
        sync(device)
        entry.update(fp8=summary.describe(), attention=attention.name, warmup_s=time.perf_counter() - t1)
        reset_peak(device)
        resident = torch.cuda.memory_allocated(device) if cuda else 0
        times, gpu = [], []
        for _ in range(args.steps):
            sync(device)
            t1 = time.perf_counter()
            pred = forward(m)
            sync(device)
            times.append(time.perf_counter() - t1)
            gpu.append(gpu_state(device))  # outside the timed window
        per = statistics.median(times)
        entry.update(forward_s=spread(times), per_forward_s=per, tflops=flops / per / 1e12, gpu=gpu, **peak_gb(device),
                     resident_gb=resident / 1e9, block_weights_gb=_block_weights_gb(m))
        entry["peak_above_resident_gb"] = entry["peak_gb"] - entry["resident_gb"]
        pred = pred.float()
        if i == 0:
            ref_pred = pred
            # the hidden state entering block `index` in the bf16 model, and the embeddings every variant shares
            with autocast(device), backend_flags(tf32=True):
                x, _, e0, seq_lens, _, rope, context = model.embed([noise], t, ctx, seq_len)
                emb = dict(e0=e0, seq_lens=seq_lens, rope=rope, context=context)
                for block in model.blocks[:index]:
                    x = block(x, e0, seq_lens, rope, context, None)
            block_in = x
            ref_block = block_call(m, block_in, emb).float()
        elif ref_pred is not None:
            entry.update(pred_rel_err=rel(pred, ref_pred), pred_max_abs=max_abs(pred, ref_pred))
            got = block_call(m, block_in, emb).float()
            entry.update(block_rel_err=rel(got, ref_block),
                         block_update_rel_err=rel(got - block_in.float(), ref_block - block_in.float()))
        out["variants"].append(entry)
        prev = entry
        print(f"[{label}] {per:.3f} s/forward (warm-up {entry['warmup_s']:.1f} s), peak {entry['peak_gb']:.1f} GB"
              + (f", pred rel err {entry['pred_rel_err']:.2e}" if "pred_rel_err" in entry else ""), flush=True)
        if m is not model:
            del m
        del pred
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def run_drift(args, device: torch.device, left) -> dict:
    from wan.configs import WAN_CONFIGS
    from wan.options import RuntimeOptions
    from wan.text2video import WanT2V

    cuda, tiny = device.type == "cuda", args.res == "tiny"
    kernel = "scaled_mm" if cuda else "emulated"
    dtype = torch.bfloat16 if cuda else torch.float32
    high, low = (random_expert(device, dtype, seed=s, tiny=tiny) for s in (0, 1))
    noise, ctx, _, seq_len = inputs(args.res, device, args.frame_num)
    cfg = WAN_CONFIGS["t2v-tiny" if tiny else "t2v-A14B"]
    out: dict = {"kernel": kernel, "compile": args.compile, "tokens": seq_len, "steps": args.drift_steps, **DRIFT,
                 "variants": []}
    ref = None
    for label, which, attn in VARIANTS:
        entry = dict(label=label, fp8_linear=which)
        if left() < 30:
            entry["skipped"] = "out of time before --deadline"
            out["variants"].append(entry)
            continue
        opts = RuntimeOptions(offload_model=False, convert_model_dtype=cuda, tf32=True, fast_rope=True,
                              fast_time_embedding=True, compile=args.compile, fp8_linear=which,
                              attn_backend=attn if cuda or attn == "flash3_fp8" else "sdpa")
        comps = dict(text_encoder=None, vae=None, low_noise_model=twin(low), high_noise_model=twin(high))
        t1 = time.perf_counter()
        pipe = WanT2V(cfg, None, device=device, options=opts, components=comps, fp8_kernel=kernel)
        preds, trace = [], []

        def on_step(i, t, expert, pred):
            preds.append(pred.float())
            trace.append(expert)

        latent = pipe.sample(noise, ctx, None, seq_len, DRIFT["solver"], args.drift_steps, DRIFT["shift"],
                             DRIFT["guide"], step_callback=on_step)
        sync(device)
        entry.update(seconds=time.perf_counter() - t1, backends=pipe.backends(), load_timings=pipe.load_timings,
                     expert_trace=trace)
        latent = latent.float()
        if ref is None:
            ref = (latent, preds[0])
        else:
            entry.update(latent_rel_err=rel(latent, ref[0]), latent_max_abs=max_abs(latent, ref[0]),
                         first_pred_rel_err=rel(preds[0], ref[1]))
        out["variants"].append(entry)
        print(f"[drift {label}] {entry['seconds']:.1f} s" + (f", latent rel err {entry['latent_rel_err']:.2e}"
                                                              if "latent_rel_err" in entry else ""), flush=True)
        del pipe, comps
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    from wan.cli import str2bool

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default=None, choices=["480p", "720p", "tiny"], help="default: 720p, 480p with --drift")
    p.add_argument("--frame_num", type=int, default=None, help="default: 81, 17 with --drift")
    p.add_argument("--steps", type=int, default=3, help="timed forwards per variant")
    p.add_argument("--block", type=int, default=20, help="the block whose error is measured alone")
    p.add_argument("--variants", default="all", help="comma-separated VARIANTS indices, or all")
    p.add_argument("--skip", default="", help="forward mode: 'gemm' skips the GEMM-alone section")
    p.add_argument("--compile", type=str2bool, default=None,
                   help="compile the blocks (default: on a GPU in forward mode, off with --drift)")
    p.add_argument("--drift", action="store_true", help="latent drift of a 4-step Euler run instead of forwards")
    p.add_argument("--drift_steps", type=int, default=4)
    p.add_argument("--deadline", type=float, default=520, help="seconds: skip variants that would end after this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.res = args.res or ("480p" if args.drift else "720p")
    args.frame_num = args.frame_num or (17 if args.drift else 81)
    if args.compile is None:
        args.compile = device.type == "cuda" and not args.drift
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    t_start = time.perf_counter()
    left = lambda: args.deadline - (time.perf_counter() - t_start)  # noqa: E731
    record = {"env": environment(), "mode": "drift" if args.drift else "forward", "res": args.res,
              "frame_num": args.frame_num, "device": str(device)}
    record.update((run_drift if args.drift else run_forward)(args, device, left))
    record["wall_s"] = time.perf_counter() - t_start
    finish(record, args.out, markdown)
    return 0


def markdown(record: dict) -> str:
    env = record["env"]
    lines = [f"### fp8 {record['mode']}: {env.get('gpu', 'cpu')}, {record['res']}, {record['frame_num']} frames "
             f"({record['tokens']} tokens), kernel {record['kernel']}, compile {record['compile']}, torch "
             f"{env['torch']}, commit {env['git_commit']}"]
    if record["mode"] == "drift":
        lines += [f"{record['steps']} steps {record['solver']}, shift {record['shift']}, guidance 1, two random "
                  "experts",
                  "| variant | latent rel err vs bf16 | latent max abs | step-1 prediction rel err | seconds |",
                  "|---|---|---|---|---|"]
        for v in record["variants"]:
            if "skipped" in v:
                lines.append(f"| {v['label']} | skipped: {v['skipped']} | | | |")
            elif "latent_rel_err" in v:
                lines.append(f"| {v['label']} | {v['latent_rel_err']:.2e} | {v['latent_max_abs']:.2e} | "
                             f"{v['first_pred_rel_err']:.2e} | {v['seconds']:.1f} |")
            else:
                lines.append(f"| {v['label']} | (reference) | | | {v['seconds']:.1f} |")
        return "\n".join(lines)
    gemms = record.get("gemms")
    if gemms:
        lines += ["| GEMM (M = tokens) | K x N | bf16 ms (TFLOP/s) | fp8 ms (TFLOP/s) | fp8 fast accum ms (TFLOP/s) | "
                  "quantise x ms | rel err bf16 / fp8 / fp8 fast |", "|---|---|---|---|---|---|---|"]
        for g in gemms:
            lines.append(f"| {g['gemm']} | {g['k']} x {g['n']} | {g['bf16_ms']:.2f} ({g['bf16_tflops']:.0f}) | "
                         f"{g['fp8_ms']:.2f} ({g['fp8_tflops']:.0f}) | {g['fp8_fast_accum_ms']:.2f} "
                         f"({g['fp8_fast_accum_tflops']:.0f}) | {g['quantize_x_ms']:.2f} | {g['bf16_rel_err']:.1e} / "
                         f"{g['fp8_rel_err']:.1e} / {g['fp8_fast_accum_rel_err']:.1e} |")
        lines.append("")
    lines += [f"| variant | s / forward (median, min, max, n) | x vs bf16 | TFLOP/s | warm-up s | peak GB (above "
              f"resident) | block weights GB | pred rel err / max abs vs bf16 | block {record['block_index']} out / "
              "update rel err | SM MHz / W |", "|" + "---|" * 10]
    base = next((v for v in record["variants"] if "skipped" not in v), None)
    for v in record["variants"]:
        if "skipped" in v:
            lines.append(f"| {v['label']} | skipped: {v['skipped']} |" + " |" * 8)
            continue
        sp = v["forward_s"]
        err = (f"{v['pred_rel_err']:.2e} / {v['pred_max_abs']:.2e}" if "pred_rel_err" in v else
               "(reference)" if v is base else "not compared")
        blk = (f"{v['block_rel_err']:.2e} / {v['block_update_rel_err']:.2e}" if "block_rel_err" in v else "")
        gpu = [s for s in v["gpu"] if s]
        clock = (f"{statistics.median(s['sm_clock_mhz'] for s in gpu):.0f} / "
                 f"{statistics.median(s['power_w'] for s in gpu):.0f}" if gpu else "")
        lines.append(f"| {v['label']} | {v['per_forward_s']:.3f} ({sp['median']:.3f}, {sp['min']:.3f}, "
                     f"{sp['max']:.3f}, {sp['n']}) | {base['per_forward_s'] / v['per_forward_s']:.2f} | "
                     f"{v['tflops']:.0f} | {v['warmup_s']:.1f} | {v['peak_gb']:.1f} ({v['peak_above_resident_gb']:.1f})"
                     f" | {v['block_weights_gb']:.2f} | {err} | {blk} | {clock} |")
    lines.append("\nattention: " + "; ".join(f"{v['label']}: {v['attention']}" for v in record["variants"]
                                            if "attention" in v))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
