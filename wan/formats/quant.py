"""Dequantization, each exactly as the tool that made the file computes it.

- fp8_scaled (ComfyUI's "scaled fp8" files, Kijai's `_scaled_KJ` files): an e4m3fn or e5m2 weight W8 and one scalar
  scale s per tensor (`scale_weight`, or the newer `weight_scale`). ComfyUI's weight dequantization
  (comfy/ops.py `scaled_fp8_op`, and `TensorCoreFP8Layout` in newer versions) is `W8.to(dt) * s.to(dt)` in the
  compute dtype dt: both operands are rounded to dt first, then multiplied in dt. The same here, with dt the dtype the
  weight is loaded in (bf16 with --convert_model_dtype, else fp32, where the product is exact). An fp8 weight without
  a scale is `W8.to(dt)`.
- GGUF: float32 values exactly as the `gguf` package's numpy dequantization (`gguf.quants.dequantize`) computes them,
  then one cast to the load dtype. Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K (what nearly all GGUF Wan files
  hold: Q8_0, Q6_K, Q5_K_M = Q5_K + Q6_K, Q4_K_M = Q4_K + Q6_K, Q5_0, Q4_0) by torch ports (TORCH_PORTS), on the load
  device (the raw bytes copied there, then unpacked with integer bit ops): numpy is slow on K-quants (a Q4_K load was
  4.7x the official fp32 one on a CPU) and CPU only. Bit for bit equal to the package (tests/test_gguf_torch.py):
  unpacking integers is exact, fp16 -> fp32 is exact, and each port does the package's fp32 operations in its order,
  each rounded once, with no fused multiply-add (separate torch ops): Q8_0 d * q, Q4_0 d * (q - 8), Q5_0 d * (q - 16);
  Q4_1, Q5_1 (d * q) + m; Q4_K, Q5_K (d * sc) * q - (dmin * m); Q6_K (d * sc) * (q - 32). Other types (Q2_K, Q3_K,
  IQ*, ...) by the package, on the CPU. (ComfyUI-GGUF's default computes in the block scale's dtype, fp16, before the
  cast: not the same rounding, so files are checked against the package, the format's reference reader in Python.)
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .headers import gguf_module

__all__ = ["FLOAT_TYPES", "FP8_TYPES", "TORCH_PORTS", "dequantize_fp8_scaled", "gguf_can_dequantize",
           "dequantize_gguf", "dequantize_q8_0", "dequantize_q4_0", "dequantize_q4_1", "dequantize_q5_0",
           "dequantize_q5_1", "dequantize_q4_k", "dequantize_q5_k", "dequantize_q6_k"]

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
    if type_name in TORCH_PORTS:
        return True
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at bytes [at, at + 2) of each block as float32 [n, 1] (exact, as numpy's astype(float32))."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _fields(b: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """The `width`-bit fields of uint8 `b`, lowest first, along a new axis at `dim` (-1 or -2): the package's
    `(b >> [0, width, ...]) & mask` with its shift axis in the same place (one scalar shift per field: on the CPU a
    broadcast tensor shift is several times slower)."""
    mask = (1 << width) - 1
    return torch.stack([(b >> s) & mask if s else b & mask for s in range(0, 8, width)], dim=dim)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 in torch, on any device: blocks [n, 34] uint8 (fp16 d, 32 x int8 q) -> float32 [n, 32] = float(d) * q.
    The package computes the same single fp32 product per element: bit for bit equal (tests/test_gguf_torch.py)."""
    d = _f16(blocks, 0)  # [n, 1]
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


def _unpack_q4_0(blocks):  # [n, 18]: fp16 d, 16 bytes of 4-bit q (values 0-15 low nibbles, 16-31 high)
    return _f16(blocks, 0), _fields(blocks[:, 2:], 4, -2).reshape(-1, 32)


