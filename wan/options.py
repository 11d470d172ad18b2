"""Runtime options: every speed switch in one frozen object. The CLI mirrors these fields one to one.

Each field defaults to the original path (the reference's behaviour). `fast_options()` turns on every switch that
keeps the output equal to the original path within bf16 rounding; explicit settings override the preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .modules.attention import BACKENDS

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")


@dataclass(frozen=True)
class RuntimeOptions:
    # placement (reference flags)
    offload_model: bool | None = field(default=None, metadata={"help": "swap experts/T5 through the CPU; "
                                       "default True on one GPU, False with several (as the reference)"})
    convert_model_dtype: bool = field(default=False, metadata={"help": "DiT weights in bf16 (fp32 on disk)"})
    t5_cpu: bool = field(default=False, metadata={"help": "run the T5 text encoder on the CPU"})
    # exact speed switches
    attn_backend: str = field(default="auto", metadata={
        "help": "attention kernel, resolved once at load: auto = FA3 if importable on Hopper, else cuDNN SDPA on "
                "Hopper, else flash-attn 2, else PyTorch's default", "choices": BACKENDS})
    batched_cfg: bool = field(default=False, metadata={"help": "conditional + unconditional pass as one batch-2 forward"})
    tf32: bool = field(default=False, metadata={"help": "TF32 for fp32 matmuls and convolutions"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the repeated DiT block (shared by both experts)"})
    compile_mode: str = field(default="default", metadata={"help": "torch.compile mode", "choices": COMPILE_MODES})
    fast_time_embedding: bool = field(default=False, metadata={"help": "one time embedding per sample, not per token "
                                      "(exact for t2v: every token has the same t)"})
    fast_rope: bool = field(default=False, metadata={"help": "RoPE in fp32 from cached cos/sin tables "
                                                     "(no complex128, no per-forward table building)"})
    # multi-GPU (torchrun)
    ulysses_size: int = field(default=1, metadata={"help": "Ulysses sequence-parallel degree"})
    cfg_parallel: bool = field(default=False, metadata={"help": "split the two CFG passes over two halves of the world"})
    dit_fsdp: bool = field(default=False, metadata={"help": "FSDP-shard the DiT experts"})
    t5_fsdp: bool = field(default=False, metadata={"help": "FSDP-shard the T5 encoder"})

    def __post_init__(self):
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {self.attn_backend!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.ulysses_size < 1:
            raise ValueError(f"ulysses_size must be >= 1, got {self.ulysses_size}")

    def changed(self) -> dict:
        """Fields that differ from the original path (for logs and benchmark records)."""
        base = RuntimeOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)}


# The --fast preset: all switches that keep the output equal to the original path within bf16 rounding.
FAST_PRESET = dict(offload_model=False, convert_model_dtype=True, batched_cfg=True, tf32=True, compile=True,
                   fast_time_embedding=True, fast_rope=True)


def fast_options(base: RuntimeOptions | None = None, **explicit) -> RuntimeOptions:
    """The --fast preset on top of `base`, then `explicit` settings (which always win)."""
    return replace(base or RuntimeOptions(), **{**FAST_PRESET, **explicit})
