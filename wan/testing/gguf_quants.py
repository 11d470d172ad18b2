"""Simple K-quant quantizers (the gguf package dequantizes K-quants but does not write them): valid Q4_K, Q5_K and
Q6_K blocks, not llama.cpp's searched scales. Used to write K-quant test files; the loader is checked against the
package's own dequantization of whatever these blocks hold.

Q4_K super-block (256 values, 144 bytes): d (fp16), dmin (fp16), 12 bytes of 6-bit scales sc[8] and mins m[8] for the
8 sub-blocks of 32, then 128 bytes of 4-bit q; value = d * sc[j] * q - dmin * m[j].
Q5_K (176 bytes): as Q4_K with 5-bit q: after the 12 scale bytes, 32 bytes qh (bit j of byte i: bit 4 of value i of
sub-block j), then the low 4 bits packed as Q4_K's q.
Q6_K (210 bytes): 128 bytes ql (low 4 bits), 64 bytes qh (top 2 bits), 16 int8 scales sc[16] for the 16 sub-blocks
of 16, d (fp16); value = d * sc[j] * (q - 32), q 6-bit.
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b where b > 0, else 0."""
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b > 0)


def _affine_k(x: np.ndarray, qmax: int):
    """Q4_K / Q5_K: float32 [..., n] -> d, dmin (fp16 [blocks]), packed scales (uint8 [blocks, 12]) and q (uint8
    [blocks, 8, 32], 0..qmax), x ~ d * sc * q - dmin * m per sub-block of 32."""
    rows = x.reshape(-1, QK_K).astype(np.float32)  # one super-block per row
    sub = rows.reshape(-1, 8, 32)
    lo, hi = np.minimum(sub.min(-1), 0.0), sub.max(-1)  # value range per sub-block, min <= 0 (a subtracted min)
    scale, mins = (hi - lo) / qmax, -lo  # per sub-block: x ~ scale * q - min
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(_divide(scale, df)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(_divide(mins, dminf)), 0, 63).astype(np.uint8)
    step, offset = (df * sc)[..., None], (dminf * mn)[..., None]
    q = np.clip(np.rint(_divide(sub + offset, step)), 0, qmax).astype(np.uint8)
    # scales: bytes 0-3 sc[0:4] | top bits of sc[4:8]; 4-7 m[0:4] | top bits of m[4:8]; 8-11 low nibbles of both
    packed = np.empty((rows.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return d, dmin, packed, q


def _nibbles_k(q: np.ndarray) -> np.ndarray:
    """q [blocks, 8, 32] (low 4 bits used) -> 128 bytes: 4 chunks of 64 values = sub-blocks (2c, 2c+1) in the low
    and high nibbles of 32 bytes."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] (n a multiple of 256) -> uint8 [..., n / 256 * 144]."""
    d, dmin, packed, q = _affine_k(x, 15)
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), packed, _nibbles_k(q)], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] (n a multiple of 256) -> uint8 [..., n / 256 * 176]."""
    d, dmin, packed, q = _affine_k(x, 31)
    bit4 = (q >> 4).astype(np.uint8)  # [blocks, 8, 32]: sub-block j's bit goes to bit j of byte i
    qh = np.bitwise_or.reduce(bit4 << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), packed, qh, _nibbles_k(q)], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 176)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] (n a multiple of 256) -> uint8 [..., n / 256 * 210]."""
    rows = x.reshape(-1, QK_K).astype(np.float32)
    sub = rows.reshape(-1, 16, 16)
    scale = np.abs(sub).max(-1) / 31.0  # per sub-block of 16: x ~ scale * (q - 32), q - 32 in -31..31
    d = (scale.max(-1) / 127.0).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.rint(_divide(scale, df)), 0, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = (np.clip(np.rint(_divide(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 8, 32)
    # value group c of 32 (half h = c // 4): low 4 bits in nibble (c // 2) % 2 of ql byte h*64 + (c % 2)*32 + i,
    # top 2 bits at bits 2 * (c % 4) of qh byte h*32 + i
    low = (q & 0x0F).reshape(-1, 2, 2, 2, 32)  # [h, nibble, c % 2, i]
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)  # [h, c % 4, i]
    qh = np.bitwise_or.reduce(high << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    blocks = np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), _fp16_bytes(d)], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 210)
