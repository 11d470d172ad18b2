"""A simple Q4_K quantizer (the gguf package dequantizes K-quants but does not write them): valid Q4_K blocks, not
llama.cpp's searched scales. Used to write K-quant test files; the loader is checked against the package's own
dequantization of whatever these blocks hold.

Q4_K super-block (256 values, 144 bytes): d (fp16), dmin (fp16), 12 bytes of 6-bit scales sc[8] and mins m[8] for the
8 sub-blocks of 32, then 128 bytes of 4-bit q; value = d * sc[j] * q - dmin * m[j].
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] (n a multiple of 256) -> uint8 [..., n / 256 * 144]."""
    rows = x.reshape(-1, QK_K).astype(np.float32)  # one super-block per row
    sub = rows.reshape(-1, 8, 32)
    lo, hi = np.minimum(sub.min(-1), 0.0), sub.max(-1)  # value range per sub-block, min <= 0 (a subtracted min)
    scale, mins = (hi - lo) / 15.0, -lo  # per sub-block: x ~ scale * q - min
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df > 0)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(np.divide(mins, dminf, out=np.zeros_like(mins), where=dminf > 0)), 0, 63).astype(np.uint8)
    step, offset = (df * sc)[..., None], (dminf * mn)[..., None]
    q = np.clip(np.rint(np.divide(sub + offset, step, out=np.zeros_like(sub), where=step > 0)), 0, 15).astype(np.uint8)
    # scales: bytes 0-3 sc[0:4] | top bits of sc[4:8]; 4-7 m[0:4] | top bits of m[4:8]; 8-11 low nibbles of both
    packed = np.empty((rows.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    # q: 4 chunks of 64 values = sub-blocks (2c, 2c+1) in the low and high nibbles of 32 bytes
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // QK_K * 144)
