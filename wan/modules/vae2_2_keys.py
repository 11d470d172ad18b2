"""Key names of the Wan 2.2 VAE: the reference's `Wan2.2_VAE.pth` (its `WanVAE_` module tree) -> diffusers'
`AutoencoderKLWan(is_residual=True)`. diffusers' pip package converts only the Wan 2.1 layout, so the map is here.

Original tree (vae2_2.py), level i of the encoder / decoder:
    encoder.conv1 | encoder.downsamples.{i}.downsamples.{j}: ResidualBlock for j < num_res_blocks, then Resample
    (downsample); the level's AvgDown3D shortcut has no weights | encoder.middle.{0,1,2} (res, attention, res) |
    encoder.head.{0: RMS gamma, 2: conv} | conv1 (quant) | conv2 (post-quant)
    decoder.conv1 | decoder.middle.* | decoder.upsamples.{i}.upsamples.{j}: ResidualBlock for j <= num_res_blocks,
    then Resample (upsample; its DupUp3D shortcut has no weights) | decoder.head.*
ResidualBlock: residual.{0: RMS gamma, 2: conv, 3: RMS gamma, 6: conv}, shortcut (1x1 conv, when the width changes).
Resample: resample.1 (the 2-D conv after the pad / nearest upsample), time_conv (3-D resamples only).
"""
from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["to_diffusers_key", "convert_wan22_vae_to_diffusers", "original_vae22_keys", "diffusers_to_official22"]

_RESIDUAL = {"residual.0.gamma": "norm1.gamma", "residual.2": "conv1", "residual.3.gamma": "norm2.gamma",
             "residual.6": "conv2", "shortcut": "conv_shortcut"}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}


def _residual(rest: str) -> str:
    for old, new in _RESIDUAL.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def _middle(part: str, rest: str) -> str:
    """encoder/decoder.middle.{0,1,2}.rest -> mid_block.resnets.{0,1} / mid_block.attentions.0."""
    idx, rest = rest.split(".", 1)
    if idx == "1":  # the attention block keeps its names (norm.gamma, to_qkv, proj)
        return f"{part}.mid_block.attentions.0.{rest}"
    return f"{part}.mid_block.resnets.{int(idx) // 2}.{_residual(rest)}"


def _level(part: str, i: str, j: str, rest: str) -> str:
    """A level's j-th module: a ResidualBlock (residual.* / shortcut.*) or the level's Resample."""
    block = "down_blocks" if part == "encoder" else "up_blocks"
    if rest.startswith(("resample.", "time_conv.")):
        return f"{part}.{block}.{i}.{'downsampler' if part == 'encoder' else 'upsampler'}.{rest}"
    return f"{part}.{block}.{i}.resnets.{j}.{_residual(rest)}"


def to_diffusers_key(key: str) -> str:
    """One original key -> diffusers' name. Raises KeyError for a key that is not part of the Wan 2.2 VAE."""
    top, _, rest = key.partition(".")
    if top in _TOP:
        return f"{_TOP[top]}.{rest}"
    if top not in ("encoder", "decoder"):
        raise KeyError(key)
    try:
        if rest.startswith("conv1."):
            return f"{top}.conv_in.{rest[len('conv1.'):]}"
        if rest.startswith("head."):
            idx, leaf = rest[len("head."):].split(".", 1)
            return f"{top}.{'norm_out' if idx == '0' else 'conv_out'}.{leaf}"
        if rest.startswith("middle."):
            return _middle(top, rest[len("middle."):])
        m = re.fullmatch(r"(?:downsamples|upsamples)\.(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.+)", rest)
        if m:
            return _level(top, *m.groups())
    except (KeyError, ValueError):
        pass
    raise KeyError(key)


def convert_wan22_vae_to_diffusers(sd: dict) -> dict:
    """An original-layout Wan 2.2 VAE state dict with diffusers' key names (tensors shared, not copied). Keys that
    are not part of the Wan 2.2 VAE are kept as they are, so the caller's key check names them."""
    out = {}
    for k, v in sd.items():
        try:
            out[to_diffusers_key(k)] = v
        except KeyError:
            out[k] = v
    return out


def _wb(p: str) -> list[str]:
    return [f"{p}.weight", f"{p}.bias"]


def _res(p: str, shortcut: bool) -> list[str]:
    ks = [f"{p}.residual.0.gamma", *_wb(f"{p}.residual.2"), f"{p}.residual.3.gamma", *_wb(f"{p}.residual.6")]
    return ks + (_wb(f"{p}.shortcut") if shortcut else [])


def _middle_keys(part: str) -> list[str]:
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
    keys += _middle_keys("encoder") + ["encoder.head.0.gamma", *_wb("encoder.head.2"), *_wb("conv1"), *_wb("conv2")]
    keys += _wb("decoder.conv1") + _middle_keys("decoder")
    mult, up = [dim_mult[-1], *dim_mult[::-1]], list(temperal_downsample[::-1])  # decoder widths, in dec_dim units
    for i in range(n):
        for j in range(num_res_blocks + 1):
            keys += _res(f"decoder.upsamples.{i}.upsamples.{j}", j == 0 and mult[i] != mult[i + 1])
        if i != n - 1:
            p = f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}"
            keys += _wb(f"{p}.resample.1") + (_wb(f"{p}.time_conv") if up[i] else [])
    return keys + ["decoder.head.0.gamma", *_wb("decoder.head.2")]


@lru_cache(maxsize=1)
def diffusers_to_official22() -> dict[str, str]:
    """{diffusers key: original key} of the Wan 2.2 VAE (the official architecture): `to_diffusers_key` over the
    original key list, inverted (it is one-to-one: tests/test_vae22.py checks it against diffusers' model)."""
    orig = original_vae22_keys()
    inv = {to_diffusers_key(k): k for k in orig}
    if len(inv) != len(orig):
        raise RuntimeError(f"the Wan 2.2 VAE key map is not one-to-one ({len(orig)} original keys, {len(inv)} "
                           "diffusers names)")
    return inv
