"""`WanTI2V`: the reference's text-image-to-video pipeline (Wan2.2 TI2V-5B) on the shared `wan.pipeline.WanPipeline`.

One dense DiT (no expert switch) on the Wan 2.2 VAE (48 latent channels, 4x16x16). With default options the flow is
the reference's, step for step:
- without an image (text-to-video): the latent [48, F', H/16, W/16] from one seeded noise draw, T5, UniPC (or
  DPM++ / Euler), noise_pred = uncond + g * (cond - uncond), the VAE decode on rank 0 (the reference's per-token
  t, all equal, is t itself: the DiT gets t as [1]);
- with an image (`img`): the size from the image's aspect ratio at `max_area` (best_output_size, multiples of 32),
  the image LANCZOS-resized and centre-cropped to it, its one-frame VAE latent z; latent frame 0 is z before the
  loop and after every scheduler step, and the DiT gets per-token timesteps with 0 on frame 0's tokens
  (`wan.latent_constraint.FirstFrameLatent`).
Everything else (placement, options, fp8, guidance strategies, the loop, block streaming, the step cache, the
checkpoint layouts) is the base's, unchanged.
"""
from __future__ import annotations

import logging
import math

import torch

from .image_condition import I2VGeometry, image_to_tensor
from .latent_constraint import NO_CONSTRAINT, FirstFrameLatent
from .options import RuntimeOptions
from .pipeline import WanPipeline
from .ti2v_inputs import first_frame, seq_len_for, ti2v_geometry

__all__ = ["WanTI2V"]

log = logging.getLogger("wan")


class WanTI2V(WanPipeline):
    @torch.no_grad()
    def generate(self, input_prompt: str, img=None, size=(1280, 704), max_area: int = 704 * 1280, frame_num: int = 81,
                 shift: float = 5.0, sample_solver: str = "unipc", sampling_steps: int = 50, guide_scale=5.0,
                 n_prompt: str = "", seed: int = -1, offload_model: bool | None = None,
                 options: RuntimeOptions | None = None, return_latents: bool = False):
        """Returns the video [3, frame_num, h, w] in [-1, 1] (rank 0; None elsewhere); `self.last_result` records
        what ran. Without `img`: text-to-video at `size` (width, height; multiples of 32). With `img` (an RGB PIL
        image): its first frame, at `self.geometry(img, max_area)`. guide_scale: one float (the model has no
        experts).

        offload_model: the reference's parameter; None means the built placement, and a value that disagrees
        with it raises. `options` may change per-call fields for this call only (an A/B without reloading).
        """
        opts, guide, guidance = self._per_call(offload_model, options, input_prompt, frame_num, guide_scale,
                                                sampling_steps)
        if img is not None:
            image_to_tensor(img)  # checks the image (RGB PIL) before anything runs
            geo = self.geometry(img, max_area)
        else:
            geo = self.text_geometry(size)
        with self._configured(opts):
            return self._generate(input_prompt, img, geo, frame_num, shift, sample_solver, sampling_steps, guide,
                                  guidance, n_prompt, seed, opts, return_latents)

    def geometry(self, img, max_area: int) -> I2VGeometry:
        """The video size for an image (PIL, or its (width, height)) at `max_area`, as the reference computes it."""
        w, h = img if isinstance(img, tuple) else img.size
        return ti2v_geometry(w, h, max_area, self.vae_stride, self.patch_size)

    def text_geometry(self, size) -> I2VGeometry:
        """The latent grid of a text-to-video run at size (width, height): each side a multiple of 32 (VAE stride 16
        times patch 2; any other size would drop a row of patches, as the reference then fails to step)."""
        w, h = size
        (_, sh, sw), (_, ph, pw) = self.vae_stride, self.patch_size
        if w <= 0 or h <= 0 or w % (sw * pw) or h % (sh * ph):
            raise ValueError(f"size {w}x{h}: width and height must be positive multiples of {sw * pw} for "
                             f"{self.config.name} (its sizes: {', '.join(self.config.supported_sizes)})")
        return I2VGeometry(h // sh, w // sw, h, w)

    def image_latent(self, img, geo: I2VGeometry) -> torch.Tensor:
        """z [48, 1, h/16, w/16] on the device: the normalised VAE latent of the resized, cropped first frame."""
        return self.vae.encode([first_frame(img, geo).to(self.device)])[0].to(self.device)

    def backends(self, guidance: dict | None = None) -> dict:
        out = super().backends(guidance)
        out["vae_encode"] = "one frame (nothing repeats: fast_encode has nothing to reuse)"
        return out

    def _generate(self, prompt, img, geo, frame_num, shift, solver, steps, guide, guidance, n_prompt, seed, opts,
                  return_latents):
        (sf, _, _), (_, ph, pw) = self.vae_stride, self.patch_size
        shape = (self.vae.model.config.z_dim, (frame_num - 1) // sf + 1, geo.lat_h, geo.lat_w)
        timer, result, seed_g = self._start(seed, steps, solver, opts, guidance)
        constraint = NO_CONSTRAINT
        if img is None:  # the reference: T5 first, then the noise (T5 never touches the generator either way)
            seq_len = math.ceil(geo.lat_h * geo.lat_w / (ph * pw) * shape[1] / self.sp_size) * self.sp_size
            context, context_null = self._encode_text(prompt, n_prompt, guidance, timer)
            noise = torch.randn(*shape, dtype=torch.float32, device=self.device, generator=seed_g)
        else:  # the noise, then T5, then the image's encode
            seq_len = seq_len_for(frame_num, geo.lat_h, geo.lat_w, self.vae_stride, self.patch_size, self.sp_size)
            noise = torch.randn(*shape, dtype=torch.float32, device=self.device, generator=seed_g)
            context, context_null = self._encode_text(prompt, n_prompt, guidance, timer)
            with timer("vae_encode"):
                constraint = FirstFrameLatent(self.image_latent(img, geo), shape, seq_len, self.patch_size)
        log.info("video %s%s, seed %d, seq_len %d, guide %s, guidance %s", geo.describe(),
                 f" from a {img.width}x{img.height} image" if img is not None else " (text to video)", result.seed,
                 seq_len, guide[0], {k: g.name for k, g in guidance.items()})
        result.backends["latent_constraint"] = constraint.name
        latent = self.sample(noise, context, context_null, seq_len, solver, steps, shift, guide, timer=timer,
                             guidance=guidance, result=result, constraint=constraint)
        return self._finish(latent, timer, result, return_latents)
