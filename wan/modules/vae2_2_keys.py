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

__all__ = ["to_diffusers_key", "convert_wan22_vae_to_diffusers"]

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
