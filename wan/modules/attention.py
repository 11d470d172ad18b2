"""The one attention entry point of the DiT, with its backend chosen once at load time.

Layout follows the reference's `flash_attention`: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].
`k_lens` (host ints, one per sample) limits each sample's keys to its first k_lens[i] rows, exactly like the
reference's varlen call with `k_lens`; queries are never masked (padded queries still get outputs).

`flash3_fp8` is the one approximate backend (opt-in, never chosen by `auto`): FA3 on e4m3 q, k, v with one scale per
(batch, head), keys and values smoothed first; see `flash3_fp8_backend`.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .fp8 import dequantize, quantize

log = logging.getLogger("wan")

BACKENDS = ("auto", "flash3", "flash2", "cudnn", "flash", "efficient", "math", "sdpa", "flash3_fp8")
# flash3_fp8 runs fp8 only with at least this many keys; shorter calls run bf16 flash3. In this model that keeps the
# cross-attention (512 text keys) in bf16: its QK^T and PV are 512 / L of the self-attention's work (0.7% at 720p)
# while quantising q costs a full pass over q, so fp8 would not pay there, and the text conditions every token.
FP8_MIN_KEYS = 1024
# flash3_fp8 also removes V's mean over the keys (exact, see _flash3_fp8_kernel). Without it, fp8 attention had 14.5%
# prediction error at 480p (benchmarks/results/h200_480p_fp8_k_smoothing_only.json); with it 0.5% at 720p
# (h200_720p_fp8.json), at no measurable cost. K smoothing pays where keys share a large offset (gpu_fp8.json).
SMOOTH_V = True


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


def _minus_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, D] minus its mean over L, per (batch, head, channel), in fp32; and that mean [B, 1, H, D]."""
    xf = x.float()
    mean = xf.mean(dim=1, keepdim=True)
    return xf - mean, mean


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """k [B, Lk, H, D] minus its mean over the keys (fp32). Exact under softmax: q . mean is one constant per
    (query, head), added to every logit of that query. It removes the offset all keys share, so the per-head fp8
    scale spends its range on what differs between keys."""
    return _minus_mean(k)[0]


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H, D] -> (e4m3 [B, L, H, D], fp32 descale [B, H]): one amax scale per (batch, head), FA3's layout."""
    x8, scale = quantize(x, dim=(1, 3))  # scale [B, 1, H, 1]
    return x8, scale[:, 0, :, 0]


def _smoothing(smooth_k: bool, smooth_v: bool) -> str:
    return {(True, True): ", K and V smoothed", (True, False): ", K smoothed", (False, True): ", V smoothed"}.get(
        (smooth_k, smooth_v), "")


