"""Wan 2.1 VAE wrapper (used by Wan 2.2 T2V-A14B) on top of diffusers' AutoencoderKLWan.

Public API mirrors the reference `wan/modules/vae2_1.py::Wan2_1_VAE`:
  encode(list of [3,T,H,W] in [-1,1]) -> list of normalised latents [16, 1+(T-1)//4, H/8, W/8]
  decode(list of [16,T',h,w])         -> list of videos [3, 1+4(T'-1), 8h, 8w] in [-1,1]
The checkpoint is the original `Wan2.1_VAE.pth` (original Wan key names), or a `wan.formats.WeightSource` of any
layout that yields those names; it is converted with diffusers' `convert_wan_vae_to_diffusers`. Importing this module
never touches CUDA.
"""
import contextlib
import logging
import os
import zipfile

import torch

from .precision import fp32_region, no_autocast
from .vae_bands import decode_banded
from .vae_encode import encode_mean

# --vae_dtype names -> dtypes (the reference: fp32)
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

__all__ = ["VAE_DTYPES", "Wan2_1_VAE", "WAN21_VAE_MEAN", "WAN21_VAE_STD", "load_wan_vae_state_dict", "build_wan_vae"]

# Per-latent-channel normalisation constants of the official Wan 2.1 VAE (z_dim 16).
WAN21_VAE_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
WAN21_VAE_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]
# Fixed architecture of the Wan 2.1 VAE; only base_dim (96 official) and z_dim vary.
VAE_ARCH = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)
_MISSING_HINT = "Wan2.1_VAE.pth ships with the official Wan2.2-T2V-A14B download"


def load_wan_vae_state_dict(path, hint: str = _MISSING_HINT):
    """Read an original-layout VAE checkpoint (.pth or .safetensors) as a CPU state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE checkpoint not found: {path} ({hint})")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:  # mmap only works for zip-format files (torch >= 1.6 default)
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # corrupt / foreign file: keep the message to one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read VAE checkpoint {path}: {msg}") from e
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"VAE checkpoint {path} is not a plain state dict of tensors")
    return sd


def build_wan_vae(base_dim, z_dim=16, device=None):
    """AutoencoderKLWan with the Wan 2.1 architecture, from a local config (never the hub).
    Its latents_mean/std config entries are NOT applied by encode/decode; Wan2_1_VAE applies them."""
    from diffusers import AutoencoderKLWan
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, **VAE_ARCH)


def _fit_problems(sd, ref):
    """List key/shape mismatches between a converted state dict and the model's own one."""
    probs = [f"missing {k}" for k in ref if k not in sd]
    probs += [f"unexpected {k}" for k in sd if k not in ref]
    probs += [f"{k}: shape {tuple(sd[k].shape)} != expected {tuple(ref[k].shape)}"
              for k in ref if k in sd and sd[k].shape != ref[k].shape]
    return probs


