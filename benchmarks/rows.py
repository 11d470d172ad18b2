"""One measurement per process: `python -m benchmarks.rows {row,stages,peer,full} ...` prints one JSON line.

row:    k denoising steps of the real pipeline loop (WanT2V.sample) with given options; seconds per forward,
        peak memory, backend used, and the difference to a reference latent / noise prediction if given.
stages: text encoding, VAE decode and expert CPU<->GPU transfers (what the offloading original path pays).
peer:   diffusers' WanTransformer3DModel forward at the same size, bf16.
full:   one whole generation (T5 -> 40 steps -> VAE) with both experts, to check the projection.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from benchmarks.random_models import RESOLUTIONS, random_expert, random_pipeline, random_t5, random_vae
from wan.options import RuntimeOptions

CTX_LENS = (40, 126)  # token counts of the example prompt and of the default negative prompt (umt5)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def geometry(res: str, frame_num: int = 81):
    w, h = RESOLUTIONS[res]
    lat = (16, (frame_num - 1) // 4 + 1, h // 8, w // 8)
    return lat, lat[1] * lat[2] * lat[3] // 4


def inputs(res, device, frame_num=81):
    lat, seq_len = geometry(res, frame_num)
    g = torch.Generator(device=device).manual_seed(42)
    noise = torch.randn(*lat, device=device, generator=g)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    ctx = [torch.randn(n, 4096, device=device, generator=g).to(dtype) for n in CTX_LENS]
    return noise, [ctx[0]], [ctx[1]], seq_len


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if torch.device(device).type == "cuda" else 0.0


def run_row(args):
    device = torch.device(args.device)
    opts = RuntimeOptions(**json.loads(args.options))
    t0 = time.perf_counter()
    pipe = random_pipeline(opts, device, tiny=args.res == "tiny", n_experts=1 if opts.offload_model is not False else 2,
                           with_text=False)
    pipe.offload_model = False  # transfers are measured by `stages`; here the DiT alone
    build_s = time.perf_counter() - t0
    noise, ctx, ctx_null, seq_len = inputs(args.res, device, args.frame_num)
    seq_len = -(-seq_len // pipe.sp_size) * pipe.sp_size  # a multiple of the Ulysses degree, as generate() does
    preds = []
    inner = pipe._guided_prediction

    def keep_prediction(*a, **k):  # instrumentation: the guided noise prediction of each step
        out = inner(*a, **k)
        preds.append(out)
        return out

    pipe._guided_prediction = keep_prediction
    run = dict(context=ctx, context_null=ctx_null, seq_len=seq_len, sample_solver="unipc", sampling_steps=40,
               shift=12.0, guide=(3.0, 4.0))
    # Warm-up: compiled rows need the real shape (that is the compile); eager rows only a small one.
    t0 = time.perf_counter()
    if opts.compile:
        pipe.sample(noise, max_steps=1, **run)
    else:
        small = torch.randn(16, 1, 8, 8, device=device)
        pipe.sample(small, **{**run, "seq_len": 16}, max_steps=1)
    sync(device)
    warmup_s = time.perf_counter() - t0
    preds.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps = [time.perf_counter()]

    def on_step(i, t, expert):
        sync(device)
        stamps.append(time.perf_counter())

    latent = pipe.sample(noise, max_steps=args.steps, step_callback=on_step, **run)
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    per_step = statistics.median(step_s)
    model = pipe.high_noise_model
    result = dict(kind="row", res=args.res, options=opts.changed(), steps_timed=len(step_s), step_s=step_s,
                  per_step_s=per_step, per_forward_s=per_step / 2, seq_len=seq_len,
                  tflops=model.estimate_flops(seq_len) / (per_step / 2) / 1e12,
                  peak_gb=peak_gb(device), resident_experts=1 if pipe.low_noise_model is pipe.high_noise_model else 2,
                  backend=pipe.attention.name, rope=model.rope.name, build_s=build_s, warmup_s=warmup_s,
                  world_size=pipe.world_size,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if args.save:
        torch.save({"latent": latent.float().cpu(), "pred": preds[0].float().cpu()}, args.save)
    if args.ref:
        ref = torch.load(args.ref, weights_only=True)
        for key, mine in (("latent", latent), ("pred", preds[0])):
            d = (mine.float().cpu() - ref[key]).abs()
            result[f"{key}_max_abs_diff"] = d.max().item()
            result[f"{key}_mean_abs_diff"] = d.mean().item()
            result[f"{key}_rel_diff"] = (d.norm() / ref[key].norm()).item()
    if args.profile:
        result["profile"] = profile_forward(pipe, noise, ctx, seq_len, args.profile)
    return result


def profile_forward(pipe, noise, ctx, seq_len, path):
    """Profiler summary of one forward (top kernels by device time) written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if noise.is_cuda else [])
    t = torch.tensor([999], device=noise.device)
    with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=noise.is_cuda), profile(activities=acts) as prof:
        pipe.high_noise_model([noise], t=t, context=ctx, seq_len=seq_len)
        sync(noise.device)
    key = "self_cuda_time_total" if noise.is_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    with open(path, "w") as f:
        f.write(table)
    return path


