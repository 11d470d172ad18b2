"""CFG parallelism: the conditional and the unconditional pass run on the two halves of the world at once.

cfg rank 0 (with its SP group) computes the conditional prediction, cfg rank 1 the unconditional one, each as a
batch-1 forward. One collective per step (an all-gather of the [C, F, H, W] prediction within the cfg group of two)
gives both to every rank, and every rank forms uncond + g * (cond - uncond) from the same bytes, so the latents of
all ranks stay identical.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["cfg_parallel_prediction"]


def cfg_parallel_prediction(model, latent: torch.Tensor, t: torch.Tensor, context: list, context_null: list,
                            seq_len: int, g: float, cfg_group, cfg_rank: int, y: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """uncond + g * (cond - uncond) with cond on cfg rank 0 and uncond on cfg rank 1; the same on every rank. `y`
    (I2V): the condition both passes get."""
    ways = dist.get_world_size(cfg_group)
    if ways != 2 or dist.get_rank(cfg_group) != cfg_rank:
        raise ValueError(f"CFG parallel needs a cfg group of 2 ranks with cfg_rank = the rank in it; got {ways} ranks, "
                         f"cfg_rank {cfg_rank}, rank in group {dist.get_rank(cfg_group)}")
    pred = model([latent], t=t, context=context if cfg_rank == 0 else context_null, seq_len=seq_len,
                 y=None if y is None else [y])[0]
    pred = pred.contiguous()
    both = pred.new_empty((2 * pred.size(0),) + tuple(pred.shape[1:]))  # [cond; uncond] along dim 0, by cfg rank
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(both, pred, group=cfg_group)
    cond, uncond = both.view(2, *pred.shape).unbind(0)
    return uncond + g * (cond - uncond)