def _unpack_q4_1(blocks):  # [n, 20]: fp16 d, fp16 m, 16 bytes of 4-bit q
    return _f16(blocks, 0), _f16(blocks, 2), _fields(blocks[:, 4:], 4, -2).reshape(-1, 32)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 q [n, 32]: low nibbles as Q4_0, bit 4 of value i = bit i of the little-endian uint32 qh (taken
    byte by byte: torch has few uint32 ops)."""
    return _fields(qs, 4, -2).reshape(-1, 32) | (_fields(qh, 1, -1).reshape(-1, 32) << 4)


def _unpack_q5_0(blocks):  # [n, 22]: fp16 d, 4 bytes qh, 16 bytes qs
    return _f16(blocks, 0), _q5(blocks[:, 2:6], blocks[:, 6:])


def _unpack_q5_1(blocks):  # [n, 24]: fp16 d, fp16 m, 4 bytes qh, 16 bytes qs
    return _f16(blocks, 0), _f16(blocks, 2), _q5(blocks[:, 4:8], blocks[:, 8:])


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 [n, 18] -> float32 [n, 32] = d * (q - 8): one fp32 product, as the package."""
    d, q = _unpack_q4_0(blocks)
    return q.float().sub_(8).mul_(d)


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1 [n, 20] -> float32 [n, 32] = (d * q) + m, each rounded to fp32, as the package."""
    d, m, q = _unpack_q4_1(blocks)
    return q.float().mul_(d).add_(m)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0 [n, 22] -> float32 [n, 32] = d * (q - 16): one fp32 product, as the package."""
    d, q = _unpack_q5_0(blocks)
    return q.float().sub_(16).mul_(d)


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_1 [n, 24] -> float32 [n, 32] = (d * q) + m, each rounded to fp32, as the package."""
    d, m, q = _unpack_q5_1(blocks)
    return q.float().mul_(d).add_(m)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 6-bit scales sc [n, 8] and mins m [n, 8] (uint8). Bytes 0-3: sc[0:4] | top 2 bits of
    sc[4:8]; 4-7: m[0:4] | top 2 bits of m[4:8]; 8-11: low nibbles of sc[4:8] | of m[4:8] << 4."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _unpack_q4_k(blocks):
    """[n, 144]: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of 4-bit q (4 chunks of 32 bytes, each two
    sub-blocks: low nibbles, then high) -> d, dmin [n, 1] float32; sc, m [n, 8]; q [n, 8, 32] (uint8)."""
    sc, m = _k_scale_min(blocks[:, 4:16])
    q = _fields(blocks[:, 16:].reshape(-1, 4, 32), 4, -2).reshape(-1, 8, 32)
    return _f16(blocks, 0), _f16(blocks, 2), sc, m, q


def _unpack_q5_k(blocks):
    """[n, 176]: fp16 d, fp16 dmin, 12 bytes of scales/mins, 32 bytes qh (bit j of byte i: bit 4 of value i of
    sub-block j), 128 bytes of low nibbles as Q4_K -> d, dmin, sc, m, q [n, 8, 32] as `_unpack_q4_k`."""
    sc, m = _k_scale_min(blocks[:, 4:16])
    ql = _fields(blocks[:, 48:].reshape(-1, 4, 32), 4, -2).reshape(-1, 8, 32)
    q = ql | (_fields(blocks[:, 16:48], 1, -2) << 4)
    return _f16(blocks, 0), _f16(blocks, 2), sc, m, q


def _k_affine(d, dmin, sc, m, q) -> torch.Tensor:
    """Q4_K / Q5_K values: (d * sc) * q - (dmin * m), each operation rounded to fp32, in the package's order."""
    dl = (d * sc.float()).unsqueeze(-1)  # [n, 8, 1]
    ml = (dmin * m.float()).unsqueeze(-1)
    return q.float().mul_(dl).sub_(ml).reshape(-1, 256)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K [n, 144] -> float32 [n, 256]."""
    return _k_affine(*_unpack_q4_k(blocks))


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K [n, 176] -> float32 [n, 256]."""
    return _k_affine(*_unpack_q5_k(blocks))


def _unpack_q6_k(blocks):
    """[n, 210]: 128 bytes ql, 64 bytes qh, 16 x int8 scales, fp16 d. Two halves of 128 values; in half h, value
    group c (of 32) has its low 4 bits in nibble c // 2 of ql bytes h*64 + (c % 2)*32 + i, its top 2 bits at bit 2c of
    qh byte h*32 + i -> d [n, 1] float32, sc [n, 16] int8, q [n, 16, 16] (0-63, uint8; the value is q - 32)."""
    ql = _fields(blocks[:, :128].reshape(-1, 2, 64), 4, -2).reshape(-1, 8, 32)
    qh = _fields(blocks[:, 128:192].reshape(-1, 2, 32), 2, -2).reshape(-1, 8, 32)
    sc = blocks[:, 192:208].contiguous().view(torch.int8)
    return _f16(blocks, 208), sc, (ql | (qh << 4)).reshape(-1, 16, 16)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K [n, 210] -> float32 [n, 256] = (d * sc) * (q - 32), each product rounded to fp32, as the package."""
    d, sc, q = _unpack_q6_k(blocks)
    dl = (d * sc.float()).unsqueeze(-1)  # [n, 16, 1]
    return q.float().sub_(32).mul_(dl).reshape(-1, 256)


# ggml type -> (bytes per block, torch port); every port bit for bit equal to the package's float32 dequantization
TORCH_PORTS = {"Q8_0": (34, dequantize_q8_0), "Q4_0": (18, dequantize_q4_0), "Q4_1": (20, dequantize_q4_1),
               "Q5_0": (22, dequantize_q5_0), "Q5_1": (24, dequantize_q5_1), "Q4_K": (144, dequantize_q4_k),
               "Q5_K": (176, dequantize_q5_k), "Q6_K": (210, dequantize_q6_k)}


def dequantize_gguf(data: np.ndarray, type_name: str, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """One GGUF tensor (its memory-mapped `data` as the reader gives it) -> float32 torch tensor of `shape`. The
    types in TORCH_PORTS are dequantized by their torch port on `device` (the file's bytes are copied there first);
    every other type by the gguf package on the CPU."""
    if type_name in TORCH_PORTS:
        size, port = TORCH_PORTS[type_name]
        raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, size).copy())
        return port(raw.to(device) if device is not None else raw).reshape(shape)
    gguf = gguf_module()
    if type_name == "BF16":  # stored as raw uint16; the package's dequantize takes the bytes
        data = data.view(np.uint8)
    out = gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, type_name))
    out = np.array(out, dtype=np.float32, copy=not (out.flags.owndata and out.flags.writeable))
    return torch.from_numpy(out).reshape(shape)