def run_stages(args):
    """T5 encode (and its CPU<->GPU moves), VAE decode, expert transfers in bf16 and fp32."""
    device = torch.device(args.device)
    tiny = args.res == "tiny"
    out = dict(kind="stages", res=args.res)
    t5 = random_t5(device, tiny)
    t5.model.to(device)
    prompt = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
    t5([prompt], device)  # warm
    sync(device)
    t0 = time.perf_counter()
    t5([prompt], device)
    t5(["static, blurry, worst quality, low quality, messy background, three legs, walking backwards"], device)
    sync(device)
    out["t5_encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    t5.model.cpu()
    sync(device)
    out["t5_to_cpu_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    t5.model.to(device)
    sync(device)
    out["t5_to_gpu_s"] = time.perf_counter() - t0
    del t5
    vae = random_vae(device, tiny)
    lat, _ = geometry(args.res, args.frame_num)
    z = torch.randn(*lat, device=device)
    vae.decode([z[:, :2]])  # warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    vae.decode([z])
    sync(device)
    out["vae_decode_s"], out["vae_peak_gb"] = time.perf_counter() - t0, peak_gb(device)
    del vae
    if args.transfers:
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            m = random_expert(device, dtype, tiny=tiny)
            sync(device)
            t0 = time.perf_counter()
            m.cpu()
            out[f"expert_{name}_to_cpu_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.to(device)
            sync(device)
            out[f"expert_{name}_to_gpu_s"] = time.perf_counter() - t0
            del m
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def run_peer(args):
    """diffusers WanTransformer3DModel, same size, bf16, its default attention, random weights."""
    import diffusers
    from diffusers import WanTransformer3DModel

    device = torch.device(args.device)
    tiny = args.res == "tiny"
    kw = dict(patch_size=(1, 2, 2), num_attention_heads=4 if tiny else 40, attention_head_dim=16 if tiny else 128,
              in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=128 if tiny else 13824,
              num_layers=2 if tiny else 40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
              rope_max_seq_len=1024)
    with torch.device("meta"):
        model = WanTransformer3DModel(**kw)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, (p[0].numel() if p.dim() >= 2 else 50) ** -0.5, generator=gen)
    lat, seq_len = geometry(args.res, args.frame_num)
    x = torch.randn(1, *lat, device=device, dtype=dtype)
    ctx = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    t = torch.tensor([999], device=device)
    times = []
    with torch.no_grad():
        for _ in range(1 + args.steps):
            sync(device)
            t0 = time.perf_counter()
            model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
            sync(device)
            times.append(time.perf_counter() - t0)
    return dict(kind="peer", res=args.res, peer=f"diffusers {diffusers.__version__} WanTransformer3DModel",
                per_forward_s=statistics.median(times[1:]), warmup_s=times[0], seq_len=seq_len,
                peak_gb=peak_gb(device))


def run_full(args):
    """A whole generation through WanT2V.generate with both experts (random weights), stage by stage."""
    device = torch.device(args.device)
    opts = RuntimeOptions(**json.loads(args.options))
    t0 = time.perf_counter()
    pipe = random_pipeline(opts, device, tiny=args.res == "tiny", n_experts=2, with_text=True)
    build_s = time.perf_counter() - t0
    w, h = RESOLUTIONS[args.res]
    warmup_s = None
    if args.warmup:  # compile, cuDNN plans and allocator growth happen here, not in the measured runs
        t0 = time.perf_counter()
        pipe.generate("warm-up", size=(w, h), frame_num=args.frame_num, shift=12.0, sampling_steps=1, seed=1,
                      offload_model=pipe.offload_model)
        sync(device)
        warmup_s = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        pipe.generate("Two anthropomorphic cats in comfy boxing gear fight on a spotlighted stage.", size=(w, h),
                      frame_num=args.frame_num, shift=12.0, sampling_steps=args.sampling_steps, guide_scale=(3.0, 4.0),
                      seed=42, offload_model=pipe.offload_model)
        sync(device)
        runs.append(dict(total_s=time.perf_counter() - t0, stages=dict(pipe.last_timings), peak_gb=peak_gb(device)))
    return dict(kind="full", res=args.res, options=opts.changed(), backend=pipe.attention.name, build_s=build_s,
                warmup_s=warmup_s, sampling_steps=args.sampling_steps, runs=runs)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["row", "stages", "peer", "full"])
    p.add_argument("--res", default="480p", choices=list(RESOLUTIONS))
    p.add_argument("--frame_num", type=int, default=81)
    p.add_argument("--options", default="{}", help="RuntimeOptions fields as JSON")
    p.add_argument("--steps", type=int, default=1, help="timed denoising steps (row) or timed forwards (peer)")
    p.add_argument("--sampling_steps", type=int, default=40, help="steps of the full generation")
    p.add_argument("--repeat", type=int, default=1, help="generations in one process (full)")
    p.add_argument("--warmup", action="store_true", help="a 1-step generation first, not measured (full)")
    p.add_argument("--save", default=None, help="write the latent and first prediction here (row)")
    p.add_argument("--ref", default=None, help="compare with a file written by --save (row)")
    p.add_argument("--profile", default=None, help="write a profiler summary of one forward here (row)")
    p.add_argument("--transfers", action="store_true", help="also time expert CPU<->GPU moves (stages)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: multi-GPU rows (Ulysses / CFG parallel)
        from wan.distributed.setup import init_distributed

        dist = init_distributed(RuntimeOptions(**json.loads(args.options)), args.device)
        args.device = str(dist.device)
    fn = dict(row=run_row, stages=run_stages, peer=run_peer, full=run_full)[args.what]
    try:
        with torch.no_grad():
            result = fn(args)
    finally:
        if dist is not None:
            dist.shutdown()
    if dist is None or dist.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