def _flash3_fp8_kernel(fn, smooth_k: bool, smooth_v: bool, min_keys: int, short_keys):
    def run(q, k, v):
        if k.size(1) < min_keys:  # the cross-attention: bf16 (see FP8_MIN_KEYS); a static shape under compile
            return short_keys(q, k, v)
        if smooth_k:
            k = smooth_keys(k)
        v_mean = None
        if smooth_v:  # exact too: each softmax row sums to 1, so P (V - mean) + mean = P V
            v, v_mean = _minus_mean(v)
        (q8, qd), (k8, kd), (v8, vd) = (quantize_per_head(u) for u in (q, k, v))
        # FA3 folds q_descale * k_descale into the softmax scale and v_descale into the output; bf16 out
        out = fn(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out if v_mean is None else (out.float() + v_mean).to(out.dtype)

    return run


def flash3_fp8_backend(device, smooth_k: bool = True, smooth_v: bool = SMOOTH_V,
                       min_keys: int = FP8_MIN_KEYS) -> AttentionBackend:
    """FA3's fp8 forward: q, k and v quantised to e4m3 per (batch, head) with amax scales passed as FA3's descale
    factors, output bf16; K (and V) first lose their mean over the keys (both exact, see above). Inside, FA3 also
    rounds the softmax P to e4m3 for P @ V. Under torch.compile the smoothing and quantisation compile into the block
    graph; the FA3 call is its one opaque op (a registered custom op, as for flash3). Hopper (sm90) only: FA3 builds
    its fp8 kernels for sm90."""
    device = torch.device(device)
    if device.type != "cuda":
        raise BackendUnavailableError("attention backend flash3_fp8 needs a Hopper GPU (FA3's fp8 kernels are sm90 "
                                      "only); use --attn_backend sdpa on the CPU")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        raise BackendUnavailableError(f"attention backend flash3_fp8 needs a Hopper GPU (FA3's fp8 kernels are sm90 "
                                      f"only), {torch.cuda.get_device_name(device)} is sm{major}{minor}; choose "
                                      "--attn_backend flash3, cudnn or auto")
    module, fn = _import_flash3()
    if fn is None:
        raise BackendUnavailableError("attention backend flash3_fp8 needs FA3 but neither flash_attn_interface nor "
                                      "fa3_fwd_interface imports; pip install fa3-fwd or choose --attn_backend cudnn")
    name = (f"flash3_fp8 ({module}; e4m3 q, k, v per batch and head{_smoothing(smooth_k, smooth_v)}; "
            f"under {min_keys} keys bf16 flash3)")
    backend = AttentionBackend(name, _flash3_fp8_kernel(fn, smooth_k, smooth_v, min_keys, _flash3_kernel(fn)))
    _probe(backend, device, keys=max(min_keys, 64))  # the fp8 path
    return backend


def fp8_attention_reference(q, k, v, smooth_k: bool = True, smooth_v: bool = SMOOTH_V) -> torch.Tensor:
    """flash3_fp8's math on any device, up to FA3's internal e4m3 rounding of P: q, k and v smoothed and quantised
    per (batch, head) exactly as the GPU path does, dequantised, then exact softmax attention in fp32. [B, L, H, D]."""
    if smooth_k:
        k = smooth_keys(k)
    v_mean = 0.0
    if smooth_v:
        v, v_mean = _minus_mean(v)
    q, k, v = (dequantize(x8, s[:, None, :, None]) for x8, s in (quantize_per_head(u) for u in (q, k, v)))
    return _sdpa_kernel("math")(q, k, v) + v_mean


def emulated_fp8_attention(smooth_k: bool = True, smooth_v: bool = SMOOTH_V,
                           min_keys: int = FP8_MIN_KEYS) -> AttentionBackend:
    """flash3_fp8 emulated (`fp8_attention_reference`; short key sets exact fp32): for tests and CPU smoke runs,
    selected explicitly, never by `resolve_attention`."""
    exact = _sdpa_kernel("math")

    def run(q, k, v):
        if k.size(1) < min_keys:
            return exact(q, k, v)
        return fp8_attention_reference(q, k, v, smooth_k, smooth_v).to(q.dtype)

    short = f"; under {min_keys} keys exact" if min_keys > 0 else ""
    return AttentionBackend(f"flash3_fp8 emulated (e4m3 q, k, v per batch and head{_smoothing(smooth_k, smooth_v)}"
                            f"{short})", run)


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

    if requested == "flash3_fp8":
        backend = flash3_fp8_backend(device)
        log.info("attention backend: %s", backend.name)
        return backend
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


def _probe(backend: AttentionBackend, device: torch.device, keys: int = 64) -> None:
    """Run the kernel once on a small input so an unusable backend fails at load, not mid-generation."""
    q = torch.randn(1, keys, 2, 128, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        backend.kernel(q, q, q)
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailableError(f"attention backend {backend.name} cannot run on {device}: "
                                      f"{str(exc).splitlines()[0]}; choose another --attn_backend") from exc


# What a bare WanModel uses until the pipeline configures it: SDPA with torch's default dispatch.
DEFAULT_ATTENTION = AttentionBackend("sdpa (torch default dispatch)", _sdpa_kernel(None))
