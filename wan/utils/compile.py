"""Regional torch.compile: the repeated DiT block is compiled once and shared by every block of both experts."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("wan")


def compile_blocks(model, mode: str = "default") -> None:
    """Compile each block's `forward` in place (not the module call: forward hooks, e.g. block streaming, stay
    eager around the graph). All blocks run the same code object and parameters are graph inputs
    (inline_inbuilt_nn_modules), so one compiled graph serves all 80 blocks: no recompilation across blocks, steps
    or the expert switch once the shapes are fixed."""
    kwargs = {} if mode == "default" else {"mode": mode}
    # 80 block instances share one graph; keep headroom so a new shape (e.g. batched CFG) does not hit the limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.blocks:
        if getattr(block, "_wan_compiled", None) != mode:
            block.__dict__.pop("forward", None)
            block.forward = torch.compile(block.forward, dynamic=False, **kwargs)
            block._wan_compiled = mode
    log.info("torch.compile (%s) on %d blocks", mode, len(model.blocks))


def uncompile_blocks(model) -> None:
    """Back to eager blocks (for A/B runs in one process)."""
    for block in model.blocks:
        if getattr(block, "_wan_compiled", None):
            block.__dict__.pop("forward", None)
            block._wan_compiled = None
