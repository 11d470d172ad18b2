"""Latent constraints: what the sample loop (`WanPipeline.sample`) does to the latent before the first step and after
every scheduler step, and which timesteps the DiT sees. One object per generation, chosen by the task.

- `NO_CONSTRAINT`: nothing (t2v, i2v, and TI2V without an image): the latent as the scheduler leaves it, t as [1].
- `FirstFrameLatent` (TI2V image mode, the reference's textimage2video.py i2v()): latent frame 0 is the image's VAE
  latent z, written with the reference's mask formula `(1 - m) * z + m * latent` (m: 0 on frame 0, 1 elsewhere),
  on the noise and after every step; and the DiT gets per-token timesteps, 0 on the tokens of latent frame 0 and
  t on every other token (padding included), as `TokenTimesteps` (two values and a token index).
"""
from __future__ import annotations

import torch

from .modules.token_timesteps import TokenTimesteps


class NoConstraint:
    name = "none"

    @staticmethod
    def apply(latent: torch.Tensor) -> torch.Tensor:
        return latent

    @staticmethod
    def timesteps(t: torch.Tensor):
        """t [1] as the scheduler gives it (every token the same)."""
        return t


NO_CONSTRAINT = NoConstraint()


class FirstFrameLatent:
    """Latent frame 0 fixed to z, and per-token timesteps with 0 on its tokens.

    z: [C, 1, h, w] (the image's normalised VAE latent); shape: the latent's (C, F', h, w); seq_len: the padded token
    count; patch: the DiT's (1, ph, pw)."""

    name = "first latent frame fixed to the image's latent (TI2V)"

    def __init__(self, z: torch.Tensor, shape: tuple[int, int, int, int], seq_len: int, patch=(1, 2, 2)):
        c, f, h, w = shape
        if tuple(z.shape) != (c, 1, h, w):
            raise ValueError(f"the image latent is {tuple(z.shape)}, the video latent's first frame is {(c, 1, h, w)}")
        self.z = z
        self.mask = torch.ones(shape, dtype=torch.float32, device=z.device)  # the reference's masks_like(zero=True)
        self.mask[:, 0] = 0
        # token j of the f-h-w patch grid takes value 1 (t = 0) where the mask is 0; padding takes value 0 (t)
        frame0 = (self.mask[0][:, ::patch[1], ::patch[2]] == 0).flatten()
        if frame0.numel() > seq_len:
            raise ValueError(f"seq_len {seq_len} is smaller than the latent's {frame0.numel()} tokens")
        self.index = torch.zeros(seq_len, dtype=torch.long, device=z.device)
        self.index[:frame0.numel()] = frame0.long()

    def apply(self, latent: torch.Tensor) -> torch.Tensor:
        """[C, F', h, w] -> the same with frame 0 = z (exactly: 1 * z + 0 * latent, and 0 * z + 1 * latent after)."""
        return (1.0 - self.mask) * self.z + self.mask * latent

    def timesteps(self, t: torch.Tensor) -> TokenTimesteps:
        """t [1] -> per-token timesteps: values [1, 2] = (t, 0) as float32 (the reference's mask * t), index [L]."""
        t = t.to(torch.float32)
        return TokenTimesteps(torch.stack([t, torch.zeros_like(t)], dim=1), self.index)
