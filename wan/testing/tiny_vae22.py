"""Tiny random Wan 2.2 VAE checkpoints in the ORIGINAL key layout (`Wan2.2_VAE.pth`), for offline tests.

The original keys are enumerated here from the reference's module tree (see wan/modules/vae2_2_keys.py); the
writer draws a diffusers AutoencoderKLWan(is_residual=True) by the shared random rule and saves its tensors under
their original names, checking that the key map is one-to-one with the model's state dict. z_dim stays 48 (the
normalisation table's size); the widths shrink.
"""
from __future__ import annotations

import torch

from wan.modules.vae2_2 import VAE22_ARCH, build_wan22_vae
from wan.modules.vae2_2_keys import to_diffusers_key

__all__ = ["original_vae22_keys", "diffusers_to_original_keys22", "make_tiny_vae22", "write_tiny_vae22_checkpoint"]


def _wb(p):
    return [f"{p}.weight", f"{p}.bias"]


def _res(p, shortcut):
    ks = [f"{p}.residual.0.gamma", *_wb(f"{p}.residual.2"), f"{p}.residual.3.gamma", *_wb(f"{p}.residual.6")]
    return ks + (_wb(f"{p}.shortcut") if shortcut else [])


def _middle(part):
    return (_res(f"{part}.middle.0", False) + [f"{part}.middle.1.norm.gamma", *_wb(f"{part}.middle.1.to_qkv"),
                                              *_wb(f"{part}.middle.1.proj")] + _res(f"{part}.middle.2", False))


def original_vae22_keys(dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True)):
    """All state-dict keys of the reference's WanVAE_ (Wan 2.2) in its own order."""
    n = len(dim_mult)
    keys = _wb("encoder.conv1")
    mult = [1, *dim_mult]  # encoder widths, in units of dim
    for i in range(n):
        for j in range(num_res_blocks):
            keys += _res(f"encoder.downsamples.{i}.downsamples.{j}", j == 0 and mult[i] != mult[i + 1])
        if i != n - 1:
            p = f"encoder.downsamples.{i}.downsamples.{num_res_blocks}"
            keys += _wb(f"{p}.resample.1") + (_wb(f"{p}.time_conv") if temperal_downsample[i] else [])
    keys += _middle("encoder") + ["encoder.head.0.gamma", *_wb("encoder.head.2"), *_wb("conv1"), *_wb("conv2")]
    keys += _wb("decoder.conv1") + _middle("decoder")
    mult, up = [dim_mult[-1], *dim_mult[::-1]], list(temperal_downsample[::-1])  # decoder widths, in dec_dim units
    for i in range(n):
        for j in range(num_res_blocks + 1):
            keys += _res(f"decoder.upsamples.{i}.upsamples.{j}", j == 0 and mult[i] != mult[i + 1])
        if i != n - 1:
            p = f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}"
            keys += _wb(f"{p}.resample.1") + (_wb(f"{p}.time_conv") if up[i] else [])
    return keys + ["decoder.head.0.gamma", *_wb("decoder.head.2")]


def diffusers_to_original_keys22(model) -> dict[str, str]:
    """{diffusers key: original key} for `model`; raises if the key map is not a bijection onto its state dict."""
    orig = original_vae22_keys(VAE22_ARCH["dim_mult"], VAE22_ARCH["num_res_blocks"],
                               VAE22_ARCH["temperal_downsample"])
    inv = {to_diffusers_key(k): k for k in orig}
    target = set(model.state_dict())
    if len(inv) != len(orig) or set(inv) != target:
        raise RuntimeError(f"Wan 2.2 VAE key map is not one-to-one: {len(orig)} original keys, {len(inv)} "
                           f"converted, {len(target)} model keys, e.g. {sorted(set(inv) ^ target)[:3]}")
    return inv


@torch.no_grad()
def make_tiny_vae22(seed: int = 0, base_dim: int = 8, decoder_base_dim: int = 16, z_dim: int = 48):
    """AutoencoderKLWan (Wan 2.2 layout) with every parameter drawn by the shared rule from one seeded generator."""
    from .random_init import randomize_weights_

    model = build_wan22_vae(base_dim, decoder_base_dim, z_dim).eval()
    return randomize_weights_(model, seed).requires_grad_(False)


def write_tiny_vae22_checkpoint(path, seed: int = 0, base_dim: int = 8, decoder_base_dim: int = 16):
    """Write a tiny random Wan 2.2 VAE as a plain original-layout fp32 state dict (torch.save); returns the
    diffusers model it came from (same weights)."""
    model = make_tiny_vae22(seed, base_dim, decoder_base_dim)
    inv = diffusers_to_original_keys22(model)
    sd = {inv[k]: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, path)
    return model
