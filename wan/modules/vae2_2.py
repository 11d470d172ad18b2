"""Wan 2.2 VAE wrapper (TI2V-5B) on diffusers' AutoencoderKLWan with `is_residual=True`.

Public API as the reference's `wan/modules/vae2_2.py::Wan2_2_VAE`:
  encode(list of [3,T,H,W] in [-1,1]) -> list of normalised latents [48, 1+(T-1)//4, H/16, W/16]
  decode(list of [48,T',h,w])         -> list of videos [3, 1+4(T'-1), 16h, 16w] in [-1,1]
Architecture (the reference's WanVAE_(dim=160, dec_dim=256, z_dim=48, num_res_blocks=2,
temperal_downsample=[False, True, True])): a 2x2 patchify to 12 channels, three downsampling levels with AvgDown3D
shortcuts, DupUp3D shortcuts in the decoder, 4x16x16 compression. The checkpoint `Wan2.2_VAE.pth` is an fp32 state
dict in the original key names, read with weights_only=True and renamed by `vae2_2_keys`; the widths come from the
checkpoint (encoder.conv1 [dim, 12, ...], decoder.conv1 [4 * dec_dim, z, ...]), so tiny test checkpoints load too.
Normalisation and clamp as the reference: encode (mu - mean) * (1/std), decode z / (1/std) + mean, clamp to [-1, 1].
Encode, decode, `--vae_dtype` and the banded decode are Wan2_1_VAE's (wan/modules/vae.py).
"""
from __future__ import annotations

import contextlib

import torch

from .vae import Wan2_1_VAE
from .vae2_2_keys import convert_wan22_vae_to_diffusers

__all__ = ["Wan2_2_VAE", "WAN22_VAE_MEAN", "WAN22_VAE_STD", "VAE22_ARCH", "build_wan22_vae", "VAE_CLASSES"]

# Per-latent-channel normalisation constants of the official Wan 2.2 VAE (z_dim 48), as the reference lists them.
WAN22_VAE_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_VAE_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]
# Fixed architecture of the Wan 2.2 VAE; the widths (160 / 256 official) and z_dim come from the checkpoint.
VAE22_ARCH = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
                  dropout=0.0, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                  scale_factor_temporal=4, scale_factor_spatial=16)


def build_wan22_vae(base_dim: int = 160, decoder_base_dim: int = 256, z_dim: int = 48, device=None):
    """AutoencoderKLWan with the Wan 2.2 architecture, from a local config (never the hub). Its latents_mean/std
    config entries are not applied by encode/decode; Wan2_2_VAE applies them."""
    from diffusers import AutoencoderKLWan

    stats = dict(latents_mean=WAN22_VAE_MEAN, latents_std=WAN22_VAE_STD) if z_dim == len(WAN22_VAE_MEAN) else {}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoencoderKLWan(base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, **stats,
                                **VAE22_ARCH)


class Wan2_2_VAE(Wan2_1_VAE):
    """The reference's Wan2_2_VAE on diffusers (see the module docstring), with its arguments. `c_dim` is the
    reference's; the checkpoint's own widths are used (the official file's are 160 / 256). `dim_mult` and
    `temperal_downsample` must be the official ones (the only architecture diffusers' class builds here)."""

    NAME, MEAN, STD = "Wan 2.2", WAN22_VAE_MEAN, WAN22_VAE_STD
    HINT = "Wan2.2_VAE.pth ships with the official Wan2.2-TI2V-5B download"

    def __init__(self, z_dim=48, c_dim=160, vae_pth=None, dim_mult=(1, 2, 4, 4),
                 temperal_downsample=(False, True, True), dtype=torch.float, device="cuda", decode_bands: int = 0):
        if list(dim_mult) != VAE22_ARCH["dim_mult"] or list(temperal_downsample) != VAE22_ARCH["temperal_downsample"]:
            raise ValueError(f"Wan2_2_VAE builds the official architecture (dim_mult {VAE22_ARCH['dim_mult']}, "
                             f"temperal_downsample {VAE22_ARCH['temperal_downsample']}), got {list(dim_mult)}, "
                             f"{list(temperal_downsample)}")
        self.c_dim = c_dim
        super().__init__(z_dim=z_dim, vae_pth=vae_pth, dtype=dtype, device=device, decode_bands=decode_bands)

    @staticmethod
    def _build(sd: dict, z_dim: int):
        base = sd["encoder.conv1.weight"].shape[0]
        dec = sd["decoder.conv1.weight"].shape[0] // VAE22_ARCH["dim_mult"][-1] if "decoder.conv1.weight" in sd \
            else base
        return build_wan22_vae(base, dec, z_dim, device="meta"), convert_wan22_vae_to_diffusers(sd)

    @staticmethod
    def _describe(model) -> str:
        c = model.config
        return f"base_dim={c.base_dim}, decoder_base_dim={c.decoder_base_dim}, z_dim={c.z_dim}, is_residual=True"


# TaskConfig.vae_version -> the wrapper class
VAE_CLASSES = {"2.1": Wan2_1_VAE, "2.2": Wan2_2_VAE}
