"""Which placement fits a GPU memory budget: an estimate of each placement's peak from the weights' sizes and costs
measured on one H200, checked before anything loads.

Measured (benchmarks/results/): the compiled `--fast` forward holds about 84 KB of activations per token and per
batch sample (720p: (69.8 - 57.2) GB / (2 x 75,600 tokens); 480p: (62.7 - 57.2) GB / (2 x 32,760)); the VAE decode
peaks at about 300 bytes per output pixel and frame in fp32 and 150 in bf16 (22.3 / 11.2 GB at 1280 x 720 x 81).
The eager original path needs more activations than this (its per-token time embedding alone is 9.3 GB at 720p), so
plans are for `--fast`-style runs; the process is capped at the budget, so a wrong estimate fails loudly (exit 3)
instead of using more.

Image-to-video adds two things: its experts' 36-channel patch embedding (in `dit_bytes`, from the architecture) and
the VAE encode of the condition (the image and F - 1 black frames at the video's size), an "encode" phase between
the text encoding and the denoising. Its cost per pixel is an ESTIMATE, not a GPU measurement: see
VAE_ENCODE_BYTES_PER_PIXEL.

TI2V-5B (one model, the Wan 2.2 VAE): every cost of it is an ESTIMATE until measured (benchmarks/backlog.py rows
ti2v_*): the activations per token scaled from the A14B measurement by the FFN's live set, plus its per-token time
embedding (image mode); the Wan 2.2 VAE's decode and one-frame encode from live-tensor counts
(benchmarks/results/cpu_720p_vae22_*_counts.json) times the Wan 2.1 decode's measured-over-counted ratio.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from .errors import MemoryPlanError

log = logging.getLogger("wan")

ACTIVATION_BYTES_PER_TOKEN = 84e3
# The whole-frame decode's peak per output pixel and frame, measured: H200 300 / 150 (fp32 / bf16), H100 310 / 162
# (benchmarks/results/backlog/h100_i2v_encode_720p.json: 23.16 / 12.05 GB at 1280 x 720 x 81); the larger.
VAE_BYTES_PER_PIXEL = {"fp32": 310.0, "bf16": 162.0}
# Banded decode (wan/modules/vae_bands.py, 4 bands of rows, band by band: only one band's causal caches alive): its
# peak over the whole-frame peak, from live-tensor counts of the 720p x 81 decode (benchmarks/vae_memory.py: 5.03 /
# 17.57 GiB fp32, 2.77 / 9.12 bf16; not yet measured on a GPU), rounded up.
VAE_BANDS = 4
VAE_BANDED_FRACTION = {"fp32": 0.30, "bf16": 0.31}
# The I2V condition's encode (input video included), per pixel and frame, measured on an H100 at 1280 x 720 x 81
# (benchmarks/results/backlog/h100_i2v_encode_720p.json, allocated peaks): plain 17.31 / 9.58 GB fp32 / bf16 (232 /
# 128, above the live-tensor counts' 186.3 / 98.0 by 1.25 / 1.31); --fast_encode holds more (one layer's old cache
# slots until compared, the reused prefix's output): 19.42 / 10.64 GB (261 / 143). Rounded up.
VAE_ENCODE_BYTES_PER_PIXEL = {"fp32": 233.0, "bf16": 129.0}
VAE_FAST_ENCODE_BYTES_PER_PIXEL = {"fp32": 261.0, "bf16": 143.0}
# The Wan 2.2 VAE (TI2V-5B), ESTIMATES: live-tensor counts at 1280 x 704 x 121 (benchmarks/vae_memory.py --vae 2.2:
# whole-frame decode 19.30 / 9.65 GiB fp32 / bf16 = 190.0 / 95.0 bytes per output pixel and frame; band order, split
# 0, 4 bands: 0.29 of it at +40% decode work; the one-frame encode of the image 1.65 / 0.82 GiB = 1966 / 983 bytes per
# pixel of that frame), times 1.19 / 1.14 as the 2.1 estimates above, rounded up. Not yet measured on a GPU.
VAE_COSTS = {  # version -> (decode bytes per pixel, banded fraction, encode bytes per encoded pixel), per dtype
    "2.1": (VAE_BYTES_PER_PIXEL, VAE_BANDED_FRACTION, VAE_ENCODE_BYTES_PER_PIXEL),
    "2.1 fast_encode": (VAE_BYTES_PER_PIXEL, VAE_BANDED_FRACTION, VAE_FAST_ENCODE_BYTES_PER_PIXEL),
    "2.2": ({"fp32": 227.0, "bf16": 109.0}, {"fp32": 0.30, "bf16": 0.30}, {"fp32": 2340.0, "bf16": 1121.0}),
}
# Block streaming also streams T5 by layers (wan/placement.py): 2 slots of one of umt5-xxl's 24 equal blocks, which
# hold 81.6% of its weights (the token embedding, 256,384 x 4,096, stays on the host): 2 x 0.816 / 24 of T5's bytes.
T5_STREAMED_FRACTION = 2 * 0.816 / 24
# Step caching (wan/step_cache.py) holds tensors across steps, on top of the denoising peak: MagCache (and its
# calibration) one fp32 residual of the block stack per CFG branch, [tokens, dim] (720p: 1.55 GB each), and while the
# blocks run their bf16 input, kept to form the new residual; EasyCache a few latent-sized fp32 tensors (per branch
# v - x, plus the inputs and the output its rate needs).
CACHE_RESIDUALS = 2  # CFG branches (the plan does not know the guidance scale; guidance 1 needs one)
RESIDUAL_BYTES = 4 + 2  # per token and channel: the fp32 residual, the bf16 block input
EASYCACHE_LATENTS = 8
HEADROOM = 1.05  # allocator fragmentation on top of the estimate
# The budget caps what the allocator reserves, and reserved runs above allocated (the 24 GB row: 14.5 GB allocated,
# 18.6 reserved, with expandable segments): a plan fits only with this much of the budget left over. Without it an
# 80 GB H100 (84.5 GB free) took the whole-frame 720p decode at a planned 83.5 GB and 1 GB to spare.
MARGIN_FRACTION, MARGIN_MIN_GB = 0.05, 1.0


def activation_bytes_per_token(arch, per_token_time: bool = False) -> float:
    """Activation bytes per token and batch sample of the compiled --fast forward: measured for the A14B DiT; for
    another width an ESTIMATE scaled by the FFN's live set at its peak, 6 d + 4 f bytes (fp32 residual, bf16 input,
    two bf16 [tokens, f] intermediates: 86 KB for A14B against the 84 KB measured). `per_token_time` (TI2V image
    mode) adds the per-token time embedding kept for the whole forward: e0 [L, 6, d] and e [L, d] in fp32, 28 d."""
    live = 6 * arch.dim + 4 * arch.ffn_dim
    base = ACTIVATION_BYTES_PER_TOKEN * live / (6 * A14B_DIM + 4 * A14B_FFN)
    return base + (28 * arch.dim if per_token_time else 0.0)


A14B_DIM, A14B_FFN = 5120, 13824  # where ACTIVATION_BYTES_PER_TOKEN was measured


def margin_gb(budget_gb: float) -> float:
    """GB of the budget a plan must leave free: 5% of it, at least 1 GB."""
    return max(MARGIN_MIN_GB, MARGIN_FRACTION * budget_gb)


def smallest_budget(peak_gb: float) -> float:
    """The smallest budget whose margin leaves `peak_gb` (the inverse of margin_gb), rounded up to 0.1 GB."""
    return math.ceil(max(peak_gb + MARGIN_MIN_GB, peak_gb / (1 - MARGIN_FRACTION)) * 10) / 10


def dit_bytes(arch, bytes_per_param: int, fp8_linear: str = "none") -> tuple[float, float]:
    """(bytes of one block, bytes outside the blocks) of one expert; `fp8_linear` (wan.modules.fp8.TARGETS) stores
    those linears' weights in 1 byte per parameter (plus an fp32 scale per output row)."""
    d, f = arch.dim, arch.ffn_dim
    block = 4 * (d * d + d) * 2 + 2 * d * 2 + 2 * d + 6 * d + (f * d + f) + (d * f + d)  # attn x2, norms, mod, ffn
    patch = arch.in_dim * 4 * d + d
    rest = patch + (arch.text_dim * d + d) + (d * d + d) + (arch.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
    head = math.prod(arch.patch_size) * arch.out_dim  # 64 for the 16-channel experts, 192 for TI2V-5B
    rest += head * d + head + 2 * d
    fp8 = {"none": (0, 0), "ffn": (2 * f * d, f + d), "attn_proj": (6 * d * d, 6 * d)}  # (weights, output rows)
    fp8["all"] = tuple(a + b for a, b in zip(fp8["ffn"], fp8["attn_proj"]))
    weights, rows = fp8[fp8_linear]
    block_bytes = block * bytes_per_param - weights * (bytes_per_param - 1) + rows * 4
    return block_bytes, rest * bytes_per_param


@dataclass(frozen=True)
class MemoryPlan:
    placement: str  # "resident", "offload" (the reference's expert swap) or "stream"
    peak_gb: float
    phases: dict  # phase -> GB: text encoding, denoising, decoding
    vae_bands: int = 0  # 0: whole-frame decode
    t5_streamed: bool = False  # resident DiTs, T5 streamed by layers (the stream placement streams it anyway)
    fast_encode: bool = False  # the I2V encode planned with --fast_encode's reuse (its higher peak)

    def describe(self) -> str:
        bands = f", VAE in {self.vae_bands} bands" if self.vae_bands > 1 else ""
        t5 = ", T5 streamed by layers" if self.t5_streamed else ""
        return (f"{self.placement}{t5}{bands}, expected peak {self.peak_gb:.1f} GB ("
                + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()) + ")")


