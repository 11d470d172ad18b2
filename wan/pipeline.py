"""`WanPipeline`: what the text-to-video and image-to-video pipelines share (two experts, or one model for TI2V-5B;
two CFG passes per step), with opt-in speed flags. `WanT2V` (wan/text2video.py), `WanI2V` (wan/image2video.py) and
`WanTI2V` (wan/textimage2video.py) add only their inputs: the geometry, the initial noise and, for I2V, the image
condition `y` passed to the DiT; for TI2V's image mode, a latent constraint (wan/latent_constraint.py) the loop
applies before the first step and after every step, and whose per-token timesteps the DiT gets.

Who decides what, once:
- build time (`__init__`): the load-time options (`wan.options`, lifetime "load"), the weights (`wan.formats`:
  every component's files of any layout, resolved once from headers and checked against the task's architecture),
  the placement object (`wan.placement`: the only code that moves weights), weight transforms (LoRA merge, dtype,
  fp8), the memory plan, the parallel layout;
- call time (`_per_call` + `_configured`): the per-call options (kernels, RoPE, time embedding, compile, TF32,
  batched CFG) and a guidance strategy per expert (`wan.guidance`); process-global backend flags and the built
  configuration are restored when the call ends;
- per generation (`_start`, `_encode_text`, `sample`, `_finish`): the result record, T5, the denoising loop (expert
  per step, guidance, scheduler, the TI2V latent constraint, and the step cache's policy when options.cache asks
  for one: `wan.step_cache`) and the VAE decode on rank 0.
The DiTs are `self.models` by the name the loop uses: {"high", "low"} (A14B: an expert switch at the boundary) or
{"model"} (TI2V-5B: TaskConfig.boundary None, no switch; `high_noise_model` and `low_noise_model` then both name it).
The step cache keeps its state per name in that trace, so a one-model task is one segment.
"""
from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .configs import SIZE_CONFIGS, TaskConfig
from .errors import LoadTimeOptionError
from .guidance import choose_guidance
from .modules.attention import resolve_attention
from .modules.checkpoint import load_dit
from .modules.model import WanModel
from .modules.qk_rope import check_request, resolve_qk_rope
from .modules.t5 import T5EncoderModel
from .latent_constraint import NO_CONSTRAINT
from .modules.vae import VAE_DTYPES
from .modules.vae2_2 import VAE_CLASSES
from .options import LOAD_FIELDS, RuntimeOptions
from .placement import choose_placement
from .preflight import LORA_NAMES
from .step_cache import check_cache_request, choose_step_cache, resolve
from .utils.compile import compile_blocks, uncompile_blocks
from .utils.schedulers import build_scheduler, expert_for_timestep

log = logging.getLogger("wan")


