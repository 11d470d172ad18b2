"""The one attention entry point of the DiT, with its backend chosen once at load time.

Layout follows the reference's `flash_attention`: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].
`k_lens` (host ints, one per sample) limits each sample's keys to its first k_lens[i] rows, exactly like the
reference's varlen call with `k_lens`; queries are never masked (padded queries still get outputs).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger("wan")

BACKENDS = ("auto", "flash3", "flash2", "cudnn", "flash", "efficient", "math", "sdpa")


class BackendUnavailableError(RuntimeError):
    """A requested attention backend cannot run here (never silently replaced by another)."""


@dataclass(frozen=True)
class AttentionBackend:
    """A resolved backend: `kernel(q, k, v)` on [B, L, H, D] half-precision tensors."""

    name: str  # what actually runs, e.g. "flash3 (fa3_fwd_interface)" or "cudnn"
    kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, q, k, v, k_lens: Sequence[int] | None = None) -> torch.Tensor:
        out_dtype = q.dtype
        if q.is_cuda:
            # As the reference: non-half inputs go to bf16, then q and k follow v's dtype. On CPU (tests)
            # the inputs keep their dtype so fp32 math can be checked against a float64 re-computation.
            q, k, v = (u if u.dtype in (torch.float16, torch.bfloat16) else u.to(torch.bfloat16) for u in (q, k, v))
            q, k = q.to(v.dtype), k.to(v.dtype)
        lk = k.size(1)
        if k_lens is None or all(n == lk for n in k_lens):
            out = self.kernel(q, k, v)
        else:
            # Varlen keys: each sample attends to its own real keys only (what cu_seqlens_k does).
            out = torch.cat([self.kernel(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n])
                             for i, n in enumerate(k_lens)])
        return out.to(out_dtype)


def _sdpa_kernel(backend):
    """SDPA on [B, L, H, D] (transposed views). `backend` None: torch's dispatch; "math": pinned math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)

    return run


def _aten_kernel(name):
    """One fused GPU kernel called directly (no per-call dispatch; compiles cleanly): cudnn, flash or efficient."""
    aten = torch.ops.aten

    def run(q, k, v):
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        if name == "cudnn":
            out = aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]
        elif name == "flash":
            out = aten._scaled_dot_product_flash_attention(q, k, v)[0]
        else:
            out = aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]
        return out.transpose(1, 2)

    return run


def _import_flash3():
    """Official FA3 (`flash_attn_interface`) first, then the PyPI forward-only build `fa3_fwd_interface`."""
    for module in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - any import failure means "not usable"
            continue
        return module, mod.flash_attn_func
    return None, None


def _flash3_kernel(fn):
    def run(q, k, v):
        out = fn(q, k, v)
        # Newer FA3 builds return a tensor, older ones (out, lse): the reference's `[0]` bug (Wan2.2 #38).
        return out[0] if isinstance(out, (tuple, list)) else out

    return run


def _import_flash2():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001
        return None
    return flash_attn_func


def resolve_attention(requested: str, device: torch.device) -> AttentionBackend:
    """Pick the backend once. `auto`: FA3 on Hopper, else cuDNN SDPA on Hopper, else FA2, else SDPA default."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    hopper = on_cuda and torch.cuda.get_device_capability(device)[0] == 9

    if requested == "auto":
        if not on_cuda:
            requested = "sdpa"
        elif hopper and _import_flash3()[0] is not None:
            requested = "flash3"
        elif hopper:
            requested = "cudnn"
        elif _import_flash2() is not None:
            requested = "flash2"
        else:
            requested = "sdpa"

    if requested == "flash3":
        module, fn = _import_flash3()
        if fn is None:
            raise BackendUnavailableError(
                "attention backend flash3 requested but neither flash_attn_interface nor fa3_fwd_interface imports; "
                "pip install fa3-fwd (Hopper) or choose --attn_backend cudnn")
        if not on_cuda:
            raise BackendUnavailableError("attention backend flash3 needs a CUDA device; "
                                          "use --attn_backend sdpa on CPU")
        backend = AttentionBackend(f"flash3 ({module})", _flash3_kernel(fn))
    elif requested == "flash2":
        fn = _import_flash2()
        if fn is None:
            raise BackendUnavailableError("attention backend flash2 requested but flash_attn is not installed; "
                                          "pip install flash-attn or choose --attn_backend cudnn")
        if not on_cuda:
            raise BackendUnavailableError("attention backend flash2 needs a CUDA device; "
                                          "use --attn_backend sdpa on CPU")
        backend = AttentionBackend("flash2 (flash_attn)", fn)
    elif requested == "sdpa":
        backend = AttentionBackend("sdpa (torch default dispatch)", _sdpa_kernel(None))
    elif requested == "math":
        backend = AttentionBackend("math (sdpa)", _sdpa_kernel("math"))
    else:
        if not on_cuda:
            raise BackendUnavailableError(f"attention backend {requested} needs a CUDA device; "
                                          "use --attn_backend sdpa on CPU")
        backend = AttentionBackend(f"{requested} (sdpa)", _aten_kernel(requested))
    _probe(backend, device)
    log.info("attention backend: %s", backend.name)
    return backend


def _probe(backend: AttentionBackend, device: torch.device) -> None:
    """Run the kernel once on a small input so an unusable backend fails at load, not mid-generation."""
    q = torch.randn(1, 64, 2, 128, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        backend.kernel(q, q, q)
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailableError(f"attention backend {backend.name} cannot run on {device}: "
                                      f"{str(exc).splitlines()[0]}; choose another --attn_backend") from exc


# What a bare WanModel uses until the pipeline configures it: SDPA with torch's default dispatch.
DEFAULT_ATTENTION = AttentionBackend("sdpa (torch default dispatch)", _sdpa_kernel(None))
