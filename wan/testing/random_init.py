"""One rule for realistic random weights, used for the DiT, T5 and the VAE alike (tiny models and full-size
benchmarks): never zeros, never tiny, so activations stay O(1) through many layers and timing runs on real data.

The reference zero-initialises the output head and every Linear bias: a freshly built model outputs zeros and any
equivalence test on it passes without testing anything.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def init_stats(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) for the parameter `name` of `shape`:
    norm weights (RMS/LayerNorm weights, VAE gammas) 1 + N(0, 0.1); modulation tables N(0, 1/sqrt(d));
    biases N(0, 0.02); matrices and conv kernels N(0, 1/fan_in) (embeddings included); other vectors 1 + N(0, 0.1)."""
    leaf = name.rsplit(".", 1)[-1]
    if "modulation" in name:
        return 0.0, shape[-1] ** -0.5
    if leaf == "gamma" or (len(shape) == 1 and "norm" in name and leaf == "weight"):
        return 1.0, 0.1
    if leaf == "bias":
        return 0.0, 0.02
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return 0.0, fan_in ** -0.5
    return 1.0, 0.1


def random_tensor(name: str, shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """One fp32 tensor drawn by `init_stats` from `generator` (on the generator's device)."""
    mean, std = init_stats(name, tuple(shape))
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device or generator.device)
    return out.normal_(mean, std, generator=generator)


@torch.no_grad()
def randomize_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter in place from one seeded CPU stream (values independent of the device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(random_tensor(name, p.shape, gen).to(p.dtype))
    return model


@torch.no_grad()
def randomize_weights_on_device_(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same rule drawn on the parameters' device (14B models on a GPU: seconds, not minutes). Each tensor is
    drawn in fp32 and then cast, so bf16 and fp32 copies of a model hold the same values."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(random_tensor(name, p.shape, gen))
    return model


@torch.no_grad()
def materialize_random_(model: nn.Module, device, dtype: torch.dtype, seed: int = 0,
                        rebuilt_buffers: tuple[str, ...] = ()) -> nn.Module:
    """A model built on the meta device -> `dtype` storage on `device`, drawn by `randomize_weights_on_device_`.

    The cast happens on meta (free), so the device holds the `dtype` model plus one fp32 tensor being drawn: a bf16
    A14B expert (28.6 GB) builds on an 80 GB card, where materialising it in fp32 first (57 GB) and casting (+28.6)
    does not. Same values as drawing the fp32 model and casting it. Buffers are not drawn and `to_empty` leaves
    them uninitialised: refused unless their names start with one of `rebuilt_buffers` (the caller rebuilds them)."""
    buffers = [name for name, _ in model.named_buffers() if not any(name.startswith(p) for p in rebuilt_buffers)]
    if buffers:
        raise ValueError(f"materialize_random_ leaves buffers uninitialised: {buffers[:3]}")
    return randomize_weights_on_device_(model.to(dtype).to_empty(device=device), seed)
