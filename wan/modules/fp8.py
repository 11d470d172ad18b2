"""fp8 (e4m3) weights and the fp8 linear: an opt-in approximation for the DiT blocks' linears (`--fp8_linear`).

What `Fp8Linear` computes (the GPU kernel and the emulated one alike), x [M, K] -> y [M, N]:
- weight W [N, K], quantised once at load, per output channel: s_w[n] = amax|W[n, :]| / 448, W8 = e4m3(W / s_w);
- activation, per call and per token (row): s_x[m] = amax|x[m, :]| / 448, x8 = e4m3(x / s_x), from x in fp32;
- y = bf16(fp32(x8 @ W8^T) * s_x * s_w + bias): fp32 accumulation, scales and bias in fp32 in the GEMM's epilogue, one
  rounding to bf16. The bias is stored in bf16 (the bf16 nn.Linear under autocast casts it the same way) and added in
  fp32 before that single rounding: fused into `torch._scaled_mm` (no extra pass over y), the same arithmetic as
  cuBLAS's bias epilogue of the bf16 linear it replaces.
e4m3 keeps 3 mantissa bits: every value in the normal range (|v| / s >= 2^-6) is off by at most 2^-4 relative; about
4e-2 relative error per linear on random weights (tests/test_fp8.py). A scale is never 0 or inf: an all-zero row gets
the smallest normal fp32 scale (and quantises to zeros), a non-finite weight is refused.

Kernels (chosen once per module, never automatically):
- "scaled_mm": `torch._scaled_mm` with row-wise scales, on CUDA with fp8 tensor cores (compute capability 8.9+).
  torchao's float8 inference path ends in this same call; torchao is not a dependency here (and not installed on the
  GPU machine), and calling it directly keeps the compiled block graph free of tensor subclasses.
- "emulated": the same quantised operands multiplied in fp32 on any device: what the GPU kernel computes up to fp32
  summation order. For tests on the CPU; it returns fp32 holding the bf16-rounded values, because the CPU DiT is
  fp32 (its attention needs q, k and v of one dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["FP8_LINEAR", "KERNELS", "Fp8Linear", "Fp8Summary", "Fp8UnavailableError", "check_fp8_support",
           "convert_linears_to_fp8_", "dequantize", "quantize", "quantize_weight"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_SCALE = torch.finfo(torch.float32).tiny  # the scale of an all-zero row: never 0 (0/0) and never subnormal
FAST_ACCUM = False  # Hopper's fast fp8 accumulation skips the periodic fp32 promotion: less accurate at K = 13824
KERNELS = ("scaled_mm", "emulated")

# --fp8_linear choices: which linears of each DiT block become Fp8Linear. Never converted: the cross-attention k / v
# (they run on the 512 text rows only: little work, and the text is every token's condition), the embeddings, the
# time projection and the head.
_FFN = ("ffn.0", "ffn.2")
_ATTN_PROJ = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o")
TARGETS = {"none": (), "ffn": _FFN, "attn_proj": _ATTN_PROJ, "all": _ATTN_PROJ + _FFN}
FP8_LINEAR = tuple(TARGETS)


class Fp8UnavailableError(RuntimeError):
    """fp8 was asked for where it cannot run (no silent bf16 fallback)."""


def fp8_problem(device) -> str | None:
    """Why fp8 GEMMs cannot run on `device`, or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"this run is on the {device.type.upper()}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    return None


def check_fp8_support(device, what: str = "--fp8_linear") -> None:
    """One-line Fp8UnavailableError unless `device` has fp8 tensor cores."""
    problem = fp8_problem(device)
    if problem:
        raise Fp8UnavailableError(
            f"{what} needs fp8 tensor cores (an NVIDIA GPU of compute capability 8.9 or newer: Ada, Hopper) and "
            f"{problem}; drop {what} (the bf16 default is the exact path) or run on such a GPU")


