"""Dequantization, each exactly as the tool that made the file computes it.

- fp8_scaled (ComfyUI's "scaled fp8" files, Kijai's `_scaled_KJ` files): an e4m3fn or e5m2 weight W8 and one scalar
  scale s per tensor (`scale_weight`, or the newer `weight_scale`). ComfyUI's weight dequantization
  (comfy/ops.py `scaled_fp8_op`, and `TensorCoreFP8Layout` in newer versions) is `W8.to(dt) * s.to(dt)` in the
  compute dtype dt: both operands are rounded to dt first, then multiplied in dt. The same here, with dt the dtype the
  weight is loaded in (bf16 with --convert_model_dtype, else fp32, where the product is exact). An fp8 weight without
  a scale is `W8.to(dt)`.
- GGUF: the `gguf` package's numpy dequantization (`gguf.quants.dequantize`, float32 out), then one cast to the load
  dtype; Q8_0 by a torch port of the same arithmetic (bit for bit equal, tested), which also runs on the GPU.
  (ComfyUI-GGUF's default computes in the block scale's dtype, fp16 for Q8_0, before that cast: not the same
  rounding, so files are checked against the package, the format's reference reader in Python.)
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .headers import gguf_module

__all__ = ["FLOAT_TYPES", "FP8_TYPES", "dequantize_fp8_scaled", "gguf_can_dequantize", "dequantize_gguf",
           "dequantize_q8_0"]

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
FP8_TYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FP8_NAMES = {"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}


def dequantize_fp8_scaled(w8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's `W8.to(dt) * scale.to(dt)` (scale None: `W8.to(dt)`); scale has one element."""
    w = w8.to(dtype)
    return w if scale is None else w * scale.reshape(()).to(dtype)


@lru_cache(maxsize=None)
def gguf_can_dequantize(type_name: str) -> bool:
    """Whether the installed gguf package dequantizes this ggml type (probed on one zero block)."""
    gguf = gguf_module()
    qtype = getattr(gguf.GGMLQuantizationType, type_name, None)
    if qtype is None or type_name in ("I8", "I16", "I32", "I64"):
        return False
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 in torch, on any device: blocks [n, 34] uint8 (fp16 d, 32 x int8 q) -> float32 [n, 32] = float(d) * q.
    The package computes the same single fp32 product per element: bit for bit equal (tests/test_formats.py)."""
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


def dequantize_gguf(data: np.ndarray, type_name: str, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """One GGUF tensor (its memory-mapped `data` as the reader gives it) -> float32 torch tensor of `shape`. Q8_0 is
    dequantized by the torch port on `device` (the file's bytes are copied there first); every other type by the
    gguf package on the CPU."""
    if type_name == "Q8_0":
        raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 34).copy())
        return dequantize_q8_0(raw.to(device) if device is not None else raw).reshape(shape)
    gguf = gguf_module()
    if type_name == "BF16":  # stored as raw uint16; the package's dequantize takes the bytes
        data = data.view(np.uint8)
    out = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, type_name))
    out = np.array(out, dtype=np.float32, copy=not (out.flags.owndata and out.flags.writeable))
    return torch.from_numpy(out).reshape(shape)
