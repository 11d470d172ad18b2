"""Random LoRA files in the Wan2.2-Lightning layout (for tests and benchmarks): every adapted linear of every block
(self/cross-attention q k v o, ffn.0, ffn.2: 10 per block), `lora_down` / `lora_up` / `alpha` keys, non-zero."""
from __future__ import annotations

from pathlib import Path

import torch

LIGHTNING_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                     "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def random_lora_state_dict(config, rank: int = 64, alpha: float = 8.0, seed: int = 0,
                           prefix: str = "diffusion_model.", dtype: torch.dtype = torch.float32) -> dict:
    """down [rank, in] ~ N(0, 1/in), up [out, rank] ~ N(0, 1/rank): (alpha/rank) * up @ down is a fixed fraction
    (alpha/rank) of a fan-in-scaled weight, as a trained LoRA's update is a small fraction of the weight."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"ffn.0": (config.ffn_dim, config.dim), "ffn.2": (config.dim, config.ffn_dim)}
    sd = {}
    for n in range(config.num_layers):
        for target in LIGHTNING_TARGETS:
            out_f, in_f = shapes.get(target, (config.dim, config.dim))
            base = f"{prefix}blocks.{n}.{target}"
            sd[f"{base}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * in_f ** -0.5).to(dtype)
            sd[f"{base}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * rank ** -0.5).to(dtype)
            sd[f"{base}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def write_random_lora_dir(folder, config, rank: int = 64, seed: int = 0, **kw) -> Path:
    """A Lightning-layout folder: high_noise_model.safetensors and low_noise_model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("high_noise_model", "low_noise_model")):
        save_file(random_lora_state_dict(config, rank, seed=seed + i, **kw), folder / f"{name}.safetensors")
    return folder
