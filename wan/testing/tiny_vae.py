"""Tiny random Wan 2.1 VAE checkpoints in the ORIGINAL Wan key layout, for offline tests.

The original -> diffusers key map is diffusers' own `convert_wan_vae_to_diffusers`, inverted over the list of
original keys (wan.formats.keys, which the Diffusers vae/ loader uses too) and checked one-to-one with
AutoencoderKLWan's state dict. num_res_blocks must stay 2: the converter
hard-codes the decoder indices (resample at 3/7/11, shortcut at 4).
"""
import torch

from wan.formats.keys import original_vae_keys, vae_diffusers_to_official
from wan.modules.vae import build_wan_vae

__all__ = ["original_vae_keys", "diffusers_to_original_keys", "make_tiny_vae", "write_tiny_vae_checkpoint"]


def diffusers_to_original_keys(model):
    """{diffusers key: original key} for `model`; raises if diffusers' converter is not a bijection onto it."""
    inv = vae_diffusers_to_official()
    target = set(model.state_dict())
    if set(inv) != target:
        raise RuntimeError(f"Wan VAE key map does not cover the model: e.g. {sorted(set(inv) ^ target)[:3]}")
    return inv


@torch.no_grad()
def make_tiny_vae(seed=0, base_dim=8, z_dim=16):
    """AutoencoderKLWan(base_dim) with every parameter drawn by the shared rule from one seeded CPU generator."""
    from .random_init import randomize_weights_

    return randomize_weights_(build_wan_vae(base_dim, z_dim).eval(), seed).requires_grad_(False)


def write_tiny_vae_checkpoint(path, seed=0, base_dim=8):
    """Write a tiny random VAE as a plain original-layout state dict (torch.save); returns the in-memory
    diffusers model it came from (same weights)."""
    model = make_tiny_vae(seed, base_dim)
    inv = diffusers_to_original_keys(model)
    sd = {inv[k]: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, path)
    return model
