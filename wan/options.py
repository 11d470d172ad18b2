"""Runtime options: every speed switch in one frozen object, split by lifetime. The CLI mirrors these fields 1:1.

Each field defaults to the original path (the reference's behaviour) and carries its lifetime in its metadata:
- "load": fixed when the pipeline is built (where weights live, their dtype, the parallel layout). Changing one
  needs a new pipeline; `WanT2V.generate(options=...)` raises `LoadTimeOptionError` naming the field.
- "call": chosen per `generate()` call (kernels, RoPE form, guidance batching, TF32, compile). A call with other
  per-call options runs exactly as a pipeline freshly built with them would.
`fast_options()` turns on every switch that keeps the output equal to the original path within bf16 rounding;
explicit settings override the preset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from .modules.attention import BACKENDS
from .modules.fp8 import FP8_LINEAR
from .modules.vae import VAE_DTYPES
from .step_cache import CACHES, EASYCACHE, MAGCACHE, check_cache_options

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")


def _load(help: str, **meta):
    return {"help": help, "lifetime": "load", **meta}


def _call(help: str, **meta):
    return {"help": help, "lifetime": "call", **meta}


@dataclass(frozen=True)
class RuntimeOptions:
    # ---- load-time: placement, weight dtypes, parallel layout (reference flags first) ----
    offload_model: bool | None = field(default=None, metadata=_load(
        "swap the experts (and T5) through host memory, as the reference; default: true on one GPU, false with "
        "several or on the CPU"))
    convert_model_dtype: bool = field(default=False, metadata=_load("DiT weights in bf16 (they are fp32 on disk)"))
    t5_cpu: bool = field(default=False, metadata=_load("run the T5 text encoder on the CPU"))
    t5_stream: bool = field(default=False, metadata=_load(
        "resident run: stream the T5 encoder by layers through 2 GPU buffers (its token embedding stays in host "
        "memory): about 0.8 GB of T5 on the GPU instead of its whole 11.4 GB copy, the same embeddings bit for bit; "
        "--stream_blocks does this anyway, --max_gpu_memory turns it on where that copy would be the peak"))
    stream_blocks: int = field(default=0, metadata=_load(
        "keep both experts in host memory and stream the running DiT blocks through this many GPU buffers "
        "(2-4; 0: off): for cards that cannot hold an expert"))
    max_gpu_memory: float = field(default=0.0, metadata=_load(
        "GB this run may use on the GPU: picks resident, expert offload or block streaming from measured costs "
        "(an explicit --offload_model or --stream_blocks wins), refuses before loading if nothing fits, and caps the "
        "process there; 0: off"))
    vae_dtype: str = field(default="fp32", metadata=_load(
        "VAE weights and decode dtype (the reference: fp32)", choices=tuple(VAE_DTYPES)))
    fp8_linear: str = field(default="none", metadata=_load(
        "fp8 (e4m3) weights and per-token fp8 activations for the DiT blocks' linears: ffn (both FFN linears), "
        "attn_proj (self-attention q k v o, cross-attention q o), all (both); an approximation (about 4e-2 relative "
        "error per linear), opt-in, never part of --fast; needs an fp8 GPU (compute capability 8.9+)",
        choices=FP8_LINEAR))
    vae_bands: int = field(default=0, metadata=_load(
        "decode each frame in this many bands of rows (exact: a halo of rows is recomputed, about 1/6 more decode work "
        "with 4): a lower decode peak for small cards; 0: whole frames (--max_gpu_memory picks it when needed)"))
    ulysses_size: int = field(default=1, metadata=_load("Ulysses sequence-parallel degree (torchrun)"))
    cfg_parallel: bool = field(default=False, metadata=_load(
        "the two CFG passes on two halves of the world (torchrun)"))
    dit_fsdp: bool = field(default=False, metadata=_load("FSDP-shard the DiT experts (torchrun)"))
    t5_fsdp: bool = field(default=False, metadata=_load("FSDP-shard the T5 encoder (torchrun)"))
    # ---- per call: exact speed switches ----
    attn_backend: str = field(default="auto", metadata=_call(
        "attention kernel: auto = FA3 if importable on Hopper, else cuDNN SDPA on Hopper, else flash-attn 2, "
        "else PyTorch's default; flash3_fp8 = FA3 on e4m3 q, k, v for the self-attention (per batch and head "
        "scales, keys and values smoothed; cross-attention stays bf16): an approximation, opt-in, never part of "
        "--fast, Hopper only", choices=BACKENDS))
    batched_cfg: bool = field(default=False, metadata=_call(
        "conditional + unconditional pass as one batch-2 forward"))
    tf32: bool = field(default=False, metadata=_call(
        "TF32 for fp32 matmuls (convolutions use TF32 either way, PyTorch's default); set for the call only"))
    compile: bool = field(default=False, metadata=_call(
        "torch.compile the repeated DiT block (shared by both experts)"))
    compile_mode: str = field(default="default", metadata=_call("torch.compile mode", choices=COMPILE_MODES))
    fast_time_embedding: bool = field(default=False, metadata=_call(
        "one time embedding per sample, not per token (exact for t2v: every token has the same t)"))
    fast_rope: bool = field(default=False, metadata=_call(
        "RoPE in fp32 from cached cos/sin tables (no complex128, no per-forward table building)"))
    ffn_chunks: int = field(default=0, metadata=_call(
        "run each DiT FFN over N token chunks (2 to 16): bounds its [tokens, 13824] intermediate; the same rows "
        "within rounding; 0: whole (the reference)"))
    fast_encode: bool = field(default=False, metadata=_call(
        "image-to-video: the condition's VAE encode reuses each layer's previous output once its inputs repeat "
        "(the black frames after the image), bit for bit the plain encode; a third of the work at 81 frames"))
    fused_qk_rope: bool = field(default=False, metadata=_call(
        "self-attention q/k RMSNorm + weight + RoPE + bf16 cast in one Triton kernel (the --fast_rope math, q and k "
        "written once in bf16); needs --fast_rope, a CUDA GPU and triton; not in --fast until measured on a GPU"))
    # ---- per call: step caching, an approximation (opt-in, never part of --fast; wan/step_cache.py) ----
    cache: str = field(default="none", metadata=_call(
        "step caching for runs of 10+ steps: on some steps reuse what the DiT computed at an earlier one (an "
        "approximation, opt-in, never part of --fast): magcache (the block stack's residual, a schedule fixed by "
        "the published magnitude ratios, logged before the first step) or easycache (the model's whole update, "
        "adaptive); none: the original loop and forward", choices=CACHES))
    cache_thresh: float | None = field(default=None, metadata=_call(
        "the cache's error threshold: a step is reused while its accumulated error stays below it (larger: more "
        f"reuse, more error); default: the published setting, magcache {MAGCACHE['t2v'].thresh:g}, easycache "
        f"{EASYCACHE['t2v'].thresh:g} (i2v {EASYCACHE['i2v'].thresh:g})", metavar="X"))
    cache_max_skip: int | None = field(default=None, metadata=_call(
        "at most this many reused steps in a row (0: never reuse); default: magcache "
        f"{MAGCACHE['t2v'].max_skip} (published), easycache no limit (published)", metavar="N"))
    cache_retention: float | None = field(default=None, metadata=_call(
        "magcache: the fraction of each expert's steps computed at its start (i2v: of the low-noise expert's; the "
        f"high-noise one computes every step, as published); default: the published {MAGCACHE['t2v'].retention:g} "
        f"(i2v {MAGCACHE['i2v'].retention:g})", metavar="R"))
    cache_warmup: int | None = field(default=None, metadata=_call(
        f"easycache: the first N steps are computed; default: the published {EASYCACHE['t2v'].warmup}", metavar="N"))
    cache_ratios: str | None = field(default=None, metadata=_call(
        "magcache: magnitude ratios measured with --cache_calibrate (JSON) instead of the published ones for the "
        "task; resampled (nearest) to the step count; default: the published T2V-A14B / I2V-A14B ratios (ti2v has "
        "none: required there)",
        metavar="FILE"))
    cache_calibrate: str | None = field(default=None, metadata=_call(
        "a normal run (nothing reused: the uncached result) that also measures the magcache ratios on these weights, "
        "LoRAs, size and step count, and writes them to this JSON file for --cache_ratios; default: off",
        metavar="FILE"))

    def __post_init__(self):
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {self.attn_backend!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.vae_dtype not in VAE_DTYPES:
            raise ValueError(f"vae_dtype must be one of {', '.join(VAE_DTYPES)}, got {self.vae_dtype!r}")
        if self.fp8_linear not in FP8_LINEAR:
            raise ValueError(f"fp8_linear must be one of {', '.join(FP8_LINEAR)}, got {self.fp8_linear!r}")
        if self.fp8_linear != "none" and self.dit_fsdp:
            raise ValueError("--fp8_linear cannot be combined with --dit_fsdp: FSDP gathers the weights in bf16 and "
                             "would turn the e4m3 weights back into bf16; drop one of them")
        if not 0 <= self.vae_bands <= 64:
            raise ValueError(f"vae_bands must be 0 (whole frames) or 1..64 bands, got {self.vae_bands}")
        if self.ffn_chunks not in (0, 1) and not 2 <= self.ffn_chunks <= 16:
            raise ValueError(f"ffn_chunks must be 0 (whole) or 2..16 token chunks, got {self.ffn_chunks}")
        if self.ulysses_size < 1:
            raise ValueError(f"ulysses_size must be >= 1, got {self.ulysses_size}")
        if not (math.isfinite(self.max_gpu_memory) and 0 <= self.max_gpu_memory <= 10_000):
            raise ValueError(f"max_gpu_memory must be a finite number of GB >= 0 (0: off), got {self.max_gpu_memory}")
        if not 0 <= self.stream_blocks <= 40:
            raise ValueError(f"stream_blocks must be 0 (off) or 1..40 buffers, got {self.stream_blocks}")
        if self.t5_stream and (self.t5_cpu or self.offload_model or self.t5_fsdp):
            raise ValueError("--t5_stream streams T5 through the GPU: it cannot be combined with --t5_cpu, "
                             "--offload_model true (the reference's placement moves T5 whole) or --t5_fsdp; drop one")
        if self.stream_blocks and (self.offload_model or self.dit_fsdp):
            raise ValueError("--stream_blocks cannot be combined with --offload_model true or --dit_fsdp: it is its "
                             "own placement (blocks in host memory, streamed to the GPU)")
        check_cache_options(self)
        if self.stream_blocks and self.compile and self.compile_mode == "max-autotune":
            raise ValueError("compile_mode max-autotune records CUDA graphs with fixed weight addresses, which block "
                             "streaming swaps; use compile_mode default or max-autotune-no-cudagraphs")

    def changed(self) -> dict:
        """Fields that differ from the original path (for logs and benchmark records)."""
        base = RuntimeOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)}

    def with_reference_calls(self) -> "RuntimeOptions":
        """These load-time choices with every per-call switch at the original path (an A/B on the same weights)."""
        return replace(self, **{f.name: f.default for f in fields(self) if f.metadata["lifetime"] == "call"})



LOAD_FIELDS = tuple(f.name for f in fields(RuntimeOptions) if f.metadata["lifetime"] == "load")
CALL_FIELDS = tuple(f.name for f in fields(RuntimeOptions) if f.metadata["lifetime"] == "call")

# The --fast preset: all switches that keep the output equal to the original path within bf16 rounding.
# vae_dtype stays fp32: a bf16 decode differs from fp32 by more than bf16 rounding of the output (measured), so it is
# an opt-in approximation; so are fp8_linear, attn_backend flash3_fp8 and the step caches (each with its measured
# error).
FAST_PRESET = dict(offload_model=False, convert_model_dtype=True, batched_cfg=True, tf32=True, compile=True,
                   fast_time_embedding=True, fast_rope=True, fast_encode=True)


def fast_options(base: RuntimeOptions | None = None, **explicit) -> RuntimeOptions:
    """The --fast preset on top of `base`, then `explicit` settings (which always win). With a memory budget
    (max_gpu_memory) the preset leaves the placement to the memory plan: resident only where it fits."""
    base = base or RuntimeOptions()
    preset = dict(FAST_PRESET)
    if explicit.get("max_gpu_memory", base.max_gpu_memory):
        del preset["offload_model"]
    return replace(base, **{**preset, **explicit})


def check_parallel_layout(options: RuntimeOptions, world: int, num_heads: int = 40) -> None:
    """World size must equal ulysses_size x (2 with CFG parallel); the heads must divide by ulysses_size.
    Raises ValueError with one line that names the fix."""
    cfg_ways = 2 if options.cfg_parallel else 1
    if world == 1 and (options.ulysses_size > 1 or options.cfg_parallel or options.dit_fsdp or options.t5_fsdp):
        raise ValueError("--ulysses_size > 1, --cfg_parallel, --dit_fsdp and --t5_fsdp need torchrun, e.g. "
                         "torchrun --nproc_per_node=4 generate.py ... --ulysses_size 4")
    if world > 1 and options.ulysses_size * cfg_ways != world:
        raise ValueError(f"world size {world} must equal ulysses_size ({options.ulysses_size}) x "
                         f"{cfg_ways} (cfg_parallel={options.cfg_parallel})")
    if num_heads % options.ulysses_size != 0:
        divisors = ", ".join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0)
        raise ValueError(f"--ulysses_size {options.ulysses_size} must divide the {num_heads} attention heads "
                         f"({divisors})")
