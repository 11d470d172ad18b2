"""`WanT2V`: the reference's text-to-video pipeline (two experts, two CFG passes per step), with opt-in speed flags.

With default options the flow is the reference's, step for step: T5 encodes prompt and negative prompt, one seeded
noise draw, UniPC (or DPM++) over integer timesteps, the high-noise expert for t >= 875 and the low-noise one below,
noise_pred = uncond + g * (cond - uncond), and the VAE decodes on rank 0.
"""
from __future__ import annotations

import gc
import logging
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from .configs import TaskConfig
from .modules.attention import resolve_attention
from .modules.checkpoint import check_checkpoint_dir
from .modules.model import WanModel
from .modules.t5 import T5EncoderModel
from .modules.vae import Wan2_1_VAE
from .options import RuntimeOptions
from .utils.compile import compile_blocks, uncompile_blocks
from .utils.schedulers import build_scheduler

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
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@contextmanager
def temporary_copy(module: torch.nn.Module, device: torch.device):
    """Run `module` from a device copy of its weights, then point it back at the untouched host tensors."""
    tensors = list(module.parameters()) + list(module.buffers())
    host = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(device, non_blocking=True, copy=True)
        yield module
    finally:
        for t, h in zip(tensors, host):
            t.data = h


class WanT2V:
    def __init__(self, config: TaskConfig, checkpoint_dir, device_id: int = 0, rank: int = 0, t5_fsdp: bool = False,
                 dit_fsdp: bool = False, use_sp: bool = False, t5_cpu: bool = False, init_on_cpu: bool = True,
                 convert_model_dtype: bool = False, device=None, options: RuntimeOptions | None = None,
                 components: dict | None = None):
        """Same arguments as the reference; `device` (default cuda:device_id, else CPU) and `options` are ours.

        The reference's boolean arguments are folded into `options` (an explicit True in either wins).
        `components` (text_encoder, vae, low_noise_model, high_noise_model) skips loading from checkpoint_dir:
        benchmarks pass random full-size models built on the GPU.
        """
        self.config, self.rank = config, rank
        opts = options or RuntimeOptions()
        self.options = replace(opts, t5_fsdp=opts.t5_fsdp or t5_fsdp, dit_fsdp=opts.dit_fsdp or dit_fsdp,
                               t5_cpu=opts.t5_cpu or t5_cpu, convert_model_dtype=opts.convert_model_dtype or convert_model_dtype)
        self.device = torch.device(device) if device is not None else (
            torch.device(f"cuda:{device_id}") if torch.cuda.is_available() else torch.device("cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA was asked for but torch.cuda.is_available() is False; pass --device cpu "
                               "(only the tiny model is practical there) or install a CUDA build of torch")
        if self.device.type == "cpu" and self.options.convert_model_dtype:
            # bf16 weights need the CUDA bf16 autocast the reference runs under; say so and record what runs.
            log.warning("convert_model_dtype ignored on CPU: the DiT runs in fp32 there (no bf16 autocast)")
            self.options = replace(self.options, convert_model_dtype=False)
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.use_sp = use_sp or self.options.ulysses_size > 1
        offload = self.options.offload_model
        self.offload_model = (self.world_size == 1 and self.device.type == "cuda") if offload is None else offload
        self.num_train_timesteps, self.boundary = config.num_train_timesteps, config.boundary
        self.vae_stride, self.patch_size = config.vae_stride, config.patch_size
        self.sample_neg_prompt = config.sample_neg_prompt
        t0 = time.perf_counter()
        dit_dtype = config.param_dtype if self.options.convert_model_dtype else None
        # FSDP shards from host RAM (each rank keeps only its shard on the GPU), as the reference
        fsdp = self.options.dit_fsdp and self.world_size > 1
        load_dev = torch.device("cpu") if self.offload_model or fsdp else self.device
        if components is not None:
            self.text_encoder, self.vae = components["text_encoder"], components["vae"]
            self.low_noise_model, self.high_noise_model = components["low_noise_model"], components["high_noise_model"]
        else:
            ckpt = Path(checkpoint_dir)
            check_checkpoint_dir(config, ckpt)
            self.text_encoder = T5EncoderModel(
                text_len=config.text_len, dtype=config.t5_dtype, device=torch.device("cpu"),
                checkpoint_path=str(ckpt / config.t5_checkpoint), tokenizer_path=str(ckpt / config.t5_tokenizer))
            self.vae = Wan2_1_VAE(vae_pth=str(ckpt / config.vae_checkpoint), device=self.device)
            # Experts load straight onto the GPU when they stay resident; onto the CPU when offloading (reference).
            self.low_noise_model = WanModel.from_pretrained(ckpt, config.low_noise_checkpoint, dit_dtype, load_dev)
            self.high_noise_model = WanModel.from_pretrained(ckpt, config.high_noise_checkpoint, dit_dtype, load_dev)
        self.cfg_group, self.cfg_rank, self.sp_group = None, 0, None
        if self.world_size > 1:  # multi-rank layout (reference section 8); SP itself is applied in apply_options
            from .distributed.fsdp import shard_model, shard_t5
            from .distributed.setup import parallel_groups

            if self.use_sp and self.options.ulysses_size == 1:  # reference API: use_sp = SP over every rank
                self.options = replace(self.options, ulysses_size=self.world_size // (1 + self.options.cfg_parallel))
            groups = parallel_groups(self.options, self.device)  # (cfg, sp) mesh; FSDP mesh = the whole world
            self.cfg_group, self.cfg_rank, self.sp_group = groups.cfg_group, groups.cfg_rank, groups.sp_group
            if self.offload_model:
                log.warning("offload_model is off with %d ranks: both experts stay resident", self.world_size)
                self.offload_model = False
            for model in (self.low_noise_model, self.high_noise_model):
                if fsdp:  # per-block units, gathered in bf16 on GPUs (fp32 on CPU, where nothing runs in bf16)
                    shard_model(model, groups.fsdp_mesh,
                                param_dtype=self.config.param_dtype if self.device.type == "cuda" else torch.float32)
                else:
                    model.to(self.device)
            if self.options.t5_fsdp:
                self.text_encoder.model = shard_t5(self.text_encoder.model, groups.fsdp_mesh)
        self.sp_size = self.options.ulysses_size if self.use_sp else 1
        self.apply_options(self.options)
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded in %.1f s: experts %s on %s (offload_model=%s), T5 on %s, VAE on %s",
                 self.load_seconds, dit_dtype or "fp32", load_dev, self.offload_model,
                 "cpu" if self.options.t5_cpu else f"{self.device} when encoding", self.device)

    # ---- options -----------------------------------------------------------------------------------------
    def apply_options(self, options: RuntimeOptions) -> None:
        """Resolve the attention backend and configure both experts once (also used by generate(options=...))."""
        self.options = options
        if options.tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.attention = resolve_attention(options.attn_backend, self.device)
        for model in (self.low_noise_model, self.high_noise_model):
            model.configure(self.attention, fast_rope=options.fast_rope, fast_time_embedding=options.fast_time_embedding)
            if getattr(self, "sp_group", None) is not None:  # configure() reset attn.attention: wrap it again
                from .distributed.ulysses import enable_sequence_parallel

                enable_sequence_parallel(model, self.sp_group)
            if options.compile:
                compile_blocks(model, options.compile_mode)
            else:
                uncompile_blocks(model)
        log.info("options: %s; attention %s; rope %s", options.changed() or "original path", self.attention.name,
                 self.low_noise_model.rope.name)

    # ---- helpers -----------------------------------------------------------------------------------------
    def _model_for(self, t: int) -> WanModel:
        """t >= boundary*1000 -> high-noise expert. When offloading, the unused expert goes to the CPU."""
        high = t >= self.boundary * self.num_train_timesteps
        needed, unused = ((self.high_noise_model, self.low_noise_model) if high
                          else (self.low_noise_model, self.high_noise_model))
        if self.offload_model and self.device.type == "cuda":
            if next(unused.parameters()).device.type == "cuda":
                unused.to("cpu")
            if next(needed.parameters()).device.type == "cpu":
                needed.to(self.device)
        return needed

    def _encode_text(self, prompt: str, n_prompt: str):
        ctx, ctx_null = self._run_text_encoder(prompt, n_prompt)
        if self.device.type != "cuda":  # no bf16 autocast on CPU: the fp32 DiT takes fp32 context
            ctx, ctx_null = [u.float() for u in ctx], [u.float() for u in ctx_null]
        return ctx, ctx_null

    def _run_text_encoder(self, prompt: str, n_prompt: str):
        if self.options.t5_cpu:
            ctx = self.text_encoder([prompt], torch.device("cpu"))
            ctx_null = self.text_encoder([n_prompt], torch.device("cpu"))
            return [u.to(self.device) for u in ctx], [u.to(self.device) for u in ctx_null]
        t5 = self.text_encoder.model
        on_host = next(t5.parameters()).device.type == "cpu"
        if self.offload_model or not on_host or self.device.type != "cuda":
            # The reference: up to the GPU, encode, back down (an 11 GB device-to-host copy) when offloading.
            t5.to(self.device)
            ctx, ctx_null = self.text_encoder([prompt], self.device), self.text_encoder([n_prompt], self.device)
            if self.offload_model and self.device.type == "cuda":
                t5.cpu()
            return ctx, ctx_null
        # Experts resident (offload_model false): the T5 must leave the GPU for memory, but its host copy is still
        # there, so encode with a temporary GPU copy and drop it instead of copying 11 GB back.
        with temporary_copy(t5, self.device):
            return self.text_encoder([prompt], self.device), self.text_encoder([n_prompt], self.device)

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_prompt: str, size=(1280, 720), frame_num: int = 81, shift: float = 5.0,
                 sample_solver: str = "unipc", sampling_steps: int = 50, guide_scale=5.0, n_prompt: str = "",
                 seed: int = -1, offload_model: bool = True, options: RuntimeOptions | None = None,
                 return_latents: bool = False):
        """Returns the video [3, frame_num, H, W] in [-1, 1] (rank 0; None elsewhere).

        size is (width, height); guide_scale a float or (low-noise scale, high-noise scale).
        `options` re-configures the speed switches for this and later calls (A/B without reloading).
        """
        if options is not None and options != self.options:
            self.apply_options(options)
        if not input_prompt or not input_prompt.strip():
            raise ValueError("the prompt is empty; pass --prompt \"...\"")
        if (frame_num - 1) % 4 != 0 or frame_num < 1:
            raise ValueError(f"frame_num must be 4n+1 (e.g. 77 or 81), got {frame_num}")
        self.offload_model = offload_model if self.world_size == 1 else self.offload_model
        guide = (guide_scale, guide_scale) if isinstance(guide_scale, (int, float)) else tuple(guide_scale)
        timer = StageTimer(self.device)
        self.last_timings = timer.times
        w, h = size
        lat_f, lat_h, lat_w = (frame_num - 1) // self.vae_stride[0] + 1, h // self.vae_stride[1], w // self.vae_stride[2]
        target_shape = (self.vae.model.config.z_dim, lat_f, lat_h, lat_w)
        seq_len = math.ceil(lat_h * lat_w / (self.patch_size[1] * self.patch_size[2]) * lat_f / self.sp_size) * self.sp_size
        n_prompt = n_prompt or self.sample_neg_prompt
        seed = seed if seed >= 0 else random.randint(0, sys.maxsize)
        seed_g = torch.Generator(device=self.device).manual_seed(seed)

        with timer("text_encode"):
            context, context_null = self._encode_text(input_prompt, n_prompt)
        noise = torch.randn(*target_shape, dtype=torch.float32, device=self.device, generator=seed_g)
        log.info("seed %d, seq_len %d, guide %s", seed, seq_len, guide)
        latent = self.sample(noise, context, context_null, seq_len, sample_solver, sampling_steps, shift, guide,
                             timer=timer)
        if self.offload_model and self.device.type == "cuda":
            self.low_noise_model.cpu()
            self.high_noise_model.cpu()
            torch.cuda.empty_cache()
        self.last_latent = latent
        video = None
        if self.rank == 0:
            with timer("vae_decode"):
                video = self.vae.decode([latent])[0]
        del noise
        if self.offload_model:
            gc.collect()
        log.info("stage seconds: %s", {k: round(v, 2) for k, v in timer.times.items()})
        return (video, latent) if return_latents else video

    def sample(self, noise, context, context_null, seq_len: int, sample_solver: str, sampling_steps: int,
               shift: float, guide: tuple[float, float], timer: StageTimer | None = None, max_steps: int | None = None,
               step_callback=None) -> torch.Tensor:
        """The denoising loop: noise [C, F, H, W] -> latent. No host sync inside the loop except at the (single)
        expert switch; `max_steps` stops early and `step_callback(i, t, expert)` runs after each step (benchmarks)."""
        timer = timer or StageTimer(self.device)
        scheduler, timesteps = build_scheduler(sample_solver, sampling_steps, shift, self.device,
                                               self.num_train_timesteps)
        scheduler.set_begin_index(0)  # no timestep lookup (a device sync) at the first step
        t_host = timesteps.tolist()[:max_steps]  # one sync here
        boundary = self.boundary * self.num_train_timesteps
        log.info("%d steps (%d high-noise, %d low-noise), batched_cfg=%s", len(t_host),
                 sum(t >= boundary for t in t_host), sum(t < boundary for t in t_host), self.options.batched_cfg)
        latent, current, model = noise, None, None
        self.expert_trace = []
        autocast = torch.autocast(self.device.type, dtype=self.config.param_dtype, enabled=self.device.type == "cuda")
        bar = tqdm(t_host, desc="denoise", unit="step", disable=self.rank != 0)
        with autocast:
            for i, t in enumerate(bar):
                expert = "high" if t >= boundary else "low"
                if expert != current:  # once per generation: time each expert's segment as one stage
                    if current is not None:
                        timer.stop(f"dit_{current}")
                    with timer("expert_switch"):
                        model = self._model_for(t)
                    timer.start(f"dit_{expert}")
                    current = expert
                self.expert_trace.append(expert)
                g = guide[1] if expert == "high" else guide[0]
                noise_pred = self._guided_prediction(model, latent, timesteps[i:i + 1], context, context_null,
                                                     seq_len, g)
                latent = scheduler.step(noise_pred.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False)[0]
                latent = latent.squeeze(0)
                if step_callback is not None:
                    step_callback(i, t, expert)
                bar.set_postfix(expert=expert, t=t)
        if current is not None:
            timer.stop(f"dit_{current}")
        return latent

    def _guided_prediction(self, model, latent, t, context, context_null, seq_len, g):
        """uncond + g * (cond - uncond): two batch-1 forwards (reference) or one batch-2 forward (batched_cfg);
        with cfg_parallel, one batch-1 forward per rank half and one all-gather."""
        if self.options.cfg_parallel and getattr(self, "cfg_group", None) is not None:
            from .distributed.cfg_parallel import cfg_parallel_prediction

            return cfg_parallel_prediction(model, latent, t, context, context_null, seq_len, g, self.cfg_group,
                                           self.cfg_rank)
        if self.options.batched_cfg:
            cond, uncond = model([latent, latent], t=t.expand(2), context=context + context_null, seq_len=seq_len)
        else:
            cond = model([latent], t=t, context=context, seq_len=seq_len)[0]
            uncond = model([latent], t=t, context=context_null, seq_len=seq_len)[0]
        return uncond + g * (cond - uncond)
