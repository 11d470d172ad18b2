"""Seeded, non-degenerate random weights for tests, the tiny model and GPU benchmarks.

The reference zero-initialises the output head (and every Linear bias), so a freshly built model outputs zeros and
any comparison passes. These weights are all non-zero, scaled so activations stay O(1) through many layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int = 0, residual_scale: float = 1.0) -> nn.Module:
    """Re-draw every parameter in place (works on any device, including after `to_empty`).

    Matrices ~ N(0, 1/fan_in); biases ~ N(0, 0.02); norm weights ~ 1 + N(0, 0.1); modulation tables ~ N(0, 1/sqrt(d)).
    `residual_scale` shrinks the output projections of residual branches so deep stacks stay stable.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        # draw on CPU from one seeded stream (device-independent values), then copy
        if p.dim() >= 2 and "modulation" not in name:
            fan_in = p[0].numel()
            std = fan_in ** -0.5
            if name.endswith((".o.weight", "ffn.2.weight")):
                std *= residual_scale
            vals = torch.randn(p.shape, generator=gen) * std
        elif "modulation" in name:
            vals = torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
        elif name.endswith("bias"):
            vals = torch.randn(p.shape, generator=gen) * 0.02
        else:  # norm weights
            vals = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        p.copy_(vals.to(p.dtype))
    return model


@torch.no_grad()
def randomize_weights_on_device_(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same distributions drawn on the parameters' device (14B models on a GPU: seconds, not minutes).

    Each tensor is drawn in fp32 and then cast, so bf16 and fp32 copies of a model hold the same values.
    """
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        tmp = torch.empty(p.shape, device=dev, dtype=torch.float32)
        if p.dim() >= 2 and "modulation" not in name:
            tmp.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        elif "modulation" in name:
            tmp.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
        elif name.endswith("bias"):
            tmp.normal_(0.0, 0.02, generator=gen)
        else:  # norm weights
            tmp.normal_(1.0, 0.1, generator=gen)
        p.copy_(tmp)
        del tmp
    return model
