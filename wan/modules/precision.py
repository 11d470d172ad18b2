"""The reference's fp32 autocast regions, in one place (DiT modulation / residual / head, the fp32 VAE)."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def fp32_region(device_type: str):
    """`autocast(dtype=float32)` on CUDA, as the reference. CPU autocast has no fp32 mode: there, any outer autocast
    is switched off instead (which computes the same fp32 math)."""
    if device_type == "cuda":
        return torch.autocast("cuda", dtype=torch.float32)
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def no_autocast(device_type: str):
    """Compute in the tensors' own dtype (a bf16 VAE): any outer autocast off."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()
