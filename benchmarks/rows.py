"""One measurement per process: `python -m benchmarks.rows {row,stages,peer,full} ...` prints one JSON line.

row:    k denoising steps of the real pipeline loop (WanT2V.sample) with given options; seconds per forward,
        peak memory, backend used, and the difference to a reference latent / noise prediction if given.
stages: text encoding, VAE decode and expert CPU<->GPU transfers (what the offloading original path pays); with
        --task i2v also the VAE encode of the condition (the image and F - 1 black frames).
peer:   diffusers' WanTransformer3DModel forward at the same size, bf16.
full:   one whole generation (T5 -> 40 steps -> VAE) with both experts, to check the projection; with
        --cache_variant, the same videos once more with a step cache (per-call options on the same loaded pipeline),
        its speed beside the error against the uncached videos (latent drift, decoded-video PSNR / SSIM).
row --cache_cost magcache,easycache: also the seconds of a step whose DiT calls are reused against a computed one,
        through the real loop, and (MagCache) the 40-step DiT time projected from them and the schedule.
--task i2v: the same with the image-to-video pipeline (WanI2V: 36-channel experts, the condition y with every
forward) at the same token count (the first frame is a 16:9 picture of the --res size).
--task ti2v: TI2V-5B (WanTI2V: one 48-channel model, the Wan 2.2 VAE; its 720p is 1280x704, --frame_num defaults to
121). Rows run its image mode (the first latent frame fixed, per-token timesteps; --ti2v_mode text: without), stages
add the one-frame encode and, with --vae_bands N, the banded decode.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.emulate import ENV as EMULATE_ENV
from benchmarks.emulate import emulate_card
from benchmarks.random_models import (RESOLUTIONS, TASKS, random_expert, random_image, random_pipeline, random_t5,
                                      random_vae, size_for, task_config)
from wan.memory_plan import bound_allocator
from wan.modules.vae import VAE_DTYPES
from wan.options import RuntimeOptions

CTX_LENS = (40, 126)  # token counts of the example prompt and of the default negative prompt (umt5)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def gpu_state(device) -> dict:
    """SM clock (MHz), power (W) and temperature (C) now, from nvidia-smi (empty on CPU or without it)."""
    if torch.device(device).type != "cuda":
        return {}
    import subprocess

    idx = torch.device(device).index or 0
    try:
        out = subprocess.run(["nvidia-smi", f"--id={idx}", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        clock, power, temp = (float(v) for v in out.strip().split(","))
        return {"sm_clock_mhz": clock, "power_w": power, "temp_c": temp}
    except Exception:  # noqa: BLE001 - logging only
        return {}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def geometry(res: str, frame_num: int = 81, task: str = "t2v"):
    """(latent shape [C, F', h, w], tokens) of a --res: 16 channels at 1/8 (A14B), 48 at 1/16 (ti2v)."""
    w, h = size_for(res, task)
    z, s = (48, 16) if task == "ti2v" else (16, 8)
    lat = (z, (frame_num - 1) // 4 + 1, h // s, w // s)
    return lat, lat[1] * lat[2] * lat[3] // 4


def inputs(res, device, frame_num=81, task: str = "t2v"):
    lat, seq_len = geometry(res, frame_num, task)
    g = torch.Generator(device=device).manual_seed(42)
    noise = torch.randn(*lat, device=device, generator=g)
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    ctx = [torch.randn(n, 4096, device=device, generator=g).to(dtype) for n in CTX_LENS]
    return noise, [ctx[0]], [ctx[1]], seq_len


def first_frame_constraint(res, device, frame_num: int, seq_len: int):
    """TI2V image mode: a FirstFrameLatent with a seeded N(0, 1) stand-in for the image's latent (the DiT's cost does
    not depend on its values; every row of a run gets the same one)."""
    from wan.latent_constraint import FirstFrameLatent

    shape, _ = geometry(res, frame_num, "ti2v")
    z = torch.randn(shape[0], 1, *shape[2:], device=device, generator=torch.Generator(device=device).manual_seed(43))
    return FirstFrameLatent(z, shape, seq_len)


def condition(res, device, frame_num=81) -> torch.Tensor:
    """An I2V condition y [20, F', h/8, w/8]: the first-frame mask and a seeded N(0, 1) stand-in for the image
    latent (the DiT's cost does not depend on its values; every row of a run gets the same one)."""
    from wan.image_condition import first_frame_mask

    (_, f, h, w), _ = geometry(res, frame_num)
    latent = torch.randn(16, f, h, w, device=device, generator=torch.Generator(device=device).manual_seed(43))
    return torch.cat([first_frame_mask(frame_num, h, w, device), latent])


def peak_gb(device) -> dict:
    if torch.device(device).type != "cuda":
        return {"peak_gb": 0.0, "peak_reserved_gb": 0.0}
    return {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_row(args):
    """`--steps` timed denoising steps of the real loop (median, min, max), after a warm-up step at the real
    shape (compile, autotuning and cuDNN plans happen there), GPU clock and power after each step."""
    device = torch.device(args.device)
    opts = RuntimeOptions(**json.loads(args.options))
    t0 = time.perf_counter()
    experts = args.experts or (1 if opts.offload_model is not False else 2)
    pipe = random_pipeline(opts, device, tiny=args.res == "tiny", n_experts=experts, with_text=False, task=args.task)
    build_s = time.perf_counter() - t0
    allocator = "default"
    if args.memory_cap_gb and device.type == "cuda":  # emulate a smaller card from here on (weights are placed)
        allocator = bound_allocator(device, args.memory_cap_gb)  # what --max_gpu_memory does in the product
    noise, ctx, ctx_null, seq_len = inputs(args.res, device, args.frame_num, args.task)
    seq_len = -(-seq_len // pipe.sp_size) * pipe.sp_size  # a multiple of the Ulysses degree, as generate() does
    guide = (1.0, 1.0) if args.guidance_one else (3.0, 4.0)
    run = dict(context=ctx, context_null=ctx_null, seq_len=seq_len, sample_solver="unipc", sampling_steps=40,
               shift=12.0, guide=guide)
    if args.task == "i2v":  # the condition joins every forward (the same 40-step schedule: the cost per forward)
        run["y"] = condition(args.res, device, args.frame_num)
    if args.task == "ti2v" and args.ti2v_mode == "image":  # frame 0 fixed, per-token timesteps (0 on its tokens)
        run["constraint"] = first_frame_constraint(args.res, device, args.frame_num, seq_len)
    t0 = time.perf_counter()
    pipe.sample(noise, max_steps=1, **run)  # warm-up at the real shape
    sync(device)
    warmup_s = time.perf_counter() - t0
    reset_peak(device)
    step_s, preds, gpu = [], [], []
    start = [time.perf_counter()]

    def on_step(i, t, expert, pred):
        sync(device)
        step_s.append(time.perf_counter() - start[0])
        gpu.append(gpu_state(device))  # outside the timed window: nvidia-smi takes tens of ms
        if i == 0:
            preds.append(pred)
        start[0] = time.perf_counter()

    latent = pipe.sample(noise, max_steps=args.steps, step_callback=on_step, **run)
    per_step = statistics.median(step_s)
    forwards = 1 if args.guidance_one else 2
    model = pipe.high_noise_model
    result = dict(kind="row", res=args.res, task=args.task, size=size_for(args.res, args.task),
                  frame_num=args.frame_num, options=pipe.options.changed(), steps_timed=len(step_s),
                  step_s=step_s, step_spread=spread(step_s), per_step_s=per_step, per_forward_s=per_step / forwards,
                  forwards_per_step=forwards, seq_len=seq_len,
                  tflops=model.estimate_flops(seq_len) / (per_step / forwards) / 1e12, **peak_gb(device),
                  gpu=gpu, resident_experts=1 if pipe.low_noise_model is pipe.high_noise_model else 2,
                  backends=pipe.backends(), backend=pipe.attention.name, rope=model.rope.name, build_s=build_s,
                  warmup_s=warmup_s, world_size=pipe.world_size, memory_cap_gb=args.memory_cap_gb,
                  allocator=allocator, experts_built=experts,
                  placement=pipe.placement.describe(),
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if args.task == "ti2v":
        result["ti2v_mode"] = args.ti2v_mode
    if args.save:
        torch.save({"latent": latent.float().cpu(), "pred": preds[0].float().cpu()}, args.save)
    if args.ref:
        ref = torch.load(args.ref, weights_only=True)
        result["compared_with"] = Path(args.ref).name
        for key, mine in (("latent", latent), ("pred", preds[0])):
            d = (mine.float().cpu() - ref[key]).abs()
            result[f"{key}_max_abs_diff"] = d.max().item()
            result[f"{key}_mean_abs_diff"] = d.mean().item()
            result[f"{key}_rel_diff"] = (d.norm() / ref[key].norm()).item()
    if args.cache_cost:
        result["cache_cost"] = {m: cache_cost(pipe, noise, run, m, per_step) for m in args.cache_cost.split(",")}
    if args.profile:
        result["profile"] = profile_forward(pipe, noise, run, args.profile)
    if args.overlap and device.type == "cuda":
        result["overlap"] = profile_overlap(pipe, noise, run)
    return result


def cache_cost(pipe, noise, run: dict, method: str, per_step: float) -> dict:
    """Seconds per step of a step cache `method` (published settings) through the real loop (WanPipeline.sample
    with the policy given): the first steps computed, then steps whose every DiT call is reused (MagCache: a
    schedule forced to reuse; EasyCache: a threshold no error reaches, no warm-up: its expert's first two steps
    compute, the rest reuse). MagCache also: the 40-step schedule at its settings and the DiT time projected from
    the row's measured computed step (`per_step`) and the measured reused step."""
    from dataclasses import replace

    from wan.step_cache import MAGCACHE, EasyCache, MagCache, load_ratios, magcache_schedule, resolve
    from wan.utils.schedulers import build_scheduler

    if method not in ("magcache", "easycache"):
        raise SystemExit(f"error: --cache_cost takes magcache and / or easycache, got {method!r}")
    device = noise.device
    opts = pipe.call_options
    kind = pipe.config.arch.model_type
    # a task without a published ratio curve (ti2v): the reused step is still measured (a forced schedule), the
    # 40-step projection is left out (it would need that model's calibrated curve)
    no_curve = method == "magcache" and not MAGCACHE[kind].ratios and opts.cache_ratios is None
    settings = resolve(replace(opts, cache=method, cache_ratios=opts.cache_ratios or ("-" if no_curve else None)),
                       kind)
    _, timesteps = build_scheduler(run["sample_solver"], run["sampling_steps"], run["shift"], device, 1000)
    trace = pipe._expert_trace(timesteps.tolist())
    guidance = pipe._guidance(tuple(run["guide"]), opts.batched_cfg)
    if method == "magcache":
        forced = [i == 0 or trace[i] != trace[i - 1] for i in range(len(trace))]  # reuse wherever allowed
        policy, computed_first = MagCache(settings, trace, guidance, schedule=forced), 1
    else:
        policy, computed_first = EasyCache(replace(settings, thresh=1e9, warmup=0), trace, guidance, device), 2
    steps, times = computed_first + 2, []
    start = [0.0]

    def on_step(i, t, expert, pred):
        sync(device)
        times.append(time.perf_counter() - start[0])
        start[0] = time.perf_counter()

    sync(device)
    start[0] = time.perf_counter()
    pipe.sample(noise, max_steps=steps, step_callback=on_step, cache=policy, **run)
    reused = [s for i, s in enumerate(times) if not policy.computed[i]]
    out = dict(settings=settings.as_dict(), step_s=times, computed=policy.computed[:steps],
               reused_step_s=statistics.median(reused), computed_step_s=per_step,
               reused_over_computed=statistics.median(reused) / per_step)
    if method == "magcache" and no_curve:
        out["projection"] = f"none: {kind} has no published magcache ratio curve"
    elif method == "magcache":
        schedule = magcache_schedule(load_ratios(settings.ratios).curve(len(trace)), trace, settings.thresh,
                                     settings.max_skip, settings.retention, settings.uncached)
        n_reused = schedule.count(False)
        out.update(schedule_reused_steps=[i for i, c in enumerate(schedule) if not c],
                   dit_s=len(trace) * per_step,
                   projected_dit_s=(len(trace) - n_reused) * per_step + n_reused * out["reused_step_s"])
        out["projected_dit_ratio"] = out["projected_dit_s"] / out["dit_s"]
    return out


def profile_overlap(pipe, noise, run: dict) -> dict:
    """Copy/compute overlap of block streaming in one steady step of the row (`run`: its sample() arguments),
    after the timed steps (benchmarks.overlap)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.overlap import copy_overlap

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe.sample(noise, max_steps=1, **run)
        sync(noise.device)
    return copy_overlap(prof.events())


def profile_forward(pipe, noise, run: dict, path):
    """Profiler summary of one steady-state step of the row (`run`: its sample() arguments, its own guidance),
    after the row's warm-up and timed steps, so nothing compiles or autotunes inside the window."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if noise.is_cuda else [])
    pipe.sample(noise, max_steps=1, **run)
    sync(noise.device)
    with profile(activities=acts) as prof:
        pipe.sample(noise, max_steps=1, **run)
        sync(noise.device)
    key = "self_cuda_time_total" if noise.is_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    with open(path, "w") as f:
        f.write(table)
    return path


def t5_stages(device, tiny: bool) -> dict:
    """T5: two prompts encoded on the device, and its moves down to the host and back up."""
    out = {}
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
    return out


def run_stages(args):
    """T5 encode (and its CPU<->GPU moves), VAE decode, expert transfers in bf16 and fp32 (--vae_only: the VAE)."""
    device = torch.device(args.device)
    tiny = args.res == "tiny"
    out = dict(kind="stages", res=args.res, task=args.task, size=size_for(args.res, args.task),
               frame_num=args.frame_num)
    if not args.vae_only:
        out.update(t5_stages(device, tiny))
    lat, _ = geometry(args.res, args.frame_num, args.task)
    z = torch.randn(*lat, device=device, generator=torch.Generator(device=device).manual_seed(3))
    out["vae"], videos, latents = {}, {}, {}
    cond = {"i2v": lambda: condition_video_for(args.res, args.frame_num, device),
            "ti2v": lambda: first_frame_for(args.res, device)}.get(args.task, lambda: None)()
    version = task_config(args.task, tiny).vae_version
    for name in args.vae_dtypes.split(","):
        vae = random_vae(device, tiny, VAE_DTYPES[name], version)
        if cond is not None:
            out.setdefault("vae_encode", {})[name] = time_encode(vae, cond, name, latents, device,
                                                                 reuse=args.task == "i2v")
        vae.decode([z[:, :2]])  # warm
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        video = vae.decode([z])[0]
        sync(device)
        entry = {"decode_s": time.perf_counter() - t0, **peak_gb(device)}
        videos[name] = video.float().cpu()
        if name != "fp32" and "fp32" in videos:
            d = videos[name].double() - videos["fp32"].double()
            entry["max_abs_vs_fp32"] = d.abs().max().item()
            # PSNR of the [-1, 1] video (peak-to-peak 2), as the 8-bit video's would be
            entry["psnr_vs_fp32_db"] = (10 * torch.log10(4.0 / d.pow(2).mean())).item()
        if args.vae_bands > 1:  # the banded decode of the same latent, its peak and its difference to the whole one
            entry["banded"] = time_banded_decode(vae, z, args.vae_bands, video, device)
        out["vae"][name] = entry
        del vae, video
        if device.type == "cuda":
            torch.cuda.empty_cache()
    first = out["vae"][next(iter(out["vae"]))]
    out["vae_decode_s"], out["vae_peak_gb"] = first["decode_s"], first["peak_gb"]
    if cond is not None:
        enc = out["vae_encode"][next(iter(out["vae_encode"]))]
        out["vae_encode_s"], out["vae_encode_peak_gb"] = enc["encode_s"], enc["peak_gb"]
    if args.transfers:
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            m = random_expert(device, dtype, tiny=tiny, task=args.task)
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


def condition_video_for(res: str, frame_num: int, device) -> torch.Tensor:
    """The I2V condition video [3, F, h, w] as WanI2V builds it: a 16:9 random picture of the --res size stretched
    to the video's size (the reference's geometry), then F - 1 black frames."""
    from wan.image_condition import condition_video, i2v_geometry, image_to_tensor, resize_first_frame

    w, h = RESOLUTIONS[res]
    geo = i2v_geometry(w, h, w * h)
    first = resize_first_frame(image_to_tensor(random_image(w, h)), geo.height, geo.width)
    return condition_video(first, frame_num, device)


def first_frame_for(res: str, device) -> torch.Tensor:
    """TI2V's image-mode encode input [3, 1, h, w]: a 16:9 random picture of the --res size resized and cropped to the
    video's size (best_output_size at that area)."""
    from wan.ti2v_inputs import first_frame, ti2v_geometry

    w, h = size_for(res, "ti2v")
    return first_frame(random_image(w, h), ti2v_geometry(w, h, w * h)).to(device)


def time_banded_decode(vae, z: torch.Tensor, bands: int, whole: torch.Tensor, device) -> dict:
    """The decode of z in `bands` bands of rows (the pipeline's --vae_bands), timed, with its peak and its max
    difference to the whole-frame video `whole`."""
    bands_before = vae.decode_bands
    vae.decode_bands = bands
    try:
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        video = vae.decode([z])[0]
        sync(device)
        entry = {"bands": bands, "decode_s": time.perf_counter() - t0, **peak_gb(device)}
    finally:
        vae.decode_bands = bands_before
    entry["max_abs_vs_whole"] = (video.float().cpu() - whole.float().cpu()).abs().max().item()
    return entry


def time_encode(vae, video: torch.Tensor, name: str, latents: dict, device, reuse: bool = True) -> dict:
    """The condition video's encode timed twice after a 5-frame warm-up: the plain one (the reference's) and the one
    reusing repeated layers (--fast_encode; `reuse` False: the plain one only, TI2V's one frame), with their peaks,
    whether the two latents are equal bit for bit, and the error against the fp32 encode when `name` is another
    dtype (`latents` collects each dtype's result)."""
    vae.encode([video[:, :5]])  # warm: cuDNN plans for the chunk shapes
    entry, out = {}, {}
    for key, reuse in (("", False), ("reuse_", True))[:2 if reuse else 1]:
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        out[key] = vae.encode([video], reuse_repeats=reuse)[0]
        sync(device)
        peak = peak_gb(device)
        entry.update({f"{key}encode_s": time.perf_counter() - t0, f"{key}peak_gb": peak["peak_gb"],
                      f"{key}peak_reserved_gb": peak["peak_reserved_gb"]})
    if "reuse_" in out:
        entry["reuse_equal"] = torch.equal(out["reuse_"], out[""])
    latents[name] = out[""].float().cpu()
    if name != "fp32" and "fp32" in latents:
        d = (latents[name].double() - latents["fp32"].double()).abs()
        entry["max_abs_vs_fp32"] = d.max().item()
        entry["rel_vs_fp32"] = (d.norm() / latents["fp32"].double().norm()).item()
    return entry


def peer_model_kwargs(res: str) -> dict:
    """diffusers WanTransformer3DModel arguments of the A14B expert ("tiny": configs.model_config.TINY's sizes);
    tests/test_peer_same_work.py checks that this model computes our forward."""
    tiny = res == "tiny"
    heads, head_dim = (4, 16) if tiny else (40, 128)
    return dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=128 if tiny else 13824,
                num_layers=2 if tiny else 40, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                rope_max_seq_len=1024)


def run_peer(args):
    """diffusers WanTransformer3DModel, same size, bf16, its default attention, our random-weight rule (norm
    weights near 1, fan-in scaled matrices), its rotary tables built for real (non-persistent buffers stay garbage
    after a meta build), batch 1 and batch 2, `--steps` timed forwards each after a warm-up."""
    import diffusers
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from wan.testing.random_init import materialize_random_

    device = torch.device(args.device)
    kw = peer_model_kwargs(args.res)
    head_dim = kw["attention_head_dim"]
    with torch.device("meta"):
        model = WanTransformer3DModel(**kw)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = materialize_random_(model, device, dtype, seed=0, rebuilt_buffers=("rope.",))
    model.eval().requires_grad_(False)
    with torch.device(device):
        model.rope = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)  # real cos/sin tables
    lat, seq_len = geometry(args.res, args.frame_num)
    out = dict(kind="peer", res=args.res, peer=f"diffusers {diffusers.__version__} WanTransformer3DModel",
               seq_len=seq_len)
    for batch in (1, 2):
        x = torch.randn(batch, *lat, device=device, dtype=dtype)
        ctx = torch.randn(batch, 512, 4096, device=device, dtype=dtype)
        t = torch.full((batch,), 999, device=device)
        times = []
        with torch.no_grad():
            model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)  # warm-up
            sync(device)
            reset_peak(device)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
                sync(device)
                times.append(time.perf_counter() - t0)
        out[f"batch{batch}"] = dict(forward_s=spread(times), per_sample_forward_s=statistics.median(times) / batch,
                                    **peak_gb(device), gpu=gpu_state(device))
        del x, ctx
    out["per_forward_s"] = out["batch1"]["forward_s"]["median"]
    out["peak_gb"] = out["batch1"]["peak_gb"]
    return out


def run_full(args):
    """Whole generations through WanT2V.generate with both experts (random weights): the first (compile included)
    and `--repeat` steady ones, stage by stage. `--lora_rank` merges random Lightning-layout LoRAs at build."""
    device = torch.device(args.device)
    opts = RuntimeOptions(**json.loads(args.options))
    cli_plan = None
    if args.cli_plan:
        opts, cli_plan = cli_fast_plan(opts, args.res, args.frame_num, device, args.task)
    lora = {}
    if args.lora_rank:
        from benchmarks.random_models import arch_for
        from wan.testing.random_lora import write_random_lora_dir

        folder = write_random_lora_dir(Path(tempfile.mkdtemp()) / "lora", arch_for(args.task, args.res == "tiny"),
                                       rank=args.lora_rank)
        lora = dict(lora_dir=str(folder))
    t0 = time.perf_counter()
    w, h = size_for(args.res, args.task)
    pipe = random_pipeline(opts, device, tiny=args.res == "tiny", n_experts=2, with_text=True, task=args.task,
                           plan_for=(w, h, args.frame_num), **lora)
    build_s = time.perf_counter() - t0
    experts = (pipe.high_noise_model, pipe.low_noise_model)
    weights_gb = dict(high=gpu_weight_gb(experts[0]), low=gpu_weight_gb(experts[1]), both=gpu_weight_gb(*experts))
    gen = dict(frame_num=args.frame_num, shift=args.shift, sample_solver=args.solver,
               sampling_steps=args.sampling_steps, guide_scale=tuple(args.guide), seed=42)
    if args.task == "i2v" or (args.task == "ti2v" and args.ti2v_mode == "image"):
        gen.update(img=random_image(w, h), max_area=w * h)  # a first frame of the --res size at that area
    else:
        gen.update(size=(w, h))
    prompt = "Two anthropomorphic cats in comfy boxing gear fight on a spotlighted stage."
    warmup_s = None
    if args.warmup_steps:  # compile, autotuning and cuDNN plans at the real shape, before anything is timed
        sync(device)
        t0 = time.perf_counter()
        pipe.generate(f"{prompt} Warm-up.", **{**gen, "sampling_steps": args.warmup_steps})
        sync(device)
        warmup_s = time.perf_counter() - t0
    runs, last = generations(pipe, prompt, gen, args.repeat, device)
    steady = [r["total_s"] for r in runs[1:]] or [runs[0]["total_s"]]
    out = dict(kind="full", res=args.res, task=args.task, size=(w, h), frame_num=args.frame_num,
               ti2v_mode=args.ti2v_mode if args.task == "ti2v" else None, options=pipe.options.changed(),
               backends=pipe.last_result.backends,
               memory_plan=pipe.memory_plan.describe() if pipe.memory_plan else None, allocator=pipe.allocator,
               placement=pipe.placement.describe(), cli_plan=cli_plan, expert_weights_gb=weights_gb,
               build_s=build_s, load_timings=pipe.load_timings, sampling_steps=args.sampling_steps,
               solver=args.solver, guide=args.guide, shift=args.shift, lora_rank=args.lora_rank,
               first_video_s=runs[0]["total_s"], steady_video_s=spread(steady), runs=runs, warmup_s=warmup_s,
               warmup_steps=args.warmup_steps)
    if args.cache_variant:
        out["cache_ab"] = cache_ab(pipe, prompt, gen, args, json.loads(args.cache_variant), runs, last, device)
    if args.save:
        torch.save({"latent": last[0], "video": last[1]}, args.save)
    if args.ref:
        ref = torch.load(args.ref, weights_only=True)
        out["compared_with"] = Path(args.ref).name
        for key, mine in (("latent", last[0]), ("video", last[1])):
            d = (mine - ref[key]).abs()
            out[f"{key}_max_abs_diff"], out[f"{key}_rel_diff"] = d.max().item(), (d.norm() / ref[key].norm()).item()
        out["video_vs_ref"] = video_error(last[1], ref["video"])
    return out


def generations(pipe, prompt: str, gen: dict, repeat: int, device, options=None) -> tuple[list, tuple]:
    """1 + `repeat` whole generations ("Take i": a new prompt each, as batch mode), stage by stage. Returns (the
    runs' records, (latent, video) of the last take, on the host)."""
    runs, last = [], None
    for i in range(1 + repeat):  # run 0: the first video of the process (compile, autotuning included)
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        video, latent = pipe.generate(f"{prompt} Take {i}.", options=options, return_latents=True, **gen)
        sync(device)
        res = pipe.last_result
        runs.append(dict(total_s=time.perf_counter() - t0, stages=dict(res.timings), **peak_gb(device),
                         expert_trace=res.expert_trace, gpu=gpu_state(device), first=i == 0))
        if res.cache is not None:
            runs[-1]["cache"] = {k: res.cache[k] for k in ("method", "calls", "computed_calls", "reused_steps")}
        if i == repeat:  # the video only on rank 0
            last = (latent.float().cpu(), None if video is None else video.float().cpu())
    return runs, last


def cache_ab(pipe, prompt: str, gen: dict, args, overrides: dict, base_runs: list, base: tuple, device) -> dict:
    """The same videos with a step cache (`overrides`: per-call options) on the same pipeline, weights, prompts
    and seed: the speed against the uncached runs, and the last take's error against the uncached one (latent drift,
    decoded-video PSNR / SSIM). Random weights bound the numerics, not the quality of a real video."""
    from dataclasses import replace

    runs, (latent, video) = generations(pipe, prompt, gen, args.repeat, device, replace(pipe.options, **overrides))

    def steady(rs):
        return statistics.median(r["total_s"] for r in (rs[1:] or rs))

    def dit(rs):
        return statistics.median(r["stages"].get("dit_high", 0) + r["stages"].get("dit_low", 0) for r in (rs[1:] or rs))

    d = (latent.double() - base[0].double()).abs()
    return dict(options=overrides, runs=runs, cache=pipe.last_result.cache, steady_video_s=spread(
                    [r["total_s"] for r in (runs[1:] or runs)]),
                video_s={"uncached": steady(base_runs), "cached": steady(runs)},
                video_ratio=steady(runs) / steady(base_runs), dit_s={"uncached": dit(base_runs), "cached": dit(runs)},
                dit_ratio=dit(runs) / dit(base_runs), latent_max_abs_diff=d.max().item(),
                latent_rel_diff=(d.norm() / base[0].double().norm()).item(),
                video_vs_uncached=None if video is None else video_error(video, base[1]))


def gpu_weight_gb(*models) -> float:
    """GB of the models' parameters and buffers that sit on a GPU now (after placement and any fp8 conversion;
    storage shared between them counted once)."""
    tensors = {t.data_ptr(): t for m in models for t in (*m.parameters(), *m.buffers()) if t.device.type == "cuda"}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9


def cli_fast_plan(opts: RuntimeOptions, res: str, frame_num: int, device, task: str = "t2v"
                  ) -> tuple[RuntimeOptions, dict]:
    """The options generate.py runs `--fast` with on this card (one GPU, no placement flag): its own _fast_budget
    (wan.memory_plan.fast_budget on the free memory, before anything is built), for this size, with T5 at the
    umt5-xxl size (no checkpoint file). Returns them and what the CLI saw and logged."""
    import logging
    import logging.handlers

    import generate

    if device.type != "cuda":
        raise SystemExit(f"error: --cli_plan: the CLI plans for a CUDA card's free memory; this run is on {device}")
    w, h = size_for(res, task)
    cli_args = argparse.Namespace(options=opts, size=f"{w}*{h}", frame_num=frame_num)
    handler = logging.handlers.BufferingHandler(capacity=1000)  # the line the CLI logs
    log = logging.getLogger("wan")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        free_gb = torch.cuda.mem_get_info(device)[0] / 1e9
        cfg = task_config(task, res == "tiny")
        planned = generate._fast_budget(cli_args, cfg, device, Path(tempfile.mkdtemp()))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return planned, dict(free_gb=free_gb, log=[r.getMessage() for r in handler.buffer],
                         options_changed=planned != opts)


def video_error(video: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR / SSIM of two [3, T, H, W] videos in [-1, 1] as they would be saved (8-bit frames)."""
    from benchmarks.compare import compare_videos
    from wan.utils.video import _to_frames

    return compare_videos(_to_frames(video), _to_frames(ref))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["row", "stages", "peer", "full"])
    p.add_argument("--res", default="480p", choices=list(RESOLUTIONS))
    p.add_argument("--task", default="t2v", choices=TASKS,
                   help="t2v, i2v (the image-to-video pipeline: 36-channel experts, the condition y) or ti2v "
                        "(TI2V-5B: one model, the Wan 2.2 VAE)")
    p.add_argument("--frame_num", type=int, default=None, help="frames (default: 81; 121 for ti2v)")
    p.add_argument("--ti2v_mode", default="image", choices=["image", "text"],
                   help="ti2v: with a first frame (frame 0 fixed, per-token timesteps) or text to video")
    p.add_argument("--vae_bands", type=int, default=0, help="stages: also the decode in this many bands of rows")
    p.add_argument("--options", default="{}", help="RuntimeOptions fields as JSON")
    p.add_argument("--steps", type=int, default=3, help="timed denoising steps (row) or timed forwards (peer)")
    p.add_argument("--guidance_one", action="store_true", help="row: guidance 1 (one pass per step)")
    p.add_argument("--memory_cap_gb", type=float, default=0,
                   help="row: cap this process's GPU memory after building (as --max_gpu_memory does)")
    p.add_argument("--experts", type=int, default=0, choices=[0, 1, 2],
                   help="row: experts built (1: one serves both noise levels; 0: 2 when resident, else 1)")
    p.add_argument("--sampling_steps", type=int, default=40, help="steps of the full generation")
    p.add_argument("--solver", default="unipc", help="full: sample_solver")
    p.add_argument("--shift", type=float, default=12.0, help="full: flow shift")
    p.add_argument("--guide", type=float, nargs=2, default=(3.0, 4.0), help="full: guidance (low, high)")
    p.add_argument("--lora_rank", type=int, default=0, help="full: merge random LoRAs of this rank")
    p.add_argument("--repeat", type=int, default=2, help="steady generations after the first (full)")
    p.add_argument("--overlap", action="store_true",
                   help="row: profile one more step and report how much of the block copies compute hides")
    p.add_argument("--save", default=None, help="write the latent and first prediction / video here")
    p.add_argument("--ref", default=None, help="compare with a file written by --save")
    p.add_argument("--profile", default=None, help="write a profiler summary of one forward here (row)")
    p.add_argument("--transfers", action="store_true", help="also time expert CPU<->GPU moves (stages)")
    p.add_argument("--vae_only", action="store_true", help="stages: the VAE only (no T5)")
    p.add_argument("--vae_dtypes", default="fp32", help="stages: VAE decode dtypes, e.g. fp32,bf16")
    p.add_argument("--cli_plan", action="store_true",
                   help="full: as generate.py --fast on one GPU: plan for the card's free memory before building")
    p.add_argument("--warmup_steps", type=int, default=0,
                   help="full: a generation of this many steps first (compile, autotuning), not counted")
    p.add_argument("--cache_variant", default=None, metavar="JSON",
                   help="full: then the same videos with these per-call option overrides (a step cache, e.g. "
                        "'{\"cache\": \"magcache\"}'): speed ratio and error against the uncached videos")
    p.add_argument("--cache_cost", default=None, metavar="METHODS",
                   help="row: the seconds of a reused step against a computed one, per step cache (magcache, "
                        "easycache; comma-separated), and MagCache's 40-step projection")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.what == "peer" and args.task != "t2v":
        p.error("peer (diffusers' transformer) is measured for t2v only")
    emulated = emulate_card(torch.device(args.device)) if os.environ.get(EMULATE_ENV) else None
    dist = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: multi-GPU rows (Ulysses / CFG parallel)
        from wan.distributed.setup import init_distributed

        dist = init_distributed(RuntimeOptions(**json.loads(args.options)), args.device)
        args.device = str(dist.device)
    if args.frame_num is None:
        args.frame_num = 121 if args.task == "ti2v" else 81
    fn = dict(row=run_row, stages=run_stages, peer=run_peer, full=run_full)[args.what]
    try:
        with torch.no_grad():
            result = fn(args)
    finally:
        if dist is not None:
            dist.shutdown()
    if emulated:
        result["emulated_card"] = emulated
    if dist is None or dist.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
