"""`WanT2V`: the reference's text-to-video pipeline (two experts, two CFG passes per step), with opt-in speed flags.

With default options the flow is the reference's, step for step: T5 encodes prompt and negative prompt, one seeded
noise draw, UniPC (or DPM++) over integer timesteps, the high-noise expert for t >= 875 and the low-noise one below,
noise_pred = uncond + g * (cond - uncond), and the VAE decodes on rank 0.

Everything but the inputs (build, placement, options, guidance, the sample loop, the result record) is the shared
`wan.pipeline.WanPipeline`; this file holds only what text-to-video adds: the size and the noise it starts from.
"""
from __future__ import annotations

import logging
import math

import torch

from .options import RuntimeOptions
from .pipeline import GenerationResult, StageTimer, WanPipeline, backend_flags

__all__ = ["WanT2V", "GenerationResult", "StageTimer", "backend_flags"]

log = logging.getLogger("wan")


class WanT2V(WanPipeline):
    @torch.no_grad()
    def generate(self, input_prompt: str, size=(1280, 720), frame_num: int = 81, shift: float = 5.0,
                 sample_solver: str = "unipc", sampling_steps: int = 50, guide_scale=5.0, n_prompt: str = "",
                 seed: int = -1, offload_model: bool | None = None, options: RuntimeOptions | None = None,
                 return_latents: bool = False):
        """Returns the video [3, frame_num, H, W] in [-1, 1] (rank 0; None elsewhere); `self.last_result` records
        what ran. size is (width, height); guide_scale a float or (low-noise scale, high-noise scale).

        offload_model: the reference's parameter; None means the built placement, and a value that disagrees
        with it raises. `options` may change per-call fields for this call only (an A/B without reloading).
        """
        opts, guide, guidance = self._per_call(offload_model, options, input_prompt, frame_num, guide_scale,
                                                sampling_steps)
        with self._configured(opts):
            return self._generate(input_prompt, size, frame_num, shift, sample_solver, sampling_steps, guide,
                                  guidance, n_prompt, seed, opts, return_latents)

    def _generate(self, prompt, size, frame_num, shift, solver, steps, guide, guidance, n_prompt, seed, opts,
                  return_latents):
        w, h = size
        (sf, sh, sw), (_, ph, pw) = self.vae_stride, self.patch_size
        lat_f, lat_h, lat_w = (frame_num - 1) // sf + 1, h // sh, w // sw
        target_shape = (self.vae.model.config.z_dim, lat_f, lat_h, lat_w)
        seq_len = math.ceil(lat_h * lat_w / (ph * pw) * lat_f / self.sp_size) * self.sp_size
        timer, result, seed_g = self._start(seed, steps, solver, opts, guidance)
        context, context_null = self._encode_text(prompt, n_prompt, guidance, timer)
        noise = torch.randn(*target_shape, dtype=torch.float32, device=self.device, generator=seed_g)
        log.info("seed %d, seq_len %d, guide %s, guidance %s", result.seed, seq_len, guide,
                 {k: g.name for k, g in guidance.items()})
        latent = self.sample(noise, context, context_null, seq_len, solver, steps, shift, guide, timer=timer,
                             guidance=guidance, result=result)
        return self._finish(latent, timer, result, return_latents)
