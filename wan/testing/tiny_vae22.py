"""Tiny random Wan 2.2 VAE checkpoints in the ORIGINAL key layout (`Wan2.2_VAE.pth`), for offline tests.

The original keys are the product's list (wan/modules/vae2_2_keys.py, from the reference's module tree); the
writer draws a diffusers AutoencoderKLWan(is_residual=True) by the shared random rule and saves its tensors under
their original names, checking that the key map is one-to-one with the model's state dict. z_dim stays 48 (the
normalisation table's size); the widths shrink.
"""
from __future__ import annotations

import torch

from wan.modules.vae2_2 import VAE22_ARCH, build_wan22_vae
from wan.modules.vae2_2_keys import original_vae22_keys, to_diffusers_key

__all__ = ["original_vae22_keys", "diffusers_to_original_keys22", "make_tiny_vae22", "write_tiny_vae22_checkpoint"]


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
