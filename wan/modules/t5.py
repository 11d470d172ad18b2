"""umt5-xxl text encoder: the official Wan `.pth` (Wan key names) loaded into `transformers.UMT5EncoderModel`.

Importing this module never touches CUDA (the reference's default `device=torch.cuda.current_device()` does).
"""
import logging
import os
import re

import torch
from transformers import UMT5Config, UMT5EncoderModel

from .checkpoint import CheckpointError  # a ValueError
from .tokenizers import HuggingfaceTokenizer

__all__ = [
    "T5EncoderModel", "T5_CHECKPOINT", "map_wan_t5_key", "map_umt5_key_to_wan", "umt5_to_wan_state_dict",
    "official_t5_shapes", "infer_umt5_config", "check_umt5_shapes",
]

logger = logging.getLogger("wan")

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"  # file name inside the official ckpt_dir

# Wan key -> UMT5EncoderModel key. Per-block entries get the "blocks.N." / "encoder.block.N." prefixes.
_TOP_KEYS = {
    "token_embedding.weight": "shared.weight",  # encoder.embed_tokens.weight is tied to it
    "norm.weight": "encoder.final_layer_norm.weight",
}
_BLOCK_KEYS = {  # official order inside one Wan block
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",  # per layer
}
_TOP_INV = {v: k for k, v in _TOP_KEYS.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK_KEYS.items()}
_TIED_KEY = "encoder.embed_tokens.weight"


def _translate(key: str, top: dict, block: dict, src: str, dst: str, what: str) -> str:
    """Map a top-level key through `top`, or `<src>.N.<rest>` to `<dst>.N.<block[rest]>`; KeyError otherwise."""
    if key in top:
        return top[key]
    m = re.fullmatch(rf"{re.escape(src)}\.(\d+)\.(.+)", key)
    if m and m[2] in block:
        return f"{dst}.{m[1]}.{block[m[2]]}"
    raise KeyError(f"not a {what}: {key}")


def map_wan_t5_key(key: str) -> str:
    """Official Wan T5 key -> UMT5EncoderModel key; KeyError for a key outside the layout."""
    return _translate(key, _TOP_KEYS, _BLOCK_KEYS, "blocks", "encoder.block", "Wan umt5 encoder key")


def map_umt5_key_to_wan(key: str) -> str:
    """Inverse of map_wan_t5_key (the tied encoder.embed_tokens.weight has no Wan key: KeyError)."""
    return _translate(key, _TOP_INV, _BLOCK_INV, "encoder.block", "blocks", "UMT5EncoderModel key with a Wan name")


def umt5_to_wan_state_dict(state_dict: dict) -> dict:
    """UMT5EncoderModel state dict -> official Wan layout (drops the tied embed_tokens copy)."""
    return {map_umt5_key_to_wan(k): v for k, v in state_dict.items() if k != _TIED_KEY}


def official_t5_shapes(vocab: int, d_model: int, inner: int, d_ff: int, heads: int, layers: int,
                       buckets: int) -> dict[str, tuple[int, ...]]:
    """Every key of the official encoder state dict with its shape, in the official order.

    umt5-xxl: vocab 256384, d_model 4096, inner = heads*d_kv = 4096, d_ff 10240, heads 64, layers 24, buckets 32.
    """
    block = {
        "norm1.weight": (d_model,),
        "attn.q.weight": (inner, d_model), "attn.k.weight": (inner, d_model),
        "attn.v.weight": (inner, d_model), "attn.o.weight": (d_model, inner),
        "norm2.weight": (d_model,),
        "ffn.gate.0.weight": (d_ff, d_model), "ffn.fc1.weight": (d_ff, d_model), "ffn.fc2.weight": (d_model, d_ff),
        "pos_embedding.embedding.weight": (buckets, heads),
    }
    shapes = {"token_embedding.weight": (vocab, d_model)}
    for n in range(layers):
        shapes.update({f"blocks.{n}.{k}": s for k, s in block.items()})
    shapes["norm.weight"] = (d_model,)
    return shapes


def _fail(path: str, problems: list[str]):
    head = "; ".join(problems[:4]) + (f"; ... ({len(problems)} problems)" if len(problems) > 4 else "")
    raise CheckpointError(f"T5 checkpoint {path} is not a umt5 encoder state dict in Wan layout: {head}")