class StageTimer:
    """Wall-clock seconds per named stage, synchronising the device only at stage boundaries."""

    def __init__(self, device: torch.device):
        self.device, self.times, self._open = device, {}, {}

    def start(self, name: str) -> None:
        self._sync()
        self._open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self._sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - self._open.pop(name)

    @contextmanager
    def __call__(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextmanager
def backend_flags(tf32: bool):
    """TF32 for fp32 matmuls (and cuDNN, which PyTorch allows by default) for one call; restored afterwards, also
    when the call raises, so an original-path call after a fast one really runs without TF32 matmuls."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32, cudnn.allow_tf32 = tf32, True if tf32 else saved[1]
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@dataclass
class GenerationResult:
    """What one `generate()` call ran: read this instead of poking at the pipeline."""
    seed: int
    steps: int
    solver: str
    expert_trace: list = field(default_factory=list)  # "high" / "low" per step ("model" for one-model tasks)
    timings: dict = field(default_factory=dict)  # stage -> seconds (text_encode, dit_high, dit_low, vae_decode, ...)
    options: RuntimeOptions | None = None  # the resolved options that ran
    backends: dict = field(default_factory=dict)  # attention, rope, time embedding, guidance per expert, placement
    latent: torch.Tensor | None = None
    cache: dict | None = None  # the step cache's record: per step and branch computed / reused (None: off)


class WanPipeline:
    """The build and the per-call machinery of a Wan 2.2 pipeline (see the module docstring)."""

    def __init__(self, config: TaskConfig, checkpoint_dir, device_id: int = 0, rank: int = 0, t5_fsdp: bool = False,
                 dit_fsdp: bool = False, use_sp: bool = False, t5_cpu: bool = False, convert_model_dtype: bool = False,
                 device=None, options: RuntimeOptions | None = None, components: dict | None = None,
                 lora_high=None, lora_low=None, lora_dir=None, lora_strength=1.0, plan_for=None,
                 fp8_kernel: str = "scaled_mm", weights=None):
        """Same arguments as the reference (placement follows options.offload_model); ours: `device` (default
        cuda:device_id, else CPU), `options`, LoRA files (`lora_dir` in the Lightning layout, or per expert; merged
        into the weights at load), and `components` (text_encoder, vae, low_noise_model, high_noise_model: random
        models for benchmarks, used as given; LoRAs are merged into them). `plan_for` = (width, height, frames)
        sizes the memory plan of options.max_gpu_memory (default: the task's default size and frame count).
        `fp8_kernel`: "scaled_mm" (the fp8 GPU kernels) or "emulated" (their math on any device, for tests; it also
        emulates attn_backend flash3_fp8); only read when options ask for fp8. `weights`: per-component paths
        (`wan.formats.WeightPaths`: ComfyUI / Kijai / GGUF / Diffusers files, winning over checkpoint_dir's) or an
        already resolved `wan.formats.ResolvedWeights`; checkpoint_dir may be an official or a Diffusers folder.
        Every file is checked against the task's architecture (an I2V expert's in_dim is 36, a T2V one's 16).
        """
        self.config, self.rank = config, rank
        opts = options or RuntimeOptions()
        # the reference's boolean arguments fold into the options (an explicit True in either wins)
        opts = replace(opts, t5_fsdp=opts.t5_fsdp or t5_fsdp, dit_fsdp=opts.dit_fsdp or dit_fsdp,
                       t5_cpu=opts.t5_cpu or t5_cpu,
                       convert_model_dtype=opts.convert_model_dtype or convert_model_dtype)
        self.device = torch.device(device) if device is not None else (
            torch.device(f"cuda:{device_id}") if torch.cuda.is_available() else torch.device("cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA was asked for but torch.cuda.is_available() is False; pass --device cpu "
                               "(only the tiny model is practical there) or install a CUDA build of torch")
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if use_sp and opts.ulysses_size == 1 and self.world_size > 1:  # reference API: SP over every rank
            opts = replace(opts, ulysses_size=self.world_size // (1 + opts.cfg_parallel))
        self.num_train_timesteps, self.boundary = config.num_train_timesteps, config.boundary
        self.vae_stride, self.patch_size = config.vae_stride, config.patch_size
        self.sample_neg_prompt = config.sample_neg_prompt
        self.loras = self._lora_files(lora_dir, lora_high, lora_low, lora_strength)
        self.weights = weights  # WeightPaths or ResolvedWeights; resolved (headers read) in _load

        self.cfg_group, self.cfg_rank, self.sp_group, mesh = None, 0, None, None
        if self.world_size > 1:
            from .distributed.setup import parallel_groups

            groups = parallel_groups(opts, self.device, config.arch.num_heads)
            self.cfg_group = groups.cfg_group if opts.cfg_parallel else None
            self.cfg_rank, self.sp_group, mesh = groups.cfg_rank, groups.sp_group, groups.fsdp_mesh
        elif opts.ulysses_size > 1 or opts.cfg_parallel or opts.dit_fsdp or opts.t5_fsdp:
            raise ValueError("ulysses_size > 1, cfg_parallel, dit_fsdp and t5_fsdp need torchrun (several ranks); "
                             "this process is alone")
        self.sp_size = opts.ulysses_size
        param_dtype = config.param_dtype if self.device.type == "cuda" else torch.float32
        self.memory_plan, self.allocator = None, "default"
        if opts.max_gpu_memory:
            opts = self._plan_memory(opts, checkpoint_dir, plan_for, components)
        self.placement, offload = choose_placement(opts.offload_model, self.device, self.world_size, opts.t5_cpu,
                                                   opts.dit_fsdp, opts.t5_fsdp, mesh, param_dtype, opts.stream_blocks,
                                                   opts.t5_stream)
        if opts.convert_model_dtype and self.device.type == "cpu":
            # bf16 weights need the CUDA bf16 autocast the reference runs under; record that fp32 is what runs
            log.warning("convert_model_dtype has no effect on the CPU: the DiT runs in fp32 there")
            opts = replace(opts, convert_model_dtype=False)
        self.options = replace(opts, offload_model=offload)  # the resolved options: what runs
        self._attention_cache: dict = {}
        self.load_timings: dict = {}
        self.fp8: dict = {}  # expert -> Fp8Summary, when options.fp8_linear converts linears
        self._check_fp8(fp8_kernel)
        self._fused_qk_rope(self.options)  # refused before anything loads

        t0 = time.perf_counter()
        self._load(checkpoint_dir, components, fp8_kernel)
        self._convert_fp8(fp8_kernel)  # after any LoRA merge, before the placement moves the experts
        self.placement.attach(self.models, self.text_encoder)
        if self.options.max_gpu_memory:  # capped once the weights are placed (benchmarks build them on the GPU)
            from .memory_plan import bound_allocator

            self.allocator = bound_allocator(self.device, self.options.max_gpu_memory)
        for model in self.models.values():
            model.set_sequence_parallel(self.sp_group)
        self._configure_call(self.options)
        self.load_seconds = time.perf_counter() - t0
        self.last_result: GenerationResult | None = None
        log.info("loaded in %.1f s; %s; DiT %s; VAE %s; options %s", self.load_seconds, self.placement.describe(),
                 next(self.high_noise_model.parameters()).dtype, self.options.vae_dtype,
                 self.options.changed() or "original path")

    @property
    def models(self) -> dict:
        """The DiTs by the name the sample loop uses: {"high": ..., "low": ...}, or {"model": ...} (one-model task)."""
        if self.config.boundary is None:
            return {"model": self.model}
        return {"high": self.high_noise_model, "low": self.low_noise_model}

    @property
    def offload_model(self) -> bool:
        """The built placement's offload setting (read-only; set it with options.offload_model at build)."""
        return self.options.offload_model

    # ---- build time ----------------------------------------------------------------------------------------
    def _plan_memory(self, opts: RuntimeOptions, checkpoint_dir, plan_for, components) -> RuntimeOptions:
        """Pick the placement for options.max_gpu_memory (unless one was given explicitly) and cap the process."""
        from .memory_plan import choose, estimate, plan_inputs, t5_weight_bytes

        cfg = self.config
        w, h = plan_for[:2] if plan_for else SIZE_CONFIGS[cfg.default_size]
        frames = plan_for[2] if plan_for else cfg.frame_num
        if hasattr(self.weights, "t5"):  # resolved already (generate.py): the T5 as it will be held
            t5_bytes = self.weights.t5.param_bytes(cfg.t5_dtype)
        else:  # planned before any file is read: the official .pth's size, else umt5-xxl's
            t5_file = Path(checkpoint_dir) / cfg.t5_checkpoint if checkpoint_dir else None
            t5_bytes = t5_weight_bytes(t5_file, (components or {}).get("text_encoder"))
        kw = plan_inputs(cfg, opts, (w, h, frames), t5_bytes)
        explicit = opts.offload_model is not None or opts.stream_blocks
        if explicit:  # an explicit placement wins; say what it is expected to need
            name = "stream" if opts.stream_blocks else ("offload" if opts.offload_model else "resident")
            self.memory_plan = estimate(name, **kw)
        else:
            self.memory_plan = choose(opts.max_gpu_memory, **kw)
            if self.memory_plan.placement == "stream":
                opts = replace(opts, offload_model=False, stream_blocks=2)
            else:
                opts = replace(opts, offload_model=self.memory_plan.placement == "offload")
            opts = replace(opts, vae_bands=opts.vae_bands or self.memory_plan.vae_bands,
                           t5_stream=opts.t5_stream or self.memory_plan.t5_streamed)
            if kw["fast_encode"] and kw["encode_pixels"] and not self.memory_plan.fast_encode:
                log.warning("memory plan: --fast_encode is off for this pipeline: its reuse of repeated layers holds "
                            "more than this budget leaves (measured on an H100 at 720p: 19.4 against 17.3 GB in "
                            "fp32); the plain encode gives the same latent bit for bit, slower (there 4.7 against "
                            "1.5 s); --vae_dtype bf16 halves both")
                opts = replace(opts, fast_encode=False)
        log.info("memory plan for %dx%d, %d frames under %.1f GB: %s%s", w, h, frames, opts.max_gpu_memory,
                 self.memory_plan.describe(), " (explicit placement)" if explicit else "")
        return opts

    def _check_fp8(self, kernel: str) -> None:
        """Before anything loads: refuse an fp8 option where it cannot run (no silent bf16 fallback). An fp8
        attention backend is resolved (and probed) here already, and cached for the calls."""
        from .modules.fp8 import KERNELS, check_fp8_support

        opts = self.options
        if kernel not in KERNELS:
            raise ValueError(f"fp8_kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if opts.fp8_linear != "none" and kernel == "scaled_mm":
            check_fp8_support(self.device, "--fp8_linear")
        if kernel == "emulated":  # every fp8 path of this pipeline emulated, per-call flash3_fp8 included
            from .modules.attention import emulated_fp8_attention

            self._attention_cache["flash3_fp8"] = emulated_fp8_attention()
        elif opts.attn_backend == "flash3_fp8":
            self._attention_cache["flash3_fp8"] = resolve_attention("flash3_fp8", self.device)

    def _convert_fp8(self, kernel: str) -> None:
        """options.fp8_linear: the experts' block linears to e4m3, quantised from the loaded (LoRA-merged) weights
        on the run device. Nothing happens with fp8_linear none (the original path)."""
        if self.options.fp8_linear == "none":
            return
        from .modules.fp8 import convert_linears_to_fp8_

        t0 = time.perf_counter()
        done: dict = {}  # one expert object may serve both noise levels (benchmarks)
        for expert, model in self.models.items():
            if id(model) not in done:
                done[id(model)] = convert_linears_to_fp8_(model, self.options.fp8_linear, kernel, self.device)
                log.info("fp8 %s: %s", "model" if expert == "model" else f"{expert}-noise expert",
                         done[id(model)].describe())
            self.fp8[expert] = done[id(model)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.load_timings["fp8_convert"] = time.perf_counter() - t0

    def _lora_files(self, lora_dir, lora_high, lora_low, strength) -> dict:
        """{"high": (path, strength), "low": ...}: explicit per-expert files win over lora_dir's."""
        if self.config.boundary is None and (lora_dir or lora_high or lora_low):
            raise ValueError(f"{self.config.name} has one DiT and no LoRA layout is published for it; LoRAs "
                             "(--lora_dir, --lora_high, --lora_low) are for the two-expert A14B tasks")
        s = (float(strength), float(strength)) if isinstance(strength, (int, float)) else tuple(map(float, strength))
        if len(s) != 2:
            raise ValueError(f"lora_strength must be one number or (high, low), got {strength!r}")
        files = {}
        for i, (expert, explicit) in enumerate((("high", lora_high), ("low", lora_low))):
            path = explicit or (Path(lora_dir) / LORA_NAMES[expert] if lora_dir else None)
            if path is not None:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"LoRA file {path} for the {expert}-noise expert does not exist")
                files[expert] = (Path(path), s[i])
        return files

    def _lora(self, expert: str):
        if expert not in self.loras:
            return None
        from .lora import LoraMerge

        path, strength = self.loras[expert]
        return LoraMerge(path, strength)

    def _resolve_weights(self, checkpoint_dir, weights):
        """Every component's files, layout and plan, from headers (wan.formats); nothing is loaded yet."""
        from .formats import ResolvedWeights, resolve_weights

        if isinstance(weights, ResolvedWeights):
            return weights
        resolved = resolve_weights(self.config, checkpoint_dir, weights)
        for line in resolved.describe():
            log.info("weights: %s", line)
        return resolved

    def _load(self, checkpoint_dir, components, fp8_kernel: str):
        dit_dtype = self.config.param_dtype if self.options.convert_model_dtype else None
        vae_dtype = VAE_DTYPES[self.options.vae_dtype]
        if components is not None:
            self.text_encoder, self.vae = components["text_encoder"], components["vae"]
            if self.config.boundary is None:  # one model: components["model"]
                self.model = self.low_noise_model = self.high_noise_model = components["model"]
            else:
                self.low_noise_model = components["low_noise_model"]
                self.high_noise_model = components["high_noise_model"]
            if self.vae is not None and self.vae.dtype != vae_dtype:
                raise ValueError(f"the given VAE is {self.vae.dtype}, options ask for "
                                 f"vae_dtype={self.options.vae_dtype}")
            if self.vae is not None:
                self.vae.decode_bands = self.options.vae_bands  # a decode mode, not a weight change
            for expert, model in self.models.items():
                if expert in self.loras:
                    from .lora import merge_lora_

                    t0 = time.perf_counter()
                    log.info("LoRA %s-noise expert: %s", expert, merge_lora_(model, *self.loras[expert]))
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.load_timings[f"lora_merge_{expert}"] = time.perf_counter() - t0
            return
        files = self.weights = self._resolve_weights(checkpoint_dir, self.weights)  # headers: keys, shapes
        loras = {e: self._lora(e) for e in ("high", "low")}  # read and checked before minutes of loading
        self.text_encoder = T5EncoderModel(
            text_len=self.config.text_len, dtype=self.config.t5_dtype, device=torch.device("cpu"),
            checkpoint_path=files.t5, tokenizer_path=str(files.tokenizer))
        self.vae = VAE_CLASSES[self.config.vae_version](vae_pth=files.vae, dtype=vae_dtype, device=self.device,
                                                        decode_bands=self.options.vae_bands)
        dev = self.placement.load_device
        fp8 = (self.options.fp8_linear, fp8_kernel) if self.options.fp8_linear != "none" else None
        if self.config.boundary is None:  # one model (TI2V-5B): --dit, or the folder's DiT
            self.model = load_dit(WanModel, files.model, dit_dtype, dev, fp8=fp8)
            self.low_noise_model = self.high_noise_model = self.model
            return
        self.low_noise_model = load_dit(WanModel, files.low, dit_dtype, dev, transform=loras["low"], fp8=fp8)
        self.high_noise_model = load_dit(WanModel, files.high, dit_dtype, dev, transform=loras["high"], fp8=fp8)
        for expert, lora in loras.items():
            if lora is not None:
                log.info("LoRA %s-noise expert: %s", expert, lora.summary())

    # ---- call time -----------------------------------------------------------------------------------------
    def _check_call_options(self, options: RuntimeOptions | None) -> RuntimeOptions:
        """The options for one call: per-call fields from `options`, load-time fields must match the build."""
        if options is None:
            return self.options
        # resolve the load-time fields the way __init__ did, then compare
        resolved = replace(options, offload_model=self.options.offload_model if options.offload_model is None
                           else options.offload_model)
        if (options.offload_model is None and not options.stream_blocks
                and options.max_gpu_memory == self.options.max_gpu_memory):  # the same memory plan
            resolved = replace(resolved, stream_blocks=self.options.stream_blocks)
        if not options.vae_bands and options.max_gpu_memory == self.options.max_gpu_memory:  # the plan's bands
            resolved = replace(resolved, vae_bands=self.options.vae_bands)
        if self.device.type == "cpu":
            resolved = replace(resolved, convert_model_dtype=False, offload_model=False)
        if resolved.fast_encode and self.memory_plan is not None and self.memory_plan.phases.get("encode") \
                and not self.memory_plan.fast_encode and not self.options.fast_encode:
            log.warning("--fast_encode off for this call: the memory plan of this pipeline counted the plain encode "
                        "(the reuse holds more than the budget leaves); the same latent bit for bit")
            resolved = replace(resolved, fast_encode=False)
        changed = [f for f in LOAD_FIELDS if getattr(resolved, f) != getattr(self.options, f)]
        if changed:
            f = changed[0]
            raise LoadTimeOptionError(
                f"{f} is a load-time option (built with {getattr(self.options, f)!r}, asked for "
                f"{getattr(resolved, f)!r}); build a new {type(self).__name__} with it")
        return resolved

    def _configure_call(self, options: RuntimeOptions) -> None:
        """Kernels, RoPE form, time embedding and compile for both experts, as a fresh build with `options`."""
        if options.attn_backend not in self._attention_cache:
            self._attention_cache[options.attn_backend] = resolve_attention(options.attn_backend, self.device)
        self.attention = self._attention_cache[options.attn_backend]
        qk_rope = self._fused_qk_rope(options)
        for model in self.models.values():
            model.configure(self.attention, fast_rope=options.fast_rope,
                            fast_time_embedding=options.fast_time_embedding, qk_rope=qk_rope,
                            ffn_chunks=options.ffn_chunks)
            if options.compile:
                compile_blocks(model, options.compile_mode)
            else:
                uncompile_blocks(model)
        self.call_options = options

    def _fused_qk_rope(self, options: RuntimeOptions):
        """options.fused_qk_rope: the Triton kernel (probed), or a one-line error where it cannot run; None if off."""
        if not options.fused_qk_rope:
            return None
        check_request(options.fast_rope, compile=options.compile)
        return resolve_qk_rope(self.device)  # the device checks, triton, a probe

    def _per_call(self, offload_model, options: RuntimeOptions | None, prompt: str, frame_num: int, guide_scale,
                  steps: int | None = None):
        """Check one generate() call's shared arguments (`steps`: the sampling steps, for the step cache); returns
        (options, guide (low, high), guidance per expert)."""
        if offload_model is not None and bool(offload_model) != self.options.offload_model:
            raise LoadTimeOptionError(
                f"offload_model={offload_model} disagrees with the built placement ({self.placement.name}); "
                f"build a new {type(self).__name__} with options.offload_model set")
        opts = self._check_call_options(options)
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty; pass --prompt \"...\"")
        if (frame_num - 1) % 4 != 0 or frame_num < 1:
            raise ValueError(f"frame_num must be 4n+1 (e.g. 77 or 81), got {frame_num}")
        if steps is not None:  # few-step runs refused, the ratio file read: before T5 runs
            check_cache_request(opts, steps, self.config.arch.model_type)
        guide = (guide_scale, guide_scale) if isinstance(guide_scale, (int, float)) else tuple(guide_scale)
        return opts, guide, self._guidance(guide, opts.batched_cfg)

    def _guidance(self, guide: tuple[float, float], batched: bool) -> dict:
        """A guidance strategy per DiT name: the high-noise expert gets guide[1], every other model guide[0]."""
        return {name: choose_guidance(guide[1] if name == "high" else guide[0], batched, self.cfg_group,
                                      self.cfg_rank) for name in self.models}

    def _expert_trace(self, timesteps: list) -> list[str]:
        """The DiT name per step: the expert for t (t >= boundary: high), or "model" throughout (one model)."""
        if self.boundary is None:
            return ["model"] * len(timesteps)
        return [expert_for_timestep(t, self.boundary * self.num_train_timesteps) for t in timesteps]

    @contextmanager
    def _configured(self, opts: RuntimeOptions):
        """Run the body with the call's options (kernels, compile, TF32), then back to the built configuration,
        also when the body raises."""
        if opts != self.call_options:
            self._configure_call(opts)
        try:
            with backend_flags(opts.tf32):
                yield
        finally:
            if opts != self.options:
                self._configure_call(self.options)  # back to the built configuration

    # ---- one generation: the parts both tasks run ----------------------------------------------------------
    def _start(self, seed: int, steps: int, solver: str, opts: RuntimeOptions, guidance: dict):
        """(timer, result, seed generator): the seed drawn if -1, `last_result` recorded, the kernels logged."""
        timer = StageTimer(self.device)
        seed = seed if seed >= 0 else random.randint(0, sys.maxsize)
        seed_g = torch.Generator(device=self.device).manual_seed(seed)
        result = GenerationResult(seed=seed, steps=steps, solver=solver, timings=timer.times, options=opts,
                                  backends=self.backends(guidance))
        self.last_result = result
        log.info("kernels: %s", {k: result.backends[k] for k in ("attention", "rope", "qk_norm_rope", "ffn",
                                                                  "time_embedding", "compile")})
        return timer, result, seed_g

    def _encode_text(self, prompt: str, n_prompt: str, guidance: dict, timer: StageTimer):
        """(context, context_null) on the device; the negative prompt (default: the config's) only when a guidance
        strategy needs it."""
        n_prompt = n_prompt or self.sample_neg_prompt
        with timer("text_encode"):
            context = self.placement.encode([prompt])
            needs_negative = any(g.needs_negative for g in guidance.values())
            context_null = self.placement.encode([n_prompt]) if needs_negative else None
        if self.device.type != "cuda":  # no bf16 autocast on CPU: the fp32 DiT takes fp32 context
            context = [u.float() for u in context]
            context_null = [u.float() for u in context_null] if context_null is not None else None
        return context, context_null

    def _finish(self, latent: torch.Tensor, timer: StageTimer, result: GenerationResult, return_latents: bool):
        """After sampling: the placement released, the VAE decode on rank 0; (video, latent) or video."""
        self.placement.release()
        result.latent = latent
        video = None
        if self.rank == 0:
            with timer("vae_decode"):
                video = self.vae.decode([latent])[0]
        log.info("stage seconds: %s", {k: round(v, 2) for k, v in timer.times.items()})
        return (video, latent) if return_latents else video

    def backends(self, guidance: dict | None = None) -> dict:
        """What runs: kernels, RoPE and time-embedding forms, compile, guidance, placement, LoRAs."""
        model = next(iter(self.models.values()))
        out = {"attention": self.attention.name, "rope": model.rope.name,
               "qk_norm_rope": model.qk_rope.name if model.qk_rope else "norm, then RoPE (reference)",
               "time_embedding": "per sample" if model.fast_time_embedding else "per token (reference)",
               "ffn": model.ffn_runner.name,
               "compile": self.call_options.compile_mode if self.call_options.compile else "off",
               "placement": self.placement.name, "sequence_parallel": self.sp_size,
               "loras": {e: f"{p.name} x {s}" for e, (p, s) in self.loras.items()},
               "fp8_linear": {e: s.describe() for e, s in self.fp8.items()} if self.fp8 else "off"}
        cache = resolve(self.call_options, self.config.arch.model_type)
        out["step_cache"] = cache.describe() if cache else "off"
        if guidance:
            out["guidance"] = {k: g.name for k, g in guidance.items()}
        return out

    def _calibration_record(self, noise, seq_len, solver, steps, shift, guide, trace, result) -> dict | None:
        """What a --cache_calibrate file says it was measured on (None when not calibrating)."""
        if self.call_options.cache_calibrate is None:
            return None
        return dict(task=self.config.name, latent=list(noise.shape), seq_len=seq_len, solver=solver, steps=steps,
                    shift=shift, guide=list(guide), high_noise_steps=trace.count("high"),
                    loras={e: f"{p.name} x {s}" for e, (p, s) in self.loras.items()},
                    options=self.call_options.changed(), seed=result.seed if result is not None else None)

    def sample(self, noise, context, context_null, seq_len: int, sample_solver: str, sampling_steps: int,
               shift: float, guide: tuple[float, float], timer: StageTimer | None = None, max_steps: int | None = None,
               step_callback=None, guidance: dict | None = None, result: GenerationResult | None = None,
               y: torch.Tensor | None = None, constraint=NO_CONSTRAINT, cache=None) -> torch.Tensor:
        """The denoising loop: noise [C, F, H, W] -> latent. No host sync inside the loop except at the (single)
        expert switch (and where an adaptive step cache decides); `max_steps` stops early;
        `step_callback(i, t, expert, prediction)` runs after each step. `guidance` ({name: strategy} per DiT name)
        defaults to what the call options choose, and so does `cache` (a `wan.step_cache` policy for this loop, or
        None with the cache off). `y` (I2V): the condition [C_y, F, H, W] given to the DiT with every pass, the same
        for both CFG branches. `constraint` (TI2V image mode, wan/latent_constraint.py): applied to the noise and
        after every scheduler step, and it gives the timesteps the DiT sees (per token); the default changes
        nothing."""
        timer = timer or StageTimer(self.device)
        if guidance is None:
            guidance = self._guidance(guide, self.call_options.batched_cfg)
        scheduler, timesteps = build_scheduler(sample_solver, sampling_steps, shift, self.device,
                                               self.num_train_timesteps)
        scheduler.set_begin_index(0)  # no timestep lookup (a device sync) at the first step
        t_all = timesteps.tolist()  # one sync here
        t_host = t_all[:max_steps]
        trace_all = self._expert_trace(t_all)  # the whole schedule, for the step cache
        trace = trace_all[:len(t_host)]
        log.info("%d steps (%s); guidance %s", len(t_host), "one model" if self.boundary is None else
                 f"{trace.count('high')} high-noise, {trace.count('low')} low-noise",
                 {k: g.name for k, g in guidance.items()})
        if result is not None:
            result.expert_trace = trace
        if cache is None:  # one policy per generation: nothing carries over from an earlier one
            cache = choose_step_cache(self.call_options, self.config.arch.model_type, trace_all, guidance,
                                      device=self.device, seq_len=seq_len, sp_group=self.sp_group,
                                      cfg_group=self.cfg_group, rank=self.rank,
                                      measured=self._calibration_record(noise, seq_len, sample_solver,
                                                                        sampling_steps, shift, guide, trace_all,
                                                                        result))
        latent, current, model = constraint.apply(noise), None, None
        autocast = torch.autocast(self.device.type, dtype=self.config.param_dtype, enabled=self.device.type == "cuda")
        bar = tqdm(t_host, desc="denoise", unit="step", disable=self.rank != 0)
        with autocast:
            for i, t in enumerate(bar):
                expert = trace[i]
                if expert != current:  # once per generation: time each expert's segment as one stage
                    if current is not None:
                        timer.stop(f"dit_{current}")
                    with timer("expert_switch"):
                        model = self.placement.expert(expert)
                    timer.start(f"dit_{expert}")
                    current = expert
                g = guide[1] if expert == "high" else guide[0]
                # the step cache (if on) hands out this step's DiT: computing, or reusing an earlier step's work
                step_model = model if cache is None else cache.model_for_step(i, expert, model, latent)
                noise_pred = guidance[expert](step_model, latent, constraint.timesteps(timesteps[i:i + 1]), context,
                                              context_null, seq_len, g, y=y)
                latent = scheduler.step(noise_pred.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False)[0]
                latent = constraint.apply(latent.squeeze(0))
                if step_callback is not None:
                    step_callback(i, t, expert, noise_pred)
                bar.set_postfix(expert=expert, t=round(float(t), 2))
        if current is not None:
            timer.stop(f"dit_{current}")
        if cache is not None:
            cache.finish(result)  # its tensors freed before the decode; what ran recorded
        return latent
