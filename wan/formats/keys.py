"""One key map per component and naming: file key -> official key, or None for a key that is not of that naming.

Official names are the ones the engine's loaders take: the DiT's (wan/modules/model.py), the Wan T5's
(`blocks.N.attn.q.weight`, wan/modules/t5.py) and the original Wan 2.1 VAE's (`encoder.downsamples.N...`).

  component  naming     where it comes from                       map
  DiT        official   official folders, ComfyUI, Kijai, GGUF    identity (after the optional model.diffusion_model.)
  DiT        diffusers  Diffusers transformer/, transformer_2/    the converter's renames inverted, whole names
                                                                  (norm2 <-> norm3 swapped; no transposes)
  T5         official   the official .pth, Kijai's bf16 file       identity
  T5         hf         Diffusers text_encoder/, ComfyUI umt5      encoder.block.N.layer.0.SelfAttention.q
                                                                  -> blocks.N.attn.q
  VAE        official   the official .pth, ComfyUI, Kijai          identity (Kijai: optional model.)
  VAE        diffusers  Diffusers vae/                            diffusers' convert_wan_vae_to_diffusers inverted
  VAE 2.2    official   Wan2.2_VAE.pth (TI2V-5B), 16-bit copies     identity (optional model.)
  VAE 2.2    diffusers  Diffusers vae/ of the TI2V-5B folder      wan.modules.vae2_2_keys inverted (is_residual)
"""
from __future__ import annotations

import re
from functools import lru_cache

from ..lora_keys import DIFFUSERS_BLOCK, DIFFUSERS_TOP

__all__ = ["COMPONENTS", "naming_of", "to_official", "original_vae_keys", "PREFIXES"]

# wrapper prefixes each component's files may carry (stripped when every tensor key has it)
PREFIXES = {"dit": ("model.diffusion_model.", "diffusion_model."), "t5": (), "vae": ("model.",), "vae22": ("model.",)}

# key patterns that only one naming uses (a file with both is a mixed file)
_MARKS = {
    "dit": {"diffusers": re.compile(r"(^|\.)(condition_embedder|attn1|attn2|ffn\.net|scale_shift_table|proj_out)\."
                                    r"|scale_shift_table$"),
            "official": re.compile(r"(^|\.)(self_attn|cross_attn|time_embedding|text_embedding|time_projection|"
                                   r"head\.head)\.|modulation$")},
    "t5": {"hf": re.compile(r"^(encoder\.|shared\.)"), "official": re.compile(r"^(blocks\.|token_embedding\.|norm\.)")},
    "vae": {"diffusers": re.compile(r"(down_blocks|up_blocks|mid_block|quant_conv|conv_in|conv_out)\."),
            "official": re.compile(r"(downsamples|upsamples|middle)\.|^conv[12]\.")},
}
_MARKS["vae22"] = _MARKS["vae"]  # the Wan 2.2 VAE: the same two namings, another key map
COMPONENTS = tuple(_MARKS)


def naming_of(component: str, keys) -> tuple[str, tuple[str, str] | None]:
    """(naming, None), or (the first naming, (a key of each)) when the keys mix two namings. With no marked key at
    all the naming is "official" (the shape check then names what is missing)."""
    seen: dict[str, str] = {}
    for k in keys:
        for naming, pattern in _MARKS[component].items():
            if naming not in seen and pattern.search(k):
                seen[naming] = k
    if len(seen) > 1:
        (a, ka), (b, kb) = list(seen.items())[:2]
        return a, (ka, kb)
    return (next(iter(seen)) if seen else "official"), None


def _dit_from_diffusers(key: str) -> str | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        if m[2] == "scale_shift_table":
            return f"blocks.{m[1]}.modulation"
        module, _, leaf = m[2].rpartition(".")
        inner = DIFFUSERS_BLOCK.get(module)
        return f"blocks.{m[1]}.{inner}.{leaf}" if inner and leaf in ("weight", "bias") else None
    if key == "scale_shift_table":
        return "head.modulation"
    module, _, leaf = key.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if module == "patch_embedding":
        return key
    inner = DIFFUSERS_TOP.get(module)
    return f"{inner}.{leaf}" if inner else None


def _t5_from_hf(key: str) -> str | None:
    from ..modules.t5 import map_umt5_key_to_wan

    if key == "encoder.embed_tokens.weight":  # the tied copy of shared.weight (only read when shared is absent)
        return "token_embedding.weight"
    try:
        return map_umt5_key_to_wan(key)
    except KeyError:
        return None


def _res_keys(p: str, shortcut: bool) -> list[str]:
    # ResidualBlock: residual = [RMS(0), SiLU, conv(2), RMS(3), SiLU, Dropout, conv(6)] (+ 1x1 shortcut)
    ks = [f"{p}.residual.0.gamma", *_wb(f"{p}.residual.2"), f"{p}.residual.3.gamma", *_wb(f"{p}.residual.6")]
    return ks + ([f"{p}.shortcut.weight", f"{p}.shortcut.bias"] if shortcut else [])


def _resample_keys(p: str, temporal: bool) -> list[str]:
    # Resample: resample.1 = Conv2d (after pad/upsample); time_conv only for the 3-D variants
    return [f"{p}.resample.1.weight", f"{p}.resample.1.bias"] + (
        [f"{p}.time_conv.weight", f"{p}.time_conv.bias"] if temporal else [])


def _wb(p: str) -> list[str]:
    return [f"{p}.weight", f"{p}.bias"]


def original_vae_keys(dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True)) -> list[str]:
    """All state-dict keys of the original Wan 2.1 VAE (encoder., conv1., conv2., decoder.), in module order."""
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
        keys += (mid + head + _wb("conv1") + _wb("conv2") + _wb("decoder.conv1")) if part == "encoder" else mid
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


@lru_cache(maxsize=1)
def vae_diffusers_to_official() -> dict[str, str]:
    """{diffusers key: original key}: diffusers' own converter run over the original key list, inverted; refused
    unless it is one-to-one (num_res_blocks 2: the converter hard-codes the decoder indices)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from ..modules.vae import VAE_ARCH

    orig = original_vae_keys(VAE_ARCH["dim_mult"], VAE_ARCH["num_res_blocks"], VAE_ARCH["temperal_downsample"])
    forward = convert_wan_vae_to_diffusers({k: k for k in orig})  # values pass through unchanged
    if len(forward) != len(orig) or sorted(forward.values()) != sorted(orig):
        raise RuntimeError(f"diffusers' Wan VAE key map is not one-to-one here ({len(orig)} original keys, "
                           f"{len(forward)} converted); the installed diffusers changed it")
    return dict(forward)


def to_official(component: str, naming: str, key: str) -> str | None:
    """The official name of `key` (prefix already stripped) in `naming`, or None if it is not a name of it."""
    if naming == "official":
        return key
    if component == "dit" and naming == "diffusers":
        return _dit_from_diffusers(key)
    if component == "t5" and naming == "hf":
        return _t5_from_hf(key)
    if component == "vae" and naming == "diffusers":
        return vae_diffusers_to_official().get(key)
    if component == "vae22" and naming == "diffusers":
        from ..modules.vae2_2_keys import diffusers_to_official22

        return diffusers_to_official22().get(key)
    raise ValueError(f"no key map for {component} / {naming}")
