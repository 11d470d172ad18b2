"""`WanI2V`: the reference's image-to-video pipeline (Wan2.2 I2V-A14B) on the shared `wan.pipeline.WanPipeline`.

With default options the flow is the reference's, step for step: the output size from the image's aspect ratio and
`max_area`; one seeded noise draw [16, F', lat_h, lat_w]; T5 encodes prompt and negative prompt; the condition
y = [4-channel first-frame mask; VAE latent of (the image stretched by torch bicubic on the CPU, F - 1 black
frames)], [20, F', lat_h, lat_w]; UniPC (or DPM++ / Euler) with the high-noise expert for t >= 900; both CFG passes
get the same y, which the DiT joins to the latent channel-wise (16 + 20 = 36 input channels); the VAE decodes on
rank 0. Everything else (placement, options, LoRAs, fp8, guidance strategies, the loop) is T2V's, unchanged.
"""
from __future__ import annotations

import logging

import torch

from .image_condition import (I2VGeometry, condition_video, first_frame_mask, i2v_geometry, image_to_tensor,
                              resize_first_frame, seq_len_for)
from .options import RuntimeOptions
from .pipeline import WanPipeline

__all__ = ["WanI2V"]

log = logging.getLogger("wan")


class WanI2V(WanPipeline):
    @torch.no_grad()
    def generate(self, input_prompt: str, img, max_area: int = 720 * 1280, frame_num: int = 81, shift: float = 5.0,
                 sample_solver: str = "unipc", sampling_steps: int = 40, guide_scale=5.0, n_prompt: str = "",
                 seed: int = -1, offload_model: bool | None = None, options: RuntimeOptions | None = None,
                 return_latents: bool = False):
        """Returns the video [3, frame_num, h, w] in [-1, 1] (rank 0; None elsewhere) whose first frame is `img` (an
        RGB PIL image); `self.last_result` records what ran. (h, w): `self.geometry(img, max_area)`, the image's
        aspect ratio at about `max_area` pixels. guide_scale: a float or (low-noise scale, high-noise scale).

        offload_model: the reference's parameter; None means the built placement, and a value that disagrees
        with it raises. `options` may change per-call fields for this call only (an A/B without reloading).
        """
        opts, guide, guidance = self._per_call(offload_model, options, input_prompt, frame_num, guide_scale,
                                                sampling_steps)
        image = image_to_tensor(img)  # checks the image before anything runs
        geo = self.geometry(img, max_area)
        with self._configured(opts):
            return self._generate(input_prompt, image, geo, frame_num, shift, sample_solver, sampling_steps, guide,
                                  guidance, n_prompt, seed, opts, return_latents)

    def geometry(self, img, max_area: int) -> I2VGeometry:
        """The output size for an image (PIL, or its (width, height)) at `max_area`, as the reference computes it."""
        w, h = img if isinstance(img, tuple) else img.size
        return i2v_geometry(w, h, max_area, self.vae_stride, self.patch_size)

    def condition(self, image: torch.Tensor, geo: I2VGeometry, frame_num: int) -> torch.Tensor:
        """y [4 + z, F', lat_h, lat_w] on the device: the first-frame mask, then the VAE latent (fp32, normalised)
        of [the image stretched to (h, w), F - 1 black frames]. `image`: [3, H, W] in [-1, 1]."""
        first = resize_first_frame(image, geo.height, geo.width)
        video = condition_video(first, frame_num, self.device)
        latent = self.vae.encode([video], reuse_repeats=self.call_options.fast_encode)[0]
        mask = first_frame_mask(frame_num, geo.lat_h, geo.lat_w, self.device)
        return torch.cat([mask, latent.to(self.device)])

    def backends(self, guidance: dict | None = None) -> dict:
        out = super().backends(guidance)
        out["vae_encode"] = ("reuses repeated layers (fast_encode)" if self.call_options.fast_encode
                             else "every chunk, every layer (reference)")
        return out

    def _generate(self, prompt, image, geo, frame_num, shift, solver, steps, guide, guidance, n_prompt, seed, opts,
                  return_latents):
        lat_f = (frame_num - 1) // self.vae_stride[0] + 1
        seq_len = seq_len_for(frame_num, geo, self.vae_stride, self.patch_size, self.sp_size)
        timer, result, seed_g = self._start(seed, steps, solver, opts, guidance)
        # drawn before T5 runs, as the reference (T5 never touches the generator: the same values either way)
        noise = torch.randn(self.vae.model.config.z_dim, lat_f, geo.lat_h, geo.lat_w, dtype=torch.float32,
                            device=self.device, generator=seed_g)
        context, context_null = self._encode_text(prompt, n_prompt, guidance, timer)
        with timer("vae_encode"):
            y = self.condition(image, geo, frame_num)
        log.info("video %s from a %dx%d image, seed %d, seq_len %d, guide %s, guidance %s", geo.describe(),
                 image.shape[2], image.shape[1], result.seed, seq_len, guide, {k: g.name for k, g in guidance.items()})
        latent = self.sample(noise, context, context_null, seq_len, solver, steps, shift, guide, timer=timer,
                             guidance=guidance, result=result, y=y)
        return self._finish(latent, timer, result, return_latents)