# ---- quantisation --------------------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scales) with one scale per slice along `dim` (reduced, kept as size 1): x ~ values * scale.
    Computed in fp32; round to nearest even; clamped to +-448 first (an fp32 division may land just above it)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=dim, keepdim=True) / E4M3_MAX).clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (e4m3 [out, in], fp32 [out]): one scale per output channel. Refuses non-finite weights."""
    w8, scale = quantize(w, dim=1)
    if not torch.isfinite(scale).all():
        rows = torch.nonzero(~torch.isfinite(scale.squeeze(1))).flatten().tolist()
        raise ValueError(f"cannot quantise a weight with non-finite values (rows {rows[:4]}) to fp8")
    return w8, scale.squeeze(1).contiguous()


# ---- the two kernels: (x8 [M, K], s_x [M, 1], W8 [N, K], s_w [N], bias [N] bf16 | None) -> y [M, N] ---------------
def _scaled_mm_kernel(x8, sx, w8, sw, bias):
    if not x8.is_cuda:
        raise Fp8UnavailableError(f"Fp8Linear's scaled_mm kernel runs on CUDA only, got an input on the "
                                  f"{x8.device.type.upper()}; keep fp8 linears off there (kernel 'emulated' is "
                                  "for tests)")
    # a: [M, K] row-major; b = W8^T: [K, N] column-major (a view of the row-major weight); scale_a [M, 1] and
    # scale_b [1, N] fp32 contiguous; K and N multiples of 16 (checked at build). M may be anything.
    return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw.view(1, -1), bias=bias, out_dtype=torch.bfloat16,
                            use_fast_accum=FAST_ACCUM)


def _emulated_kernel(x8, sx, w8, sw, bias):
    acc = x8.float() @ w8.float().t()  # e4m3 x e4m3 products are exact in fp32; fp32 sums
    y = acc * sx * sw.view(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16).float()  # the GPU kernel's bf16 values, held in fp32 (see the module docstring)


_KERNEL_FNS = {"scaled_mm": _scaled_mm_kernel, "emulated": _emulated_kernel}


class Fp8Linear(nn.Module):
    """A linear with e4m3 weights: `weight` [out, in] float8_e4m3fn, `weight_scale` [out] fp32 and `bias` [out] bf16,
    all nn.Parameters with requires_grad False (so `parameters()`, block streaming and placements move them).
    Input [..., in] of any float dtype (leading dims flattened into tokens), output [..., out] bf16."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str = "scaled_mm",
                 device=None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"Fp8Linear kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if in_features % 16 or out_features % 16:
            raise ValueError(f"fp8 linears need in and out features divisible by 16 (torch._scaled_mm), got "
                             f"{in_features} -> {out_features}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device).to(E4M3),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.bfloat16, device=device),
                                 requires_grad=False) if bias else None
        self._mm = _KERNEL_FNS[kernel]  # chosen once

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, kernel: str = "scaled_mm", compute_device=None) -> "Fp8Linear":
        """Quantise `linear` (any float dtype) on `compute_device` (default: where its weight is); the new module's
        tensors live where the old ones did."""
        w = linear.weight.detach()
        where = w.device
        w8, sw = quantize_weight(w.to(compute_device or where))
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel, device="meta")
        new.weight = nn.Parameter(w8.to(where), requires_grad=False)
        new.weight_scale = nn.Parameter(sw.to(where), requires_grad=False)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x8, sx = quantize(x.reshape(-1, self.in_features), dim=1)  # [M, K] e4m3, [M, 1] fp32: per-token scales
        return self._mm(x8, sx, self.weight, self.weight_scale, self.bias).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3f} MB"


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass(frozen=True)
class Fp8Summary:
    which: str
    kernel: str
    linears: int  # converted
    bytes_before: int  # of the converted linears' parameters
    bytes_after: int
    from_file: int = 0  # linears whose e4m3 weights and per-tensor scale came from an fp8_scaled file as stored

    def describe(self) -> str:
        if not self.linears and not self.from_file:
            return "off"
        kept = f"; {self.from_file} more kept as stored in the fp8_scaled file (per-tensor scale)" \
            if self.from_file else ""
        return (f"{self.which} ({self.kernel}): {self.linears} linears in e4m3, their weights "
                f"{_size(self.bytes_before)} -> {_size(self.bytes_after)}{kept}")


@torch.no_grad()
def convert_linears_to_fp8_(model: nn.Module, which: str, kernel: str = "scaled_mm", device=None) -> Fp8Summary:
    """Replace the `which` linears (TARGETS) of every `model.blocks[i]` by Fp8Linear, in place (those already
    Fp8Linear, kept from an fp8_scaled file by the loader, are counted in `from_file`). `device` is where the
    model will run (default: where its parameters are; the quantisation runs there when it is a GPU, so a model
    loaded into host memory for offloading converts at GPU speed). kernel "scaled_mm" refuses where fp8 cannot run."""
    if which not in TARGETS:
        raise ValueError(f"fp8_linear must be one of {', '.join(FP8_LINEAR)}, got {which!r}")
    if kernel not in KERNELS:
        raise ValueError(f"fp8 kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if which == "none":
        return Fp8Summary(which, kernel, 0, 0, 0)
    run_on = torch.device(device) if device is not None else next(model.parameters()).device
    if kernel == "scaled_mm":
        check_fp8_support(run_on)
    compute = run_on if run_on.type == "cuda" else None
    count = before = after = kept = 0
    for block in model.blocks:
        for path in TARGETS[which]:
            parent_name, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            old = getattr(parent, name)
            if isinstance(old, Fp8Linear) and getattr(old, "from_file", False) and old.kernel == kernel:  # loader
                kept += 1
                continue
            if type(old) is not nn.Linear:
                raise TypeError(f"blocks.*.{path} is {type(old).__name__}, not nn.Linear (converted twice?)")
            new = Fp8Linear.from_linear(old, kernel, compute_device=compute)
            setattr(parent, name, new)
            count, before, after = count + 1, before + _nbytes(old), after + _nbytes(new)
    return Fp8Summary(which, kernel, count, before, after, kept)