def infer_umt5_config(sd: dict, path: str = "<state dict>", max_distance: int = 128) -> UMT5Config:
    """Architecture from tensor shapes (Wan keys), then a full key/shape check. One-line CheckpointError on mismatch."""
    bad = [f"{k} is a {type(v).__name__}, not a tensor" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        _fail(path, bad)
    return check_umt5_shapes({k: tuple(v.shape) for k, v in sd.items()}, path, max_distance)


def check_umt5_shapes(shapes: dict, path: str = "<state dict>", max_distance: int = 128) -> UMT5Config:
    """`infer_umt5_config` on {Wan key: shape} (a header's worth: nothing read)."""
    need = {"token_embedding.weight": 2, "blocks.0.pos_embedding.embedding.weight": 2,
            "blocks.0.attn.q.weight": 2, "blocks.0.ffn.fc1.weight": 2}
    bad = [f"missing {k}" if k not in shapes else f"{k} is not a {n}-d tensor"
           for k, n in need.items() if len(shapes.get(k, ())) != n]
    if bad:
        _fail(path, bad)
    vocab, d_model = shapes["token_embedding.weight"]  # [V, D]
    buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]  # [buckets, heads]
    inner = shapes["blocks.0.attn.q.weight"][0]  # [heads*d_kv, D]; d_kv need not be D // heads
    d_ff = shapes["blocks.0.ffn.fc1.weight"][0]  # [d_ff, D]
    if inner % heads:
        _fail(path, [f"q rows {inner} not divisible by {heads} heads"])
    layers = 1 + max(int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    expected = official_t5_shapes(vocab, d_model, inner, d_ff, heads, layers, buckets)

    problems = [f"missing {k}" for k in expected if k not in shapes]
    for k, shape in shapes.items():
        if k not in expected:
            problems.append(f"unexpected {k}")
        elif tuple(shape) != expected[k]:
            problems.append(f"{k} has shape {list(shape)}, expected {list(expected[k])}")
    if problems:
        _fail(path, problems)
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_heads=heads, num_layers=layers,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)


def load_umt5_encoder(path, dtype: torch.dtype = torch.bfloat16) -> UMT5EncoderModel:
    """The encoder on CPU in `dtype`, eval, no grad. `path`: the official `.pth` (weights mmap'd when the dtype
    matches), or a `wan.formats.WeightSource` of any layout (Hugging Face names, fp16, fp8_scaled: dequantized in
    `dtype` as ComfyUI does)."""
    if not isinstance(path, (str, os.PathLike)):
        return _load_from_source(path, dtype)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"T5 checkpoint not found: {path} ({T5_CHECKPOINT} comes with the official Wan2.2-T2V-A14B download; "
            "point --ckpt_dir at that folder)")
    try:  # mmap: tensors are paged in from the file, no second 11 GB copy in host RAM
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # only a pre-zip (legacy) torch.save file lands here
            raise
        logger.info("%s is a legacy torch.save file; loading it without mmap", path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        _fail(path, [f"top level is a {type(sd).__name__}, not a dict"])
    return _build(infer_umt5_config(sd, path), sd.items(), dtype)


def _load_from_source(source, dtype: torch.dtype) -> UMT5EncoderModel:
    config = check_umt5_shapes(source.shapes(), str(source.where))
    model = _build(config, source.read(dequant_dtype=dtype), dtype)
    logger.info("%s", source.describe(dtype))
    return model


def _build(config: UMT5Config, tensors, dtype: torch.dtype) -> UMT5EncoderModel:
    """UMT5EncoderModel on meta, then every (Wan key, tensor) assigned, cast to `dtype` one at a time."""
    # Pinned, not left to the default: SDPA accumulates the softmax in fp32 as the reference does (HF eager: in bf16).
    config._attn_implementation = "sdpa"
    with torch.device("meta"):  # no allocation, no random init: every tensor comes from the file
        model = UMT5EncoderModel(config)
    state = {map_wan_t5_key(k): v.to(dtype) for k, v in tensors}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) != {_TIED_KEY}:  # a mapping bug, not a bad file
        raise RuntimeError(f"UMT5 key mapping is out of date: {result}")
    model.encoder.embed_tokens.weight = model.shared.weight  # re-tie: assign=True replaced shared.weight
    model.eval().requires_grad_(False)
    return model


class T5EncoderModel:
    """Prompt list -> per-prompt umt5 embeddings [n_i, d_model] (n_i = real tokens incl. EOS), like the reference.

    text_len: pad/truncate length (512 for Wan). checkpoint_path: the official `.pth` (or a
    `wan.formats.WeightSource` of any layout). tokenizer_path: the
    `google/umt5-xxl` folder. shard_fn(model) -> model, if given, replaces the move to `device` (FSDP).
    """

    def __init__(self, text_len: int, dtype: torch.dtype = torch.bfloat16, device=torch.device("cpu"),
                 checkpoint_path: str | None = None, tokenizer_path: str | None = None, shard_fn=None):
        if checkpoint_path is None or tokenizer_path is None:
            raise ValueError("T5EncoderModel needs checkpoint_path and tokenizer_path (both in the Wan ckpt_dir)")
        self.text_len, self.dtype, self.device = text_len, dtype, torch.device(device)
        self.checkpoint_path, self.tokenizer_path = checkpoint_path, tokenizer_path
        self.model = load_umt5_encoder(checkpoint_path, dtype)
        self.model = shard_fn(self.model) if shard_fn is not None else self.model.to(self.device)
        self.tokenizer = HuggingfaceTokenizer(name=tokenizer_path, seq_len=text_len, clean="whitespace")
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"tokenizer {tokenizer_path} has {self.tokenizer.vocab_size} tokens, more than the "
                             f"{self.model.config.vocab_size} embeddings of {checkpoint_path}")

    def __call__(self, texts: list[str], device) -> list[torch.Tensor]:
        ids, mask = self.tokenizer(texts, return_mask=True, add_special_tokens=True)  # [B, text_len] each
        ids, mask = ids.to(device), mask.to(device)
        seq_lens = mask.gt(0).sum(dim=1).long()  # [B]: real tokens + EOS
        with torch.no_grad(), torch.autocast(device_type=ids.device.type, enabled=False):
            context = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, d_model]
        return [u[:v] for u, v in zip(context, seq_lens.tolist())]
