"""Fused q/k RMSNorm + weight + RoPE + bf16 cast for the DiT's self-attention: a named alternative that
`WanModel.configure(qk_rope=...)` installs on every self-attention; never the default.

What it replaces (WanSelfAttention.forward with the fast RoPE), for t in (q, k), each [B, L, d] (d = H * D):
    n = (t.float() * rsqrt(mean(t.float()^2, -1) + eps)).type_as(t) * weight   # WanRMSNorm over the full width d
    r = FastRope.apply(n.view(B, L, H, D), (cos, sin))                          # fp32 [B, L, H, D]
and the attention backend then casts r to bf16 (on CUDA). Fused, each token row of q and k is read once and
written once as bf16 [B, L, H, D]: no fp32 [B, L, H, D] round trip through memory.

Rounding steps kept: the norm in fp32, rounded to t's dtype (type_as), times the weight in PyTorch's promoted dtype
(bf16 * bf16 rounds to bf16; an fp32 weight gives an fp32 product), the rotation in fp32, one cast at the end.
- impl "torch": the same PyTorch ops, so equal to the unfused path bit for bit (tests; any device).
- impl "triton": one program per token row (q and k in one launch). It sums the squares in another order than
  PyTorch, and the compiler contracts a*b - c*d into FMAs, so fp32 values can differ in their last bits and a bf16
  rounding can flip: under the interpreter (no FMA) 0 to 5e-5 of the elements differed, by at most one bf16 ulp of
  their (x0, x1) pair's magnitude. The compiled reference path (inductor) reorders the same sums and contracts the
  same products, so it differs from eager PyTorch in the same way.
Triton is imported only when the triton form is built: this module imports without it.
"""
import functools

import torch

from .attention import BackendUnavailableError
from .rope import FastRope

__all__ = ["FusedQKRope", "check_request", "qk_norm_rope_torch", "resolve_qk_rope", "triton_available"]

IMPLS = ("triton", "torch")


def qk_norm_rope_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                       heads: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [B, L, d] -> out_dtype [B, L, H, D]: WanRMSNorm.forward's ops, then FastRope.apply, then one cast."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight
    return FastRope.apply(y.unflatten(-1, (heads, -1)), (cos, sin)).to(out_dtype)


class FusedQKRope:
    """`(q, k, weight_q, weight_k, eps, table, heads) -> (q, k)`: q, k the q / k linears' outputs [B, L, d], table
    FastRope.prepare's (cos, sin), each [B|1, L, 1, D/2] fp32; returns out_dtype [B, L, H, D] (bf16: what the
    attention backends take on CUDA). `impl` "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1) or "torch"."""

    def __init__(self, impl: str = "triton", out_dtype: torch.dtype = torch.bfloat16):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        if impl == "triton" and out_dtype != torch.bfloat16:
            raise ValueError("the triton form writes bf16 only")
        self.impl, self.out_dtype = impl, out_dtype
        self.op = _triton_op() if impl == "triton" else None
        self.name = f"fused q/k RMSNorm+RoPE ({impl}, {str(out_dtype).removeprefix('torch.')} out)"

    def __repr__(self):
        return self.name

    def __call__(self, q, k, weight_q, weight_k, eps: float, table, heads: int):
        cos, sin = table
        if self.op is None:
            return (qk_norm_rope_torch(q, weight_q, eps, cos, sin, heads, self.out_dtype),
                    qk_norm_rope_torch(k, weight_k, eps, cos, sin, heads, self.out_dtype))
        return self.op(q, k, weight_q, weight_k, float(eps), cos, sin, int(heads))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def check_request(fast_rope: bool, device=None, compile: bool = False) -> None:
    """The cheap checks of --fused_qk_rope (no triton import): ValueError without the fast RoPE or with torch.compile,
    and (with a `device`) BackendUnavailableError off CUDA; each one line naming the fix."""
    if not fast_rope:
        raise ValueError("--fused_qk_rope applies the fast RoPE's cos/sin tables: add --fast_rope (or --fast)")
    if compile:  # measured on an H100 (torch 2.11): InductorError building the block around the kernel
        raise ValueError("--fused_qk_rope does not compile yet: torch.compile (inductor, torch 2.11) fails to build "
                         "the DiT block around its Triton kernel; add --compile false, or leave it off")
    if device is not None and torch.device(device).type != "cuda":
        raise BackendUnavailableError(f"--fused_qk_rope is a Triton kernel for CUDA GPUs and cannot run on {device}; "
                                      "leave it off")


def resolve_qk_rope(device) -> FusedQKRope:
    """The triton form for `device`, probed once; BackendUnavailableError (one line) where it cannot run. No
    fallback to the torch form: that one is for tests."""
    device = torch.device(device)
    check_request(True, device)
    if not triton_available():
        raise BackendUnavailableError("--fused_qk_rope needs triton, which does not import here (pip install "
                                      "triton, or a CUDA build of torch that ships it); leave it off")
    return _probed(str(device))


@functools.lru_cache(maxsize=None)
def _probed(device: str) -> FusedQKRope:
    fused = FusedQKRope("triton")
    x = torch.randn(1, 4, 2 * 128, device=device, dtype=torch.bfloat16)
    table = (torch.ones(1, 4, 1, 64, device=device), torch.zeros(1, 4, 1, 64, device=device))
    try:
        fused(x, x, x[0, 0], x[0, 0], 1e-6, table, 2)
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailableError(f"--fused_qk_rope cannot run on {device}: {str(exc).splitlines()[0]}; "
                                      "leave it off") from exc
    return fused


def _triton_op():
    """The op `wan::qk_norm_rope` (qk_rope_triton.py: importing it imports triton and registers the op, once)."""
    from .qk_rope_triton import qk_norm_rope

    return qk_norm_rope
