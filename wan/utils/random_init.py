"""Seeded, non-degenerate random weights for tests, the tiny model and GPU benchmarks.

The reference zero-initialises the output head (and every Linear bias), so a freshly built model outputs zeros and
any comparison passes. These weights are all non-zero, scaled so activations stay O(1) through many layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _distribution(name: str, p: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of a parameter: matrices N(0, 1/fan_in); modulation tables N(0, 1/sqrt(d));
    biases N(0, 0.02); norm weights 1 + N(0, 0.1)."""
    if "modulation" in name:
        return 0.0, p.shape[-1] ** -0.5
    if p.dim() >= 2:
        return 0.0, p[0].numel() ** -0.5
    if name.endswith("bias"):
        return 0.0, 0.02
    return 1.0, 0.1


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter in place from one seeded CPU stream (values independent of the device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        mean, std = _distribution(name, p)
        vals = torch.randn(p.shape, generator=gen) * std
        p.copy_((vals + mean if mean else vals).to(p.dtype))
    return model


@torch.no_grad()
def randomize_weights_on_device_(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same distributions drawn on the parameters' device (14B models on a GPU: seconds, not minutes).

    Each tensor is drawn in fp32 and then cast, so bf16 and fp32 copies of a model hold the same values.
    """
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        mean, std = _distribution(name, p)
        p.copy_(torch.empty(p.shape, device=dev, dtype=torch.float32).normal_(mean, std, generator=gen))
    return model