def cache_bytes(method: str, arch, tokens: int, latent_elements: int) -> float:
    """Bytes a step cache keeps between steps: `method` magcache / calibrate / easycache / none."""
    if method in ("magcache", "calibrate"):
        return float(CACHE_RESIDUALS * tokens * arch.dim * RESIDUAL_BYTES)
    if method == "easycache":
        return EASYCACHE_LATENTS * latent_elements * 4.0
    return 0.0


def estimate(placement: str, arch, tokens: int, batch: int, pixels: int, bytes_per_param: int, vae_dtype: str,
             t5_bytes: float, t5_cpu: bool, slots: int = 2, vae_bands: int = 0, fp8_linear: str = "none",
             encode_pixels: int = 0, n_models: int = 2, vae_version: str = "2.1", per_token_time: bool = False,
             step_cache: float = 0.0, t5_streamed: bool = False, fast_encode: bool = False) -> MemoryPlan:
    """Peak GB of each phase of one generation for `placement`; `encode_pixels` > 0 (I2V, TI2V with an image) adds
    the encode phase; `n_models` DiTs (2 experts, or 1), `vae_version` "2.1" or "2.2" (its costs: VAE_COSTS);
    `step_cache` (bytes, `cache_bytes`) is held through the denoising; `t5_streamed`: a resident run streams T5 by
    layers (the stream placement always does); `fast_encode`: the I2V encode reuses repeated layers (a higher
    peak, measured)."""
    decode_cost, banded, encode_cost = VAE_COSTS[f"{vae_version} fast_encode" if fast_encode and
                                                 f"{vae_version} fast_encode" in VAE_COSTS else vae_version]
    block, rest = dit_bytes(arch, bytes_per_param, fp8_linear)
    expert = block * arch.num_layers + rest
    act = activation_bytes_per_token(arch, per_token_time) * tokens * batch + step_cache
    vae = decode_cost[vae_dtype] * pixels * (banded[vae_dtype] if vae_bands > 1 else 1.0)
    t5 = 0.0 if t5_cpu else t5_bytes
    enc = encode_cost[vae_dtype] * encode_pixels
    t5_streamed = t5_streamed and placement == "resident" and not t5_cpu
    if placement == "resident":
        base = n_models * expert
        phases = {"text": base + (t5 * T5_STREAMED_FRACTION if t5_streamed else t5), "encode": base + enc,
                  "denoise": base + act, "decode": base + vae}
    elif placement == "offload":  # experts move up at the first step and down before the decode; T5 encodes alone
        phases = {"text": t5, "encode": enc, "denoise": expert + act, "decode": vae}
    elif placement == "stream":  # T5 streamed by layers too
        base = n_models * rest + slots * block
        phases = {"text": base + t5 * T5_STREAMED_FRACTION, "encode": base + enc, "denoise": base + act,
                  "decode": base + vae}
    else:
        raise ValueError(f"unknown placement {placement!r}")
    if not encode_pixels:  # text-to-video: no condition to encode
        del phases["encode"]
    phases = {k: v * HEADROOM / 1e9 for k, v in phases.items()}
    return MemoryPlan(placement, max(phases.values()), phases, vae_bands if vae_bands > 1 else 0, t5_streamed,
                      fast_encode and bool(encode_pixels))


