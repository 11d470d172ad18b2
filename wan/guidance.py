"""Classifier-free guidance strategies: how one denoising step turns the DiT into a noise prediction.

Each strategy is a callable `(model, latent, t, context, context_null, seq_len, g, y=None) -> prediction [C, F, H, W]`,
chosen once per expert before the step loop (`choose_guidance`), never by `if`s inside it. `y` (image-to-video): the
condition [C_y, F, H, W] the DiT joins to the latent, the same for the conditional and the unconditional pass.
- `TwoPasses`: the reference, a conditional and an unconditional batch-1 forward; uncond + g * (cond - uncond).
- `BatchedPass`: both in one batch-2 forward (per-sample varlen keys keep it exact).
- `CfgParallel`: cond on one half of the world, uncond on the other, one all-gather (multi-GPU).
- `CondOnly`: guidance 1, one conditional forward (uncond + 1 * (cond - uncond) = cond up to one rounding);
  the negative prompt is then not needed at all.
Each says which CFG branches its model calls carry on this rank (`branches`: one tuple per call, in call order, one
name per sample), which step caching (wan/step_cache.py) keys its per-branch state on.
"""
from __future__ import annotations

import torch

GUIDANCE_ONE_TOL = 1e-6  # |g - 1| below this is guidance 1, as the Lightning fork's use_cfg()


def per_sample(y: torch.Tensor | None, n: int) -> list | None:
    """The DiT's `y` argument for a batch of n samples: None (t2v) or the same condition for each."""
    return None if y is None else [y] * n


class TwoPasses:
    name = "two passes (reference)"
    needs_negative = True
    branches = (("cond",), ("uncond",))

    def __call__(self, model, latent, t, context, context_null, seq_len, g, y=None):
        cond = model([latent], t=t, context=context, seq_len=seq_len, y=per_sample(y, 1))[0]
        uncond = model([latent], t=t, context=context_null, seq_len=seq_len, y=per_sample(y, 1))[0]
        return uncond + g * (cond - uncond)


class BatchedPass:
    name = "one batch-2 pass"
    needs_negative = True
    branches = (("cond", "uncond"),)

    def __call__(self, model, latent, t, context, context_null, seq_len, g, y=None):
        cond, uncond = model([latent, latent], t=t.expand(2), context=context + context_null, seq_len=seq_len,
                             y=per_sample(y, 2))
        return uncond + g * (cond - uncond)


class CondOnly:
    name = "one conditional pass (guidance 1)"
    needs_negative = False
    branches = (("cond",),)

    def __call__(self, model, latent, t, context, context_null, seq_len, g, y=None):
        return model([latent], t=t, context=context, seq_len=seq_len, y=per_sample(y, 1))[0]


class CfgParallel:
    """cfg rank 0 (with its SP group) computes cond, cfg rank 1 uncond; both get both via one all-gather."""

    needs_negative = True

    def __init__(self, group, cfg_rank: int):
        from .distributed.cfg_parallel import cfg_parallel_prediction

        self.group, self.cfg_rank, self._predict = group, cfg_rank, cfg_parallel_prediction
        self.name = f"CFG parallel (cfg rank {cfg_rank} of 2)"
        self.branches = (("cond",) if cfg_rank == 0 else ("uncond",),)  # the other half runs the other branch

    def __call__(self, model, latent, t, context, context_null, seq_len, g, y=None):
        return self._predict(model, latent, t, context, context_null, seq_len, g, self.group, self.cfg_rank, y=y)


def is_guidance_one(g: float) -> bool:
    return abs(float(g) - 1.0) < GUIDANCE_ONE_TOL


def choose_guidance(g: float, batched: bool, cfg_group=None, cfg_rank: int = 0):
    """The strategy for one expert's guidance scale `g` (guidance 1 -> one pass; CFG-parallel needs two)."""
    if not torch.isfinite(torch.tensor(float(g))):
        raise ValueError(f"guidance scale must be finite, got {g}")
    if is_guidance_one(g):
        if cfg_group is not None:
            raise ValueError("--cfg_parallel with guidance 1 has nothing to split (one conditional pass per step); "
                             "drop --cfg_parallel or use a guidance scale other than 1")
        return CondOnly()
    if cfg_group is not None:
        return CfgParallel(cfg_group, cfg_rank)
    return BatchedPass() if batched else TwoPasses()
