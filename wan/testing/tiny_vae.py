"""Tiny random Wan 2.1 VAE checkpoints in the ORIGINAL Wan key layout, for offline tests.

The original -> diffusers key map is diffusers' own `convert_wan_vae_to_diffusers`; we invert it by
converting the list of original keys (enumerated below from the original module layout) and checking
the result is one-to-one with AutoencoderKLWan's state dict. num_res_blocks must stay 2: the converter
hard-codes the decoder indices (resample at 3/7/11, shortcut at 4).
"""
import torch

from wan.modules.vae import VAE_ARCH, build_wan_vae

__all__ = ["original_vae_keys", "diffusers_to_original_keys", "make_tiny_vae", "write_tiny_vae_checkpoint"]


def _res_keys(p, shortcut):
    # ResidualBlock: residual = [RMS(0), SiLU, conv(2), RMS(3), SiLU, Dropout, conv(6)] (+ 1x1 shortcut)
    ks = [f"{p}.residual.0.gamma", *_wb(f"{p}.residual.2"), f"{p}.residual.3.gamma", *_wb(f"{p}.residual.6")]
    return ks + ([f"{p}.shortcut.weight", f"{p}.shortcut.bias"] if shortcut else [])


def _resample_keys(p, temporal):
    # Resample: resample.1 = Conv2d (after pad/upsample); time_conv only for the 3-D variants
    ks = [f"{p}.resample.1.weight", f"{p}.resample.1.bias"]
    return ks + ([f"{p}.time_conv.weight", f"{p}.time_conv.bias"] if temporal else [])


def _wb(p):
    return [f"{p}.weight", f"{p}.bias"]


def original_vae_keys(dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True)):
    """All state-dict keys of the original WanVAE_ (encoder., conv1., conv2., decoder.)."""
    n = len(dim_mult)
    keys, idx = _wb("encoder.conv1"), 0
    mult = [1] + list(dim_mult)  # encoder widths, in units of base_dim
    for i in range(n):
        for j in range(num_res_blocks):
            keys += _res_keys(f"encoder.downsamples.{idx}", j == 0 and mult[i] != mult[i + 1])
            idx += 1
        if i != n - 1:
            keys += _resample_keys(f"encoder.downsamples.{idx}", temperal_downsample[i])
            idx += 1
    for part in ("encoder", "decoder"):
        mid = _res_keys(f"{part}.middle.0", False) + _res_keys(f"{part}.middle.2", False)
        mid += [f"{part}.middle.1.norm.gamma"] + _wb(f"{part}.middle.1.to_qkv") + _wb(f"{part}.middle.1.proj")
        head = [f"{part}.head.0.gamma"] + _wb(f"{part}.head.2")
        if part == "encoder":
            keys += mid + head + _wb("conv1") + _wb("conv2") + _wb("decoder.conv1")
        else:
            keys += mid
    # decoder widths [4,4,4,2,1]; stages 1..3 take half the previous width (after the upsample conv)
    mult, up, idx = [dim_mult[-1]] + list(dim_mult[::-1]), list(temperal_downsample[::-1]), 0
    for i in range(n):
        cin = mult[i] // 2 if i > 0 else mult[i]
        for _ in range(num_res_blocks + 1):
            keys += _res_keys(f"decoder.upsamples.{idx}", cin != mult[i + 1])
            cin, idx = mult[i + 1], idx + 1
        if i != n - 1:
            keys += _resample_keys(f"decoder.upsamples.{idx}", up[i])
            idx += 1
    return keys + ["decoder.head.0.gamma"] + _wb("decoder.head.2")


def diffusers_to_original_keys(model):
    """{diffusers key: original key} for `model`; raises if diffusers' converter is not a bijection."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    orig = original_vae_keys(VAE_ARCH["dim_mult"], VAE_ARCH["num_res_blocks"], VAE_ARCH["temperal_downsample"])
    inv = convert_wan_vae_to_diffusers({k: k for k in orig})  # values pass through unchanged
    target = set(model.state_dict())
    if len(inv) != len(orig) or set(inv) != target:
        raise RuntimeError(f"Wan VAE key map is not one-to-one: {len(orig)} original keys, {len(inv)} converted, "
                           f"{len(target)} model keys, e.g. {sorted(set(inv) ^ target)[:3]}")
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