def t5_weight_bytes(t5_file=None, encoder=None) -> float:
    """T5's weight bytes: the given encoder's, else the checkpoint file's size (bf16 on disk), else umt5-xxl's."""
    if encoder is not None:
        return float(sum(t.numel() * t.element_size() for t in encoder.model.parameters()))
    return float(t5_file.stat().st_size) if t5_file is not None and t5_file.is_file() else 11.4e9


def plan_inputs(config, options, size_frames: tuple[int, int, int], t5_bytes: float) -> dict:
    """`estimate` / `choose` keyword arguments for a task config, RuntimeOptions and (width, height, frames)."""
    w, h, frames = size_frames
    sf, sh, sw = config.vae_stride
    latent = ((frames - 1) // sf + 1) * (h // sh) * (w // sw)  # per channel
    tokens = latent // 4  # patch 1 x 2 x 2
    kind = config.arch.model_type  # i2v encodes F frames; ti2v (planned with its image) one
    encode_pixels = {"i2v": w * h * frames, "ti2v": w * h}.get(kind, 0)
    method = "calibrate" if options.cache_calibrate is not None else options.cache
    return dict(arch=config.arch, tokens=tokens, batch=2 if options.batched_cfg else 1, pixels=w * h * frames,
                bytes_per_param=2 if options.convert_model_dtype else 4, vae_dtype=options.vae_dtype,
                t5_bytes=t5_bytes, t5_cpu=options.t5_cpu, slots=options.stream_blocks or 2,
                vae_bands=options.vae_bands, fp8_linear=options.fp8_linear, encode_pixels=encode_pixels,
                n_models=len(config.experts), vae_version=config.vae_version, per_token_time=kind == "ti2v",
                step_cache=cache_bytes(method, config.arch, tokens, latent * config.arch.out_dim),
                t5_streamed=options.t5_stream, fast_encode=options.fast_encode)


def fast_budget(options, free_gb: float, **kw) -> tuple[object, str]:
    """`--fast` with no budget and no placement flag on one GPU: the card's free memory is the budget. Returns
    (options, log line): unchanged options where both experts and the whole-frame decode fit (the plain `--fast`
    run, no cap), else options with max_gpu_memory = free_gb (the pipeline then plans, streams, bands and caps).
    Raises MemoryPlanError when nothing fits."""
    from dataclasses import replace

    try:
        plan = choose(free_gb, prefer_t5_stream=False, **kw)
    except MemoryPlanError as e:
        raise MemoryPlanError(f"--fast: {free_gb:.1f} GB free on the GPU: {e}") from None
    if plan.placement == "resident" and not plan.vae_bands and not plan.t5_streamed \
            and plan.fast_encode == (options.fast_encode and bool(kw.get("encode_pixels"))):
        return options, f"--fast: {free_gb:.1f} GB free on the GPU; {plan.describe()}"
    budget = math.floor(free_gb * 10) / 10
    return (replace(options, max_gpu_memory=budget, offload_model=None),
            f"--fast: {free_gb:.1f} GB free on the GPU is too little for the resident run; budget {budget:g} GB "
            f"(as --max_gpu_memory {budget:g}): {plan.describe()}")


def choose(budget_gb: float, prefer_t5_stream: bool = True, **kw) -> MemoryPlan:
    """The fastest placement that fits `budget_gb` with margin_gb(budget_gb) to spare: resident, else block
    streaming (measured on the H200 at 720p within 0.3% of resident per forward; it also needs less memory than the
    reference's expert offload, which moves 28.6 GB at each switch, so offload is only ever used when asked for).
    A resident plan whose peak would be T5's whole copy beside the DiTs streams T5 by layers instead (measured on an
    H100: 0.8 s for a 720p run's two prompts, streamed; the embeddings are the same bit for bit): under a budget it
    is preferred (the lower peak); with `prefer_t5_stream` False (the uncapped `--fast` check) only where the whole
    copy does not fit. Where the I2V encode with --fast_encode's reuse does not fit a placement, the plain encode
    (the same latent bit for bit, slower) is tried before the next placement (the plan's fast_encode says which).
    Raises MemoryPlanError (a ValueError, one line) with the smallest budget that would fit."""
    explicit = kw.pop("vae_bands", 0)
    bands = [explicit] if explicit else [0, VAE_BANDS]  # explicit bands win
    encodes = [kw.get("fast_encode", False)] + ([False] if kw.get("fast_encode") and kw.get("encode_pixels") else [])
    plans = []
    for placement in ("resident", "stream"):
        for b in bands:
            for fast_encode in encodes:
                plan = estimate(placement, **{**kw, "fast_encode": fast_encode}, vae_bands=b)
                if placement == "resident" and not plan.t5_streamed and not kw.get("t5_cpu") \
                        and max(plan.phases, key=plan.phases.get) == "text":  # T5's whole copy would be the peak
                    streamed = estimate(placement, **{**kw, "t5_streamed": True, "fast_encode": fast_encode},
                                        vae_bands=b)
                    plans += [streamed, plan] if prefer_t5_stream else [plan, streamed]
                else:
                    plans.append(plan)
    for plan in plans:
        if plan.peak_gb + margin_gb(budget_gb) <= budget_gb:
            return plan
    smallest = min(plans, key=lambda p: p.peak_gb)
    peak = max(smallest.phases, key=smallest.phases.get)  # a switch helps only if it lowers the peak phase
    hint = ", or --t5_cpu" if peak == "text" and not kw.get("t5_cpu") else ""
    if kw.get("vae_dtype") == "fp32" and peak in ("decode", "encode"):
        hint += ", or --vae_dtype bf16"
    need = smallest_budget(smallest.peak_gb)
    raise MemoryPlanError(f"--max_gpu_memory {budget_gb:g} GB is too small for this run even with block streaming "
                          f"(expected {smallest.describe()}); allow at least {need:.1f} GB{hint}, or a smaller "
                          "--size / --frame_num")


ALLOCATOR_SETTING = "expandable_segments:True"


def bound_allocator(device: torch.device, budget_gb: float) -> str:
    """Cap this process at `budget_gb` on `device` and let the caching allocator grow segments in place instead of
    keeping a new block per size (without it, the reserved peak ran 10-40 GB above the allocated one in our runs:
    a 24 GB card would run out with 15 GB allocated). Both are process-wide and stay for the process's lifetime
    (they describe the card being emulated or used); an allocator setting given in PYTORCH_CUDA_ALLOC_CONF wins.
    Returns the allocator setting in effect, for the run's record."""
    if device.type != "cuda":
        return "n/a (CPU)"
    setting = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if setting is None:
        torch.cuda.memory._set_allocator_settings(ALLOCATOR_SETTING)
        setting = ALLOCATOR_SETTING
    else:
        log.info("allocator settings from PYTORCH_CUDA_ALLOC_CONF: %s", setting)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.empty_cache()  # blocks freed while placing the weights count against the cap while cached
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * 1e9 / total), index)
    return setting