class Wan2_1_VAE:
    """Reference-compatible wrapper: `model` (diffusers AutoencoderKLWan), `scale` = [mean, 1/std], `dtype`.
    decode_bands > 1 decodes in that many bands of rows, band by band (`vae_bands.decode_banded` with order
    "band": the same video within summation order, a much lower peak memory, +19% decode work at 4 bands).
    Subclasses (wan.modules.vae2_2.Wan2_2_VAE) change the constants and `_build`."""

    NAME, MEAN, STD, HINT = "Wan 2.1", WAN21_VAE_MEAN, WAN21_VAE_STD, _MISSING_HINT

    def __init__(self, z_dim=16, vae_pth="cache/vae_step_411000.pth", dtype=torch.float, device="cuda",
                 decode_bands: int = 0):
        if decode_bands < 0:
            raise ValueError(f"decode_bands must be >= 0 (0 or 1: whole frames), got {decode_bands}")
        self.decode_bands = decode_bands  # 0 / 1: diffusers' whole-frame decode
        self.dtype = dtype
        self.device = torch.device(device)
        self.z_dim = z_dim
        # Normalisation constants, kept fp32 (as in the reference with its default dtype=float).
        self.mean = torch.tensor(self.MEAN, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(self.STD, dtype=torch.float32, device=self.device)
        self.scale = [self.mean, 1.0 / self.std]

        if isinstance(vae_pth, (str, os.PathLike)):
            sd = load_wan_vae_state_dict(vae_pth, self.HINT)
        else:  # a wan.formats.WeightSource (any layout, official names out): the VAE is small, read it whole
            sd = dict(vae_pth.read(dequant_dtype=dtype))
            logging.getLogger("wan").info("%s", vae_pth.describe(dtype))
            vae_pth = str(vae_pth.where)
        # z_dim from the checkpoint: conv2 (post_quant_conv) [z,z,1,1,1]
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in sd or sd[key].ndim != 5:
                raise ValueError(f"VAE checkpoint {vae_pth} does not look like a {self.NAME} VAE "
                                 f"(no 5-D '{key}'; first keys: {list(sd)[:3]})")
        ck_z = sd["conv2.weight"].shape[0]
        if ck_z != z_dim or z_dim != len(self.MEAN):
            raise ValueError(f"VAE checkpoint {vae_pth} has z_dim {ck_z}, expected z_dim={z_dim} "
                             f"(the normalisation table has {len(self.MEAN)} channels)")
        model, sd = self._build(sd, z_dim)  # on meta: no memory, no init cost
        probs = _fit_problems(sd, model.state_dict())
        if probs:
            more = f" (+{len(probs) - 4} more)" if len(probs) > 4 else ""
            raise ValueError(f"VAE checkpoint {vae_pth} does not fit the {self.NAME} AutoencoderKLWan "
                             f"({self._describe(model)}) [diffusers key names]: {'; '.join(probs[:4])}{more}")
        # Cast in the state dict (not model.to(dtype), which makes diffusers log a spurious warning).
        model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @staticmethod
    def _build(sd: dict, z_dim: int):
        """(AutoencoderKLWan on meta, the state dict in diffusers' key names) for an original-layout state dict;
        base_dim from encoder.conv1 [base, 3, 3, 3, 3]."""
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        base_dim = sd["encoder.conv1.weight"].shape[0]
        return build_wan_vae(base_dim, z_dim, device="meta"), convert_wan_vae_to_diffusers(sd)

    @staticmethod
    def _describe(model) -> str:
        return f"base_dim={model.config.base_dim}, z_dim={model.config.z_dim}"

    def _fp32_ctx(self):
        # The reference nests an fp32 autocast inside the pipeline's bf16 one; a bf16 VAE (--vae_dtype bf16)
        # computes in its own dtype.
        kind = self.device.type
        return fp32_region(kind) if self.dtype == torch.float32 else no_autocast(kind)

    def _view(self, t):  # [16] -> [16,1,1,1] to broadcast over [16,T,h,w]
        return t.view(-1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, videos, reuse_repeats: bool = False):
        """videos: list of [3,T,H,W] in [-1,1] -> list of fp32 [z, 1+(T-1)//4, H/8, W/8], (mu-mean)/std.
        reuse_repeats: skip the layers whose inputs repeat from chunk to chunk (vae_encode.encode_mean: the same
        latent bit for bit, a third of the work for an image followed by 80 black frames)."""
        out = []
        with self._fp32_ctx():
            for v in videos:
                x = v.to(device=self.device, dtype=self.dtype).unsqueeze(0)
                if reuse_repeats:
                    mu = encode_mean(self.model, x)[0].float()
                else:
                    mu = self.model.encode(x).latent_dist.mode()[0].float()  # mu = first z_dim channels
                out.append((mu - self._view(self.scale[0])) * self._view(self.scale[1]))
        return out

    @torch.no_grad()
    def decode(self, zs):
        """zs: list of [z,T',h,w] normalised latents -> list of fp32 [3, 1+4(T'-1), 8h, 8w] in [-1,1].
        diffusers decodes one latent frame at a time with a causal conv cache, like the reference."""
        out = []
        with self._fp32_ctx():
            for z in zs:
                z = z.to(device=self.device, dtype=torch.float32)
                z = z / self._view(self.scale[1]) + self._view(self.scale[0])  # = z*std + mean
                z = z.to(self.dtype).unsqueeze(0)
                if self.decode_bands > 1:
                    x = decode_banded(self.model, z, self.decode_bands, order="band")[0]
                else:
                    x = self.model.decode(z).sample[0]
                out.append(x.float().clamp_(-1, 1))
        return out
