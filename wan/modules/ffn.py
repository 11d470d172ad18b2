"""How a block runs its feed-forward network: whole (the reference) or over token chunks (bounded memory).

The FFN acts on each token alone, so running it over chunks of tokens computes the same rows. A GEMM may still
pick another kernel (another summation order) for a smaller M, so the result equals the whole FFN within the
rounding of the dtype, not bit for bit; chunk lengths are multiples of `align` tokens (256) so each chunk runs a
large, well-shaped GEMM. What it bounds is the [B, L, ffn_dim] intermediate (up-projection output and its GELU,
2 x 27.6 KB per token in bf16 at A14B width), the largest activation of a block. Chosen once by
`WanModel.configure()`; the block calls `self.ffn_runner(self.ffn, x)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class WholeFFN:
    """The reference: one call over all tokens."""

    name = "whole"

    def __call__(self, ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return ffn(x)


class TokenChunkedFFN:
    """Up to `chunks` calls over contiguous token ranges of x [B, L, d] (each a multiple of `align` tokens but the
    last), written into one preallocated output."""

    def __init__(self, chunks: int, align: int = 256):
        if chunks < 2:
            raise ValueError(f"token-chunked FFN needs at least 2 chunks, got {chunks}")
        self.chunks, self.align = chunks, align
        self.name = f"{chunks} token chunks"

    def __call__(self, ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        size = -(-x.shape[1] // self.chunks)
        parts = x.split(-(-size // self.align) * self.align, dim=1)
        first = ffn(parts[0])
        out = first.new_empty(*x.shape[:-1], first.shape[-1])
        out[:, : first.shape[1]] = first
        start = first.shape[1]
        del first
        for part in parts[1:]:
            out[:, start:start + part.shape[1]] = ffn(part)
            start += part.shape[1]
        return out


def ffn_runner(chunks: int):
    """0 or 1: the whole FFN; N >= 2: N token chunks."""
    return TokenChunkedFFN(chunks) if chunks > 1 else WholeFFN()
