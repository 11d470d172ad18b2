"""LoRA key names: which format a file uses and which official WanModel parameter each key changes.

Every key is split into a module path and a role, then the module path is mapped to the official Wan name:

  role        suffixes in the file                                       changes
  down / up   .lora_down.weight / .lora_up.weight   (original, Lightning)   {module}.weight
              .lora_A[.weight] / .lora_B[.weight]   (PEFT, diffusers)
              .lora_A.default.weight / .lora_B.default.weight
  alpha       .alpha (scale alpha / rank; missing means scale 1)
  diff        .diff                                                         {module}.weight
  diff_b      .diff_b, .lora_B.bias                                         {module}.bias
  diff_m      .diff_m  (blocks.3.diff_m -> blocks.3.modulation)             {module}.modulation

A module path that is itself a parameter (modulation) is changed as is. Module names come in three namings,
detected per file: official (optionally prefixed diffusion_model. / base_model.model.), diffusers
(transformer.blocks.0.attn1.to_q, ... mapped back to official names) and kohya / musubi
(lora_unet_blocks_0_self_attn_q, resolved against the official names with '.' written as '_').
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# (suffix, role, style); longest first so that e.g. ".lora_B.bias" is not read as ".lora_B" + junk
SUFFIXES = sorted([
    (".lora_down.weight", "down", "down_up"),
    (".lora_up.weight", "up", "down_up"),
    (".lora_A.default.weight", "down", "A_B"),
    (".lora_B.default.weight", "up", "A_B"),
    (".lora_A.weight", "down", "A_B"),
    (".lora_B.weight", "up", "A_B"),
    (".lora_B.bias", "diff_b", "diff"),
    (".lora_A", "down", "A_B"),
    (".lora_B", "up", "A_B"),
    (".alpha", "alpha", None),
    (".diff_b", "diff_b", "diff"),
    (".diff_m", "diff_m", "diff"),
    (".diff", "diff", "diff"),
], key=lambda s: -len(s[0]))

PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"

# Official module paths that hold parameters (T2V and I2V), for resolving kohya's underscored names.
TOP_MODULES = ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
               "time_projection.1", "head.head", "head", "img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3",
               "img_emb.proj.4")
BLOCK_MODULES = tuple(f"{a}.{m}" for a in ("self_attn", "cross_attn") for m in ("q", "k", "v", "o", "norm_q", "norm_k")
                      ) + ("cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img", "norm3", "ffn.0", "ffn.2")
_KOHYA_TOP = {m.replace(".", "_"): m for m in TOP_MODULES}
_KOHYA_BLOCK = {m.replace(".", "_"): m for m in BLOCK_MODULES}

# diffusers WanTransformer3DModel names -> official names. diffusers' block norm2 is the official (affine) norm3 and
# its norm3 is the official (weightless) norm2, so the two are swapped.
DIFFUSERS_BLOCK = {
    **{f"{d}.{src}": f"{o}.{dst}" for d, o in (("attn1", "self_attn"), ("attn2", "cross_attn"))
       for src, dst in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"),
                        ("norm_k", "norm_k"))},
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "norm2": "norm3", "norm3": "norm2",
    "scale_shift_table": "modulation",
}
DIFFUSERS_TOP = {
    "scale_shift_table": "head.modulation", "proj_out": "head.head", "norm_out": "head.norm",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
}
_DIFFUSERS_MARK = re.compile(r"(^|\.)(attn1|attn2|ffn\.net|scale_shift_table|proj_out|condition_embedder)(\.|$)")
_BLOCK = re.compile(r"blocks\.(\d+)(?:\.(.+))?")
_KOHYA_BLOCK_RE = re.compile(r"blocks_(\d+)(?:_(.+))?")


@dataclass(frozen=True)
class LoraKey:
    key: str  # as stored in the file
    module: str  # official module path ("blocks.0.self_attn.q", "blocks.3", "head.head")
    role: str  # down | up | alpha | diff | diff_b | diff_m
    style: str | None  # down_up | A_B | diff | None (alpha)

    @property
    def target(self) -> str:
        """The official parameter name this key changes."""
        if self.role == "diff_b":
            return f"{self.module}.bias"
        if self.role == "diff_m":
            return f"{self.module}.modulation"
        return self.module if self.module.rsplit(".", 1)[-1] == "modulation" else f"{self.module}.weight"


def _strip_prefixes(key: str) -> tuple[str, bool]:
    """Drop the known wrapper prefixes; also report whether a diffusers `transformer.` prefix was among them."""
    saw_transformer, changed = False, True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
                saw_transformer |= prefix == "transformer."
    return key, saw_transformer


def _split_suffix(key: str):
    for suffix, role, style in SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], role, style
    return None


def _from_kohya(name: str) -> str | None:
    m = _KOHYA_BLOCK_RE.fullmatch(name)
    if m:
        if m.group(2) is None:
            return f"blocks.{m.group(1)}"
        inner = _KOHYA_BLOCK.get(m.group(2))
        return f"blocks.{m.group(1)}.{inner}" if inner else None
    return _KOHYA_TOP.get(name)


def _from_diffusers(module: str) -> str:
    m = _BLOCK.fullmatch(module)
    if m:
        rest = m.group(2)
        return module if rest is None else f"blocks.{m.group(1)}.{DIFFUSERS_BLOCK.get(rest, rest)}"
    return DIFFUSERS_TOP.get(module, module)


def _label(naming: str, styles: set) -> str:
    lora = styles - {"diff", None}
    if naming == "kohya":
        base = "kohya/musubi"
    elif naming == "diffusers":
        base = "diffusers"
    elif lora == {"A_B"}:
        base = "peft"
    elif lora == {"down_up"}:
        base = "lightning/original"
    elif lora:
        base = "lightning/original + peft"
    else:
        return "diff-only (distill extras)"
    return base + (" + diff" if "diff" in styles else "")


def parse_keys(keys) -> tuple[str, list[LoraKey], list[str]]:
    """(format label, parsed keys, problems). Problems are short strings; any problem means the file is rejected."""
    keys = list(keys)
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIX)]
    if kohya and len(kohya) < len(keys):
        other = [k for k in keys if not k.startswith(KOHYA_PREFIX)]
        return "mixed", [], [f"mixes kohya names ({kohya[0]}) with dotted names ({other[0]})"]
    naming = "kohya" if kohya else "official"
    split = {}
    unknown = []
    for key in keys:
        name, saw_transformer = (key[len(KOHYA_PREFIX):], False) if kohya else _strip_prefixes(key)
        parts = _split_suffix(name)
        if parts is None:
            unknown.append(key)
            continue
        split[key] = parts
        if not kohya and (saw_transformer or _DIFFUSERS_MARK.search(parts[0])):
            naming = "diffusers"
    problems = []
    if unknown:
        hint = ""
        if all(k.endswith((".weight", ".bias")) for k in unknown) and not split:
            hint = " (a full model checkpoint, not a LoRA?)"
        problems.append(f"{len(unknown)} key(s) of no known LoRA format, e.g. {', '.join(unknown[:3])}{hint}")
    parsed = []
    unresolved = []
    for key, (module, role, style) in split.items():
        if naming == "kohya":
            official = _from_kohya(module)
            if official is None:
                unresolved.append(key)
                continue
        elif naming == "diffusers":
            official = _from_diffusers(module)
        else:
            official = module
        parsed.append(LoraKey(key, official, role, style))
    if unresolved:
        problems.append(f"{len(unresolved)} kohya key(s) name no Wan module, e.g. {', '.join(unresolved[:3])}")
    return _label(naming, {p.style for p in parsed}), parsed, problems
