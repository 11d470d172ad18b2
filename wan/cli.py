"""Argument parsing and validation for generate.py: the reference's t2v flags, plus one flag per RuntimeOptions field."""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields

from .configs import SIZE_CONFIGS, WAN_CONFIGS
from .options import FAST_PRESET, RuntimeOptions, fast_options

EXAMPLE_PROMPT = ("Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a "
                  "spotlighted stage.")


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RuntimeOptions field, same name. Unset flags stay None so --fast can fill them."""
    for f in fields(RuntimeOptions):
        meta, flag = f.metadata, f"--{f.name}"
        default = f.default if f.default is not MISSING else None
        help_ = f"{meta.get('help', '')} (default: {default})"
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, type=str2bool, nargs="?", const=True, default=None, help=help_)
        elif f.type == "int":
            parser.add_argument(flag, type=int, default=None, help=help_)
        else:
            parser.add_argument(flag, type=str, default=None, choices=meta.get("choices"), help=help_)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate a video from a text prompt with Wan 2.2 T2V-A14B.")
    p.add_argument("--task", type=str, default="t2v-A14B", help=f"one of {', '.join(WAN_CONFIGS)}")
    p.add_argument("--size", type=str, default=None, help="WIDTH*HEIGHT, e.g. 1280*720 (default: the task's)")
    p.add_argument("--frame_num", type=int, default=None, help="frames, 4n+1 (default 81)")
    p.add_argument("--ckpt_dir", type=str, default=None, help="the official Wan2.2-T2V-A14B folder")
    p.add_argument("--save_file", type=str, default=None, help="output .mp4 (default: the reference's naming)")
    p.add_argument("--overwrite", action="store_true", help="replace --save_file if it exists")
    p.add_argument("--prompt", type=str, default=None, help="text prompt (default: the reference's example)")
    p.add_argument("--use_prompt_extend", action="store_true", help="(reference flag; not supported here)")
    p.add_argument("--prompt_extend_method", type=str, default="local_qwen", choices=["dashscope", "local_qwen"])
    p.add_argument("--prompt_extend_model", type=str, default=None)
    p.add_argument("--prompt_extend_target_lang", type=str, default="zh", choices=["zh", "en"])
    p.add_argument("--base_seed", type=int, default=-1, help="seed; -1 draws one")
    p.add_argument("--sample_solver", type=str, default="unipc", choices=["unipc", "dpm++"])
    p.add_argument("--sample_steps", type=int, default=None, help="denoising steps (default 40)")
    p.add_argument("--sample_shift", type=float, default=None, help="flow shift (default 12.0)")
    p.add_argument("--sample_guide_scale", type=float, default=None,
                   help="CFG scale for both experts (default: 3.0 low-noise, 4.0 high-noise)")
    p.add_argument("--device", type=str, default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--fast", action="store_true",
                   help=f"turn on every exact speed switch ({', '.join(FAST_PRESET)}); explicit flags override")
    add_option_arguments(p)
    return p


def options_from_args(args) -> RuntimeOptions:
    explicit = {f.name: getattr(args, f.name) for f in fields(RuntimeOptions) if getattr(args, f.name) is not None}
    return fast_options(**explicit) if args.fast else RuntimeOptions(**explicit)


def validate_args(args) -> None:
    """Fill task defaults and reject bad input with one line that names the fix (before any weight loads)."""
    if args.task not in WAN_CONFIGS:
        raise UsageError(f"unknown task {args.task!r}; choose one of {', '.join(WAN_CONFIGS)}")
    cfg = WAN_CONFIGS[args.task]
    args.size = args.size or cfg.default_size
    if args.size not in cfg.supported_sizes:
        raise UsageError(f"size {args.size} is not supported by {args.task}; use WIDTH*HEIGHT, one of "
                         f"{', '.join(cfg.supported_sizes)}")
    args.frame_num = cfg.frame_num if args.frame_num is None else args.frame_num
    if args.frame_num < 1 or (args.frame_num - 1) % 4 != 0:
        lo = max(1, (args.frame_num - 1) // 4 * 4 + 1)
        raise UsageError(f"--frame_num must be 4n+1 (e.g. {lo} or {lo + 4}), got {args.frame_num}")
    args.sample_steps = cfg.sample_steps if args.sample_steps is None else args.sample_steps
    if args.sample_steps < 1:
        raise UsageError(f"--sample_steps must be >= 1, got {args.sample_steps}")
    args.sample_shift = cfg.sample_shift if args.sample_shift is None else args.sample_shift
    if args.sample_shift <= 0:
        raise UsageError(f"--sample_shift must be > 0, got {args.sample_shift}")
    if args.sample_guide_scale is not None and args.sample_guide_scale < 0:
        raise UsageError(f"--sample_guide_scale must be >= 0, got {args.sample_guide_scale}")
    if cfg.needs_ckpt_dir and not args.ckpt_dir:
        raise UsageError(f"--ckpt_dir is required for {args.task}: the folder of the official Wan2.2-T2V-A14B "
                         "download (huggingface-cli download Wan-AI/Wan2.2-T2V-A14B --local-dir ./Wan2.2-T2V-A14B)")
    if args.prompt is None:
        args.prompt = EXAMPLE_PROMPT
    if not args.prompt.strip():
        raise UsageError("the prompt is empty; pass --prompt \"...\"")
    if args.use_prompt_extend:
        raise UsageError("--use_prompt_extend is not supported by this implementation; extend the prompt yourself")
    if args.base_seed >= 2**63 or args.base_seed < -1:
        raise UsageError(f"--base_seed must be -1 or in [0, 2**63), got {args.base_seed}")
    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu "
                             "(practical only for --task t2v-tiny) or install a CUDA build of torch")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args.options = options_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    check_parallel_layout(args.options, world)


def check_parallel_layout(options: RuntimeOptions, world: int) -> None:
    """World size must equal ulysses_size x (2 with CFG parallel); heads (40) must divide by ulysses_size."""
    cfg_ways = 2 if options.cfg_parallel else 1
    if world == 1 and (options.ulysses_size > 1 or options.cfg_parallel or options.dit_fsdp or options.t5_fsdp):
        raise UsageError("--ulysses_size > 1, --cfg_parallel, --dit_fsdp and --t5_fsdp need torchrun, e.g. "
                         "torchrun --nproc_per_node=4 generate.py ... --ulysses_size 4")
    if world > 1 and options.ulysses_size * cfg_ways != world:
        raise UsageError(f"world size {world} must equal ulysses_size ({options.ulysses_size}) x "
                         f"{cfg_ways} (cfg_parallel={options.cfg_parallel})")
    if 40 % options.ulysses_size != 0:
        raise UsageError(f"--ulysses_size {options.ulysses_size} must divide the 40 attention heads (1, 2, 4, 5, 8)")


def guide_scale(args, cfg):
    return cfg.sample_guide_scale if args.sample_guide_scale is None else args.sample_guide_scale


def size_tuple(size: str) -> tuple[int, int]:
    return SIZE_CONFIGS[size]
