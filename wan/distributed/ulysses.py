"""Ulysses sequence parallelism for the DiT, as the reference's design (section 8), on torch.distributed only.

`WanModel.set_sequence_parallel(group)` turns it on; `WanModel.forward` is the only forward and calls the two
points below, which do nothing without a group. Per forward, on every rank of the SP group (P ranks):
  1. `embed()` on the full sequence (patchify, time and text embeddings, RoPE table): identical on every rank.
  2. `shard_tokens`: x, the per-token e0 / e (not the per-sample [B, 1, ...] ones of the fast time embedding) and
     the RoPE table are cut along the token dim into P equal parts; each rank keeps its own (seq_len is a multiple
     of P: the pipeline rounds it).
  3. The blocks run on the local L/P tokens. Only self-attention talks to the other ranks: its backend is wrapped
     by `UlyssesAttention`, which exchanges q, k, v from [B, L/P, H, D] to [B, L, H/P, D] (scatter heads, gather
     tokens), runs the wrapped backend on the full sequence with the real key lengths, and exchanges back.
     Cross-attention (all 512 text rows are local) and the FFN need no exchange.
  4. `gather_tokens`: the head's [B, L/P, 64] outputs are gathered along tokens and every rank unpatchifies.
torch.compile'd blocks trace the collectives (Dynamo remaps them).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["UlyssesAttention", "shard_tokens", "gather_tokens", "slice_tokens"]


def _half_like_backend(q, k, v):
    """What AttentionBackend does on CUDA before its kernel: non-half inputs to bf16, then q and k to v's dtype.
    Done before the exchange, so half as many bytes cross the links (and the kernel sees what it would anyway)."""
    q, k, v = (u if u.dtype in (torch.float16, torch.bfloat16) else u.to(torch.bfloat16) for u in (q, k, v))
    return q.to(v.dtype), k.to(v.dtype), v


class UlyssesAttention:
    """Wraps an attention callable `(q, k, v, k_lens)` on [B, L, H, D] so that it sees the whole sequence.

    Inputs are this rank's tokens [B, L/P, H, D] (all heads); the wrapped backend gets [B, L, H/P, D] (all tokens,
    this rank's heads), so `k_lens` (real token counts of the full sequence) apply unchanged.
    """

    def __init__(self, inner, group):
        if isinstance(inner, UlyssesAttention):
            inner = inner.inner
        self.inner, self.group = inner, group
        self.world = dist.get_world_size(group)
        self.name = f"ulysses x{self.world} over {getattr(inner, 'name', type(inner).__name__)}"

    def __repr__(self):
        return f"UlyssesAttention({self.name})"

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., B, L/P, H, D] local tokens, all heads -> [..., B, L, H/P, D] all tokens, this rank's heads."""
        p = self.world
        *lead, b, lp, h, d = x.shape
        n = len(lead)
        # [P (head group = destination), ..., B, L/P, H/P, D]
        send = x.reshape(*lead, b, lp, p, h // p, d).movedim(n + 2, 0).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[i] holds rank i's tokens (sequence chunk i) for this rank's heads
        return recv.movedim(0, n + 1).reshape(*lead, b, p * lp, h // p, d)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, H/P, D] -> [B, L/P, H, D]: the inverse exchange."""
        p = self.world
        b, n, hp, d = x.shape
        # [P (token chunk = destination), B, L/P, H/P, D]
        send = x.reshape(b, p, n // p, hp, d).movedim(1, 0).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[i] holds head group i of this rank's tokens
        return recv.movedim(0, 2).reshape(b, n // p, p * hp, d)

    def __call__(self, q, k, v, k_lens=None):
        h = q.size(2)
        if h % self.world:
            raise ValueError(f"Ulysses needs the {h} heads to divide by the SP size {self.world}")
        out_dtype = q.dtype
        if q.is_cuda:
            q, k, v = _half_like_backend(q, k, v)
        if q.dtype == k.dtype == v.dtype and q.shape == k.shape == v.shape:
            q, k, v = self._tokens_to_heads(torch.stack([q, k, v])).unbind(0)  # one exchange for all three
        else:
            q, k, v = (self._tokens_to_heads(u) for u in (q, k, v))
        out = self.inner(q, k, v, k_lens=k_lens)
        return self._heads_to_tokens(out).to(out_dtype)


def slice_tokens(t, start: int, length: int):
    """Narrow a tensor, or each tensor of a tuple (FastRope's (cos, sin)), along dim 1 (tokens)."""
    if isinstance(t, (tuple, list)):
        return type(t)(slice_tokens(u, start, length) for u in t)
    return t.narrow(1, start, length)


def shard_tokens(group, x: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, rope_table):
    """This rank's token slice of x [B, L, d], the per-token e [B, L, d] / e0 [B, L, 6, d] (per-sample ones,
    [B, 1, ...], broadcast unchanged) and the RoPE table. Without a group: everything unchanged."""
    if group is None:
        return x, e, e0, rope_table
    p, r = dist.get_world_size(group), dist.get_rank(group)
    n = x.size(1)
    if n % p:
        raise ValueError(f"seq_len {n} must be a multiple of the SP size {p} (the pipeline rounds it up)")
    lp, start = n // p, r * (n // p)
    e0 = e0.narrow(1, start, lp) if e0.size(1) == n else e0
    e = e.narrow(1, start, lp) if e.size(1) == n else e
    return x.narrow(1, start, lp), e, e0, slice_tokens(rope_table, start, lp)


def gather_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """[B, L/P, C] on every rank -> [B, L, C] on every rank, rank order = token order. No group: x unchanged."""
    if group is None:
        return x
    p = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((p * x.size(0),) + tuple(x.shape[1:]))  # ranks concatenated along dim 0 (gloo and NCCL)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.view(p, *x.shape).movedim(0, 1).reshape(x.size(0), p * x.size(1), *x.shape[2:])
