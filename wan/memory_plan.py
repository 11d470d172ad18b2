"""Which placement fits a GPU memory budget: an estimate of each placement's peak from the weights' sizes and costs
measured on one H200, checked before anything loads.

Measured (benchmarks/results/): the compiled `--fast` forward holds about 84 KB of activations per token and per
batch sample (720p: (69.8 - 57.2) GB / (2 x 75,600 tokens); 480p: (62.7 - 57.2) GB / (2 x 32,760)); the VAE decode
peaks at about 300 bytes per output pixel and frame in fp32 and 150 in bf16 (22.3 / 11.2 GB at 1280 x 720 x 81).
The eager original path needs more activations than this (its per-token time embedding alone is 9.3 GB at 720p), so
plans are for `--fast`-style runs; the process is capped at the budget, so a wrong estimate fails loudly (exit 3)
instead of using more.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import MemoryPlanError

ACTIVATION_BYTES_PER_TOKEN = 84e3
VAE_BYTES_PER_PIXEL = {"fp32": 300.0, "bf16": 150.0}
HEADROOM = 1.05  # allocator fragmentation on top of the estimate


def dit_bytes(arch, bytes_per_param: int) -> tuple[float, float]:
    """(bytes of one block, bytes outside the blocks) of one expert."""
    d, f = arch.dim, arch.ffn_dim
    block = 4 * (d * d + d) * 2 + 2 * d * 2 + 2 * d + 6 * d + (f * d + f) + (d * f + d)  # attn x2, norms, mod, ffn
    patch = arch.in_dim * 4 * d + d
    rest = patch + (arch.text_dim * d + d) + (d * d + d) + (arch.freq_dim * d + d) + (d * d + d) + (d * 6 * d + 6 * d)
    rest += 64 * d + 64 + 2 * d
    return block * bytes_per_param, rest * bytes_per_param


@dataclass(frozen=True)
class MemoryPlan:
    placement: str  # "resident", "offload" (the reference's expert swap) or "stream"
    peak_gb: float
    phases: dict  # phase -> GB: text encoding, denoising, decoding

    def describe(self) -> str:
        return (f"{self.placement}, expected peak {self.peak_gb:.1f} GB ("
                + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()) + ")")


def estimate(placement: str, arch, tokens: int, batch: int, pixels: int, bytes_per_param: int, vae_dtype: str,
             t5_bytes: float, t5_cpu: bool, slots: int = 2) -> MemoryPlan:
    """Peak GB of each phase of one generation for `placement`."""
    block, rest = dit_bytes(arch, bytes_per_param)
    expert = block * arch.num_layers + rest
    act = ACTIVATION_BYTES_PER_TOKEN * tokens * batch
    vae = VAE_BYTES_PER_PIXEL[vae_dtype] * pixels
    t5 = 0.0 if t5_cpu else t5_bytes
    if placement == "resident":
        base = 2 * expert
        phases = {"text": base + t5, "denoise": base + act, "decode": base + vae}
    elif placement == "offload":  # experts move down before the decode; T5 encodes alone
        phases = {"text": t5, "denoise": expert + act, "decode": vae}
    elif placement == "stream":
        base = 2 * rest + slots * block
        phases = {"text": base + t5, "denoise": base + act, "decode": base + vae}
    else:
        raise ValueError(f"unknown placement {placement!r}")
    phases = {k: v * HEADROOM / 1e9 for k, v in phases.items()}
    return MemoryPlan(placement, max(phases.values()), phases)


def choose(budget_gb: float, **kw) -> MemoryPlan:
    """The fastest placement that fits `budget_gb`: resident, then expert offload, then block streaming. Raises
    MemoryPlanError (a ValueError, one line) with the smallest budget that would fit."""
    plans = [estimate(p, **kw) for p in ("resident", "offload", "stream")]
    for plan in plans:
        if plan.peak_gb <= budget_gb:
            return plan
    smallest = min(plans, key=lambda p: p.peak_gb)
    hint = "" if kw.get("t5_cpu") else ", or --t5_cpu"
    if kw.get("vae_dtype") == "fp32":
        hint += ", or --vae_dtype bf16"
    raise MemoryPlanError(f"--max_gpu_memory {budget_gb:g} GB is too small for this run even with block streaming "
                     f"(expected {smallest.describe()}); allow at least {smallest.peak_gb:.1f} GB{hint}, or a smaller "
                     "--size / --frame_num")
