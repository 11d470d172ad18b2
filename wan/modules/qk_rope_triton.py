"""The Triton kernel of `wan.modules.qk_rope` (the math and its rounding are described there), registered as the op
`wan::qk_norm_rope`. Imported only when the triton form is built: importing this module imports triton. Set
TRITON_INTERPRET=1 before importing it to run the kernel on CPU tensors (tests).
"""
import torch
import triton
import triton.language as tl

__all__ = ["qk_norm_rope"]

OP_NAME = "wan::qk_norm_rope"


@triton.jit
def _round_bf16(v):
    """fp32 v -> the nearest bf16 value (ties to even), kept in fp32. By bit arithmetic: exact on the GPU and also
    under the interpreter, whose fp32 -> bf16 cast truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN stays NaN


@triton.jit
def _round_like(v, like):
    """fp32 v rounded to like's dtype (bf16, fp16 or fp32), kept in fp32."""
    r = v
    if like.dtype == tl.bfloat16:
        r = _round_bf16(v)
    elif like.dtype == tl.float16:
        r = v.to(tl.float16).to(tl.float32)
    return r


@triton.jit
def _row(x_row, w_ptr, cos_row, sin_row, out_row, eps, DIM: tl.constexpr, HALF_D: tl.constexpr,
         BLOCK: tl.constexpr, ROUND_PROD: tl.constexpr):
    # one token row of q or k: DIM (= H * D) values; pair i = (2i, 2i+1) is rotated by the angle of pair i % HALF_D
    offs = tl.arange(0, BLOCK)
    mask = offs < DIM
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=0) * (1.0 / DIM)  # mean over the full width, as PyTorch's: the sum times 1/N
    n = _round_like(xf * tl.math.rsqrt(ms + eps), x)  # type_as(x)
    y = n * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ROUND_PROD:  # x and the weight of one half dtype: PyTorch rounds the product to it
        y = _round_like(y, x)
    y0, y1 = tl.split(tl.reshape(y, (BLOCK // 2, 2)))  # even / odd channels, [BLOCK/2] each
    pair = tl.arange(0, BLOCK // 2)
    pm = pair < DIM // 2
    c = tl.load(cos_row + pair % HALF_D, mask=pm, other=1.0)
    s = tl.load(sin_row + pair % HALF_D, mask=pm, other=0.0)
    o = tl.interleave(y0 * c - y1 * s, y0 * s + y1 * c)
    tl.store(out_row + offs, _round_bf16(o).to(tl.bfloat16), mask=mask)  # an exact cast


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, oq_ptr, ok_ptr, L, sqb, sql, skb, skl,
                         scb, scl, ssb, ssl, eps, DIM: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr,
                         ROUND_Q: tl.constexpr, ROUND_K: tl.constexpr):
    # grid (B * L, 2): axis 0 the token row b * L + t (outputs contiguous [B, L, H, D]), axis 1 q (0) or k (1)
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    t = row % L
    cos_row = cos_ptr + b * scb + t * scl
    sin_row = sin_ptr + b * ssb + t * ssl
    if tl.program_id(1) == 0:
        _row(q_ptr + b * sqb + t * sql, wq_ptr, cos_row, sin_row, oq_ptr + row * DIM, eps, DIM, HALF_D, BLOCK,
             ROUND_Q)
    else:
        _row(k_ptr + b * skb + t * skl, wk_ptr, cos_row, sin_row, ok_ptr + row * DIM, eps, DIM, HALF_D, BLOCK,
             ROUND_K)


if hasattr(torch.library, "wrap_triton"):
    from torch.library import wrap_triton
else:  # older torch: the kernel is launched directly inside an opaque custom_op
    def wrap_triton(kernel):
        return kernel


def _round_prod(x: torch.Tensor, w: torch.Tensor) -> bool:
    return torch.promote_types(x.dtype, w.dtype) != torch.float32


def _qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, L, d]; weights [d]; cos, sin [B|1, L, 1, D/2] fp32 -> bf16 (q, k), each [B, L, H, D]."""
    bsz, seq, dim = q.shape
    half = dim // heads // 2
    if k.shape != q.shape or dim % (2 * heads) or cos.shape[-1] != half or cos.shape[1] != seq:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)}, k {tuple(k.shape)}, {heads} heads and the RoPE table "
                         f"{tuple(cos.shape)} do not fit together")
    if cos.size(0) not in (1, bsz) or sin.shape != cos.shape:
        raise ValueError(f"qk_norm_rope: RoPE tables {tuple(cos.shape)} / {tuple(sin.shape)} for batch {bsz}")
    q, k, cos, sin = (u if u.stride(-1) == 1 else u.contiguous() for u in (q, k, cos, sin))
    weight_q, weight_k = weight_q.contiguous(), weight_k.contiguous()
    out_q = torch.empty(bsz, seq, heads, dim // heads, device=q.device, dtype=torch.bfloat16)
    out_k = torch.empty_like(out_q)
    block = triton.next_power_of_2(dim)
    scb, ssb = (0, 0) if cos.size(0) == 1 else (cos.stride(0), sin.stride(0))  # a batch-broadcast table
    wrap_triton(_qk_norm_rope_kernel)[(bsz * seq, 2)](
        q, k, weight_q, weight_k, cos, sin, out_q, out_k, seq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        scb, cos.stride(1), ssb, sin.stride(1), eps, DIM=dim, HALF_D=half, BLOCK=block,
        ROUND_Q=_round_prod(q, weight_q), ROUND_K=_round_prod(k, weight_k), num_warps=8 if block >= 4096 else 4)
    return out_q, out_k


if hasattr(torch.library, "triton_op"):  # torch.compile sees into the kernel
    qk_norm_rope = torch.library.triton_op(OP_NAME, _qk_norm_rope, mutates_args=())
else:  # an opaque op with a fake for torch.compile
    qk_norm_rope = torch.library.custom_op(OP_NAME, _qk_norm_rope, mutates_args=())

    @qk_norm_rope.register_fake
    def _(q, k, weight_q, weight_k, eps, cos, sin, heads):
        shape = (*q.shape[:2], heads, q.size(2) // heads)
        return q.new_empty(shape, dtype=torch.bfloat16), q.new_empty(shape, dtype=torch.bfloat16)
