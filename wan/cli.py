"""Argument parsing and validation for generate.py: the reference's t2v / i2v / ti2v flags, plus one flag per
RuntimeOptions field.

Every check here runs before anything loads and ends in one `UsageError` line that names the flag, the allowed
range and (where there is one) the reason for the bound.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import unicodedata
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from .configs import MAX_AREA_CONFIGS, SIZE_CONFIGS, WAN_CONFIGS
from .modules.rope import MAX_POSITIONS
from .options import FAST_PRESET, RuntimeOptions, fast_options

EXAMPLE_PROMPT = ("Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a "
                  "spotlighted stage.")
SOLVERS = ("unipc", "dpm++", "euler")
# The Lightning fork's 4-step values (Wan2.2-Lightning wan/configs/wan_t2v_A14B.py): explicit flags win.
DISTILLED_PRESET = dict(sample_solver="euler", sample_steps=4, sample_shift=5.0, sample_guide_scale=1.0)
# Bounds, each with its reason (said in the error message).
MAX_FRAMES = 1 + 4 * (MAX_POSITIONS - 1)  # latent frames = (F - 1) / 4 + 1 must fit the RoPE table
MAX_STEPS = 1000  # the schedulers' 1000 training timesteps
MAX_SHIFT = 100.0  # past this every step but the last sits near t = 1000
MAX_GUIDE = 50.0  # the models are tuned for 1-5; far larger values only saturate the video
MAX_LORA_STRENGTH = 10.0  # distilled LoRAs are made for 1.0
CPU_PRACTICAL_TASKS = tuple(n for n, c in WAN_CONFIGS.items() if not c.needs_ckpt_dir)  # the tiny tasks
log = logging.getLogger("wan")
# per-component weights (wan.formats.WeightPaths), each winning over --ckpt_dir's; the layout is detected per file
WEIGHT_FLAGS = {
    "dit_high": "the high-noise expert: a ComfyUI / Kijai .safetensors (fp32, fp16, bf16, fp8_scaled), a GGUF, or an "
                "expert folder (official, Diffusers transformer/) of the task's model (T2V or I2V); wins over "
                "--ckpt_dir's",
    "dit_low": "the low-noise expert, as --dit_high",
    "dit": "the DiT of a one-model task (ti2v-5B, ti2v-tiny), in any layout --dit_high takes; the A14B tasks have "
           "two: --dit_high and --dit_low",
    "t5": "the umt5 text encoder: .pth, .safetensors (official or Hugging Face names, fp16, bf16, fp8_scaled) or a "
          "Diffusers text_encoder/ folder",
    "vae": "the task's VAE: .pth, .safetensors or a Diffusers vae/ folder (the Wan 2.1 VAE; ti2v: the Wan 2.2 VAE, "
           "Wan2.2_VAE.pth)",
    "tokenizer": "the umt5 tokenizer folder (default: --ckpt_dir's google/umt5-xxl/ or tokenizer/)",
}
_BLANK_CHARS = frozenset("\u115f\u1160\u3164\uffa0\u2800")  # fillers that render as nothing


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a parse error is a UsageError (one line, exit code 2) instead of usage text + SystemExit."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def str2bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


_DERIVED_DEFAULTS = {"offload_model": "true on one GPU, false with several or on the CPU"}  # None = derived


def _option_help(f) -> str:
    meta, default = f.metadata, (f.default if f.default is not MISSING else None)
    help_ = meta.get("help", "")
    if "default:" in help_:  # the help states its own (derived) default, e.g. offload_model
        return help_
    shown = str(default).lower() if isinstance(default, bool) else default
    if default is None:
        shown = _DERIVED_DEFAULTS.get(f.name, "chosen at run time")
    return f"{help_} (default: {shown})"


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per RuntimeOptions field, same name. Unset flags stay None so --fast can fill them."""
    for f in fields(RuntimeOptions):
        meta, flag, help_ = f.metadata, f"--{f.name}", _option_help(f)
        if f.type in ("bool", "bool | None"):
            parser.add_argument(flag, type=str2bool, nargs="?", const=True, default=None, metavar="BOOL", help=help_)
        elif f.type in ("int", "int | None"):
            parser.add_argument(flag, type=int, default=None, metavar=meta.get("metavar"), help=help_)
        elif f.type in ("float", "float | None"):
            parser.add_argument(flag, type=float, default=None, metavar=meta.get("metavar", "GB"), help=help_)
        else:
            parser.add_argument(flag, type=str, default=None, choices=meta.get("choices"),
                                metavar=meta.get("metavar"), help=help_)


def _per_task(attr: str, fmt=str) -> str:
    """'81 for t2v-A14B, 17 for t2v-tiny': the task defaults, for help texts."""
    return ", ".join(f"{fmt(getattr(cfg, attr))} for {name}" for name, cfg in WAN_CONFIGS.items())


def _guide_text(guide: tuple[float, float]) -> str:
    low, high = guide
    return f"{low:g}" if low == high else f"{low:g} low-noise, {high:g} high-noise"


def _fast_help() -> str:
    parts = [k if v is True else f"{k} {str(v).lower()}" for k, v in FAST_PRESET.items() if k != "offload_model"]
    off = ("turns offload_model OFF (both experts stay resident) and "
           if FAST_PRESET.get("offload_model") is False else "")
    return (f"{off}turns on every exact speed switch: {', '.join(parts)}; flags given explicitly win, e.g. "
            "--fast --offload_model true")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Generate a video from a text prompt (and, for i2v and ti2v, a first frame) with "
                                   "Wan 2.2 T2V-A14B, I2V-A14B or TI2V-5B.")
    sizes = "; ".join(f"{name}: {', '.join(cfg.supported_sizes)}" for name, cfg in WAN_CONFIGS.items())
    p.add_argument("--task", type=str, default="t2v-A14B",
                   help=f"one of {', '.join(WAN_CONFIGS)} ({', '.join(CPU_PRACTICAL_TASKS)}: built-in random models "
                        "for CPU smoke runs)")
    p.add_argument("--size", type=str, default=None,
                   help=f"WIDTH*HEIGHT ({sizes}); with an image (i2v, ti2v) only its area counts, the aspect ratio "
                        "is the image's; "
                        f"default: the task's, {_per_task('default_size')}")
    p.add_argument("--frame_num", type=int, default=None,
                   help=f"frames, 4n+1, at most {MAX_FRAMES}; default: the task's, {_per_task('frame_num')}")
    p.add_argument("--ckpt_dir", type=str, default=None,
                   help="the official Wan2.2-T2V-A14B (or -I2V-A14B, -TI2V-5B) folder or the Diffusers one "
                        "(model_index.json; required for the full-size tasks unless every component is given below); "
                        "for the tiny tasks the folder their random checkpoint is written to (default: "
                        "~/.cache/wan22/)")
    for flag, what in WEIGHT_FLAGS.items():
        p.add_argument(f"--{flag}", type=str, default=None, metavar="DIR" if flag == "tokenizer" else "FILE",
                       help=what)
    p.add_argument("--save_file", type=str, default=None,
                   help="output .mp4 (default: the reference's naming, in --save_dir)")
    p.add_argument("--save_dir", type=str, default=None,
                   help="folder for default-named videos (default: the current folder); with --prompt_file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--prompt", type=str, default=None, help="text prompt (default: the reference's example)")
    p.add_argument("--prompt_file", type=str, default=None,
                   help="batch mode: one prompt per line (blank lines and lines starting with # are skipped); the "
                        "models load once, one video per prompt")
    p.add_argument("--image", type=str, default=None,
                   help="the video's first frame (PNG, JPEG, WebP, ...): required for i2v, optional for ti2v "
                        "(without it, text to video); its aspect "
                        "ratio sets the video's")
    p.add_argument("--image_file", type=str, default=None,
                   help="i2v / ti2v batch mode, with --prompt_file: one image path per prompt line, in the same order "
                        "(blank lines and lines starting with # are skipped)")
    p.add_argument("--use_prompt_extend", action="store_true", help="(reference flag; not supported here)")
    p.add_argument("--prompt_extend_method", type=str, default="local_qwen", choices=["dashscope", "local_qwen"],
                   help="(reference flag; not supported here)")
    p.add_argument("--prompt_extend_model", type=str, default=None, help="(reference flag; not supported here)")
    p.add_argument("--prompt_extend_target_lang", type=str, default="zh", choices=["zh", "en"],
                   help="(reference flag; not supported here)")
    p.add_argument("--base_seed", type=int, default=-1, help="seed, -1 or 0 .. 2**63-1; -1 draws one (default: -1)")
    p.add_argument("--sample_solver", type=str, default=None, choices=SOLVERS,
                   help="sampler (default: unipc; euler with --distilled)")
    p.add_argument("--sample_steps", type=int, default=None,
                   help=f"denoising steps, 1..{MAX_STEPS}; default: the task's, {_per_task('sample_steps')} "
                        "(4 with --distilled)")
    p.add_argument("--sample_shift", type=float, default=None,
                   help=f"flow shift, > 0 and at most {MAX_SHIFT:g}; default: the task's, "
                        f"{_per_task('sample_shift')} (5.0 with --distilled)")
    guides = ", ".join(f"{_guide_text(cfg.sample_guide_scale)} for {name}" for name, cfg in WAN_CONFIGS.items()
                       if cfg.needs_ckpt_dir)
    p.add_argument("--sample_guide_scale", type=float, default=None,
                   help=f"CFG scale for both experts, 0..{MAX_GUIDE:g} (default: the task's, {guides}; "
                        "1.0, no CFG, with --distilled)")
    p.add_argument("--lora_dir", type=str, default=None,
                   help="LoRA folder in the Lightning layout: high_noise_model.safetensors and "
                        "low_noise_model.safetensors")
    p.add_argument("--lora_high", type=str, default=None,
                   help="LoRA file for the high-noise expert (wins over --lora_dir's)")
    p.add_argument("--lora_low", type=str, default=None,
                   help="LoRA file for the low-noise expert (wins over --lora_dir's)")
    p.add_argument("--lora_strength", type=float, nargs="+", default=None, metavar="S",
                   help="LoRA strength: one value for both experts, or HIGH LOW (default: 1.0)")
    p.add_argument("--distilled", action="store_true",
                   help="few-step preset for a distilled (Lightning) LoRA: --sample_solver euler --sample_steps 4 "
                        "--sample_shift 5.0, guidance 1.0 for both experts; needs --lora_dir (or --lora_high / "
                        "--lora_low); flags given explicitly win")
    p.add_argument("--device", type=str, default=None,
                   help="cuda, cuda:N or cpu (default: cuda if present; t2v-A14B refuses to start without it)")
    p.add_argument("--fast", action="store_true", help=_fast_help())
    add_option_arguments(p)
    return p


def options_from_args(args) -> RuntimeOptions:
    explicit = {f.name: getattr(args, f.name) for f in fields(RuntimeOptions) if getattr(args, f.name) is not None}
    return fast_options(**explicit) if args.fast else RuntimeOptions(**explicit)


# ---- prompts ----------------------------------------------------------------------------------------------------
def is_blank_prompt(text: str | None) -> bool:
    """True when nothing visible is left: only whitespace, control, format (zero-width ...), combining or filler
    characters."""
    for ch in text or "":
        cat = unicodedata.category(ch)
        if not (ch.isspace() or cat[0] in "CZ" or cat in ("Mn", "Me") or ch in _BLANK_CHARS):
            return False
    return True


EMPTY_PROMPT = "the prompt is empty (only whitespace, control or invisible characters)"


@dataclass
class PromptLine:
    index: int  # position among the prompt lines (names the video in batch mode)
    lineno: int | None  # line in --prompt_file (None for --prompt)
    text: str
    image: str | None = None  # i2v / ti2v: the first frame's file (checked: it decodes)
    video_size: tuple[int, int] | None = None  # with an image: (width, height) of the video, from it and --size


def _read_lines(path: str, flag: str) -> str:
    f = Path(path)
    if not f.is_file():
        raise UsageError(f"{flag} {path} {'is not a file' if f.exists() else 'does not exist'}")
    try:
        return f.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line = f.read_bytes()[:exc.start].count(b"\n") + 1
        raise UsageError(f"{flag} {path} is not UTF-8 text (line {line}); save it as UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path} cannot be read ({exc.strerror or type(exc).__name__})") from None


def read_prompt_file(path: str) -> tuple[list[PromptLine], list[tuple[int, str]]]:
    """(prompts, bad lines as (line number, reason)). Blank lines and lines starting with '#' are skipped."""
    text = _read_lines(path, "--prompt_file")
    prompts, bad, index = [], [], 0
    for lineno, line in enumerate(text.split("\n"), 1):  # '\n' only: line numbers as an editor shows them
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if is_blank_prompt(s):
            bad.append((lineno, f"{EMPTY_PROMPT}; skipped"))
        else:
            prompts.append(PromptLine(index, lineno, s))
        index += 1
    if not prompts:
        detail = f" (bad lines: {', '.join(str(n) for n, _ in bad)})" if bad else ""
        raise UsageError(f"--prompt_file {path} holds no usable prompt{detail}; blank lines and lines starting "
                         "with # are skipped")
    return prompts, bad


# ---- validation -------------------------------------------------------------------------------------------------
def _finite(flag: str, value: float, lo: float, hi: float, lo_open: bool = False, why: str = "") -> None:
    bad = not math.isfinite(value) or value > hi or (value <= lo if lo_open else value < lo)
    if bad:
        rng = f"{'> ' if lo_open else '>= '}{lo:g} and <= {hi:g}"
        raise UsageError(f"{flag} must be a finite number {rng}{' (' + why + ')' if why else ''}, got {value}")


def _check_numbers(args, cfg) -> None:
    f = args.frame_num
    if f < 1 or f > MAX_FRAMES or (f - 1) % 4 != 0:
        lo = min(max(1, (f - 1) // 4 * 4 + 1), MAX_FRAMES - 4)
        example = f"e.g. {lo} or {lo + 4}" if 1 <= f <= MAX_FRAMES else f"e.g. {cfg.frame_num}"
        raise UsageError(f"--frame_num must be 4n+1 ({example}), from 1 to {MAX_FRAMES}: the VAE packs 4 frames "
                         f"per latent frame after the first, and the DiT's RoPE table holds {MAX_POSITIONS} latent "
                         f"frames; got {f}")
    if not 1 <= args.sample_steps <= MAX_STEPS:
        raise UsageError(f"--sample_steps must be between 1 and {MAX_STEPS} (the schedulers have {MAX_STEPS} "
                         f"training timesteps), got {args.sample_steps}")
    _finite("--sample_shift", args.sample_shift, 0.0, MAX_SHIFT, lo_open=True,
            why=f"beyond {MAX_SHIFT:g} every step but the last sits near t = 1000")
    if args.sample_guide_scale is not None:
        _finite("--sample_guide_scale", args.sample_guide_scale, 0.0, MAX_GUIDE,
                why="the models are tuned for 1 to 5; larger values only saturate the video")
    if args.base_seed != -1 and not 0 <= args.base_seed < 2**63:
        raise UsageError(f"--base_seed must be -1 (draw one) or in [0, 2**63), got {args.base_seed}")


def _check_loras(args, cfg) -> None:
    from .preflight import PathError, lora_files

    given = any(v is not None for v in (args.lora_dir, args.lora_high, args.lora_low))
    if cfg.boundary is None and (given or args.distilled):
        flag = "--distilled" if args.distilled and not given else "--lora_dir / --lora_high / --lora_low"
        raise UsageError(f"{flag}: {args.task} has one DiT and no published LoRA or few-step preset; LoRAs are for "
                         "the two-expert A14B tasks")
    strength = args.lora_strength
    if strength is not None:
        if not given:
            raise UsageError("--lora_strength needs a LoRA: pass --lora_dir, --lora_high or --lora_low")
        if len(strength) not in (1, 2):
            raise UsageError(f"--lora_strength takes one value (both experts) or two (HIGH LOW), got {len(strength)}")
        for s in strength:
            _finite("--lora_strength", s, -MAX_LORA_STRENGTH, MAX_LORA_STRENGTH,
                    why="distilled LoRAs are made for 1.0")
    args.lora_strength = tuple(strength) * (3 - len(strength)) if strength else (1.0, 1.0)
    if args.distilled and not given:
        raise UsageError("--distilled needs a distilled LoRA: pass --lora_dir DIR (the Lightning folder with "
                         "high_noise_model.safetensors and low_noise_model.safetensors)")
    try:
        files = lora_files(args.lora_dir, args.lora_high, args.lora_low) if given else {"high": None, "low": None}
    except PathError as exc:
        raise UsageError(str(exc)) from None
    args.lora_high, args.lora_low = files["high"], files["low"]


def check_device(device: str | None, task: str) -> None:
    """cpu, cuda or cuda:N of a visible GPU; t2v-A14B without CUDA and without --device is refused."""
    import torch

    if device is None:
        if task not in CPU_PRACTICAL_TASKS and not torch.cuda.is_available():
            raise UsageError(f"{task} needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False); "
                             "install a CUDA build of torch, or pass --device cpu if you really mean to run it on the "
                             "CPU (hours per video)")
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UsageError(f"--device {device} is not supported here; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for but CUDA is not available; use --device cpu "
                             "(practical only for the tiny tasks) or install a CUDA build of torch")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: only {n} CUDA device(s) are visible (cuda:0 .. cuda:{n - 1})")


def validate_args(args) -> None:
    """Fill task defaults and reject bad input with one line that names the fix (before any weight loads)."""
    if args.task not in WAN_CONFIGS:
        raise UsageError(f"unknown task {args.task!r}; choose one of {', '.join(WAN_CONFIGS)}")
    cfg = WAN_CONFIGS[args.task]
    if args.distilled:
        for key, value in DISTILLED_PRESET.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.sample_solver = args.sample_solver or "unipc"
    args.size = args.size or cfg.default_size
    if args.size not in cfg.supported_sizes:
        raise UsageError(f"--size {args.size} is not supported by {args.task}; use WIDTH*HEIGHT, one of "
                         f"{', '.join(cfg.supported_sizes)}")
    args.frame_num = cfg.frame_num if args.frame_num is None else args.frame_num
    args.sample_steps = cfg.sample_steps if args.sample_steps is None else args.sample_steps
    args.sample_shift = cfg.sample_shift if args.sample_shift is None else args.sample_shift
    _check_numbers(args, cfg)
    _check_weight_paths(args, cfg)
    _check_prompts(args)
    _check_images(args, cfg)
    if args.use_prompt_extend:
        raise UsageError("--use_prompt_extend is not supported by this implementation; extend the prompt yourself")
    _check_loras(args, cfg)
    check_device(args.device, args.task)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args.options = options_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    check_parallel_layout(args.options, world, cfg.arch.num_heads)
    _check_device_kernels(args.options, args.device)
    _check_step_cache(args, cfg)


def _check_step_cache(args, cfg) -> None:
    """--cache and --cache_calibrate: the step count (few-step runs refused), the ratio file (read and checked), the
    calibration's output file (one generation; its folder writable, an existing file only with --overwrite)."""
    from .step_cache import check_cache_request

    opts = args.options
    try:
        check_cache_request(opts, args.sample_steps, cfg.arch.model_type)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if opts.cache_calibrate is None:
        return
    out = Path(opts.cache_calibrate)
    if args.prompt_file is not None:
        raise UsageError("--cache_calibrate measures one generation; use --prompt, not --prompt_file")
    if out.is_dir():
        raise UsageError(f"--cache_calibrate {out} is a directory; choose a .json file name")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--cache_calibrate {out} exists; pass --overwrite to replace it")
    if not out.resolve().parent.is_dir():
        raise UsageError(f"--cache_calibrate {out}: the folder {out.resolve().parent} does not exist; create it first")
    if not os.access(out.resolve().parent, os.W_OK):
        raise UsageError(f"--cache_calibrate {out}: cannot write in {out.resolve().parent}; choose another folder")


def _check_weight_paths(args, cfg) -> None:
    """args.weight_paths (wan.formats.WeightPaths); --ckpt_dir may be left out only when every component is given.
    The DiT flags follow the task: --dit for a one-model task (ti2v), --dit_high and --dit_low for the A14B ones."""
    from .formats import WeightPaths
    from .formats.resolve import dit_flags_problem

    args.weight_paths = WeightPaths(**{f: getattr(args, f) for f in WEIGHT_FLAGS})
    given = args.weight_paths.given()
    for flag, path in given.items():
        if not path.exists():
            raise UsageError(f"--{flag} {path} does not exist")
    problem = dit_flags_problem(cfg, given)
    if problem:
        raise UsageError(problem)
    if cfg.needs_ckpt_dir and not args.ckpt_dir:
        dits = ("dit",) if cfg.boundary is None else ("dit_high", "dit_low")
        components = (*dits, "t5", "vae", "tokenizer")
        missing = [f"--{f} {'DIR' if f == 'tokenizer' else 'FILE'}" for f in components if f not in given]
        if len(missing) == len(components):
            name = cfg.checkpoint_name
            raise UsageError(f"--ckpt_dir is required for {args.task}: the folder of the official {name} download "
                             f"(huggingface-cli download Wan-AI/{name} --local-dir ./{name}), a Diffusers folder, or "
                             f"per-component files ({', '.join('--' + f for f in components)})")
        if missing:
            raise UsageError(f"without --ckpt_dir every component needs its path: pass {', '.join(missing)}"
                             + (" (the google/umt5-xxl folder of the official download, or tokenizer/ of the "
                                "Diffusers one)" if "--tokenizer DIR" in missing else ""))


def _check_device_kernels(options, device_arg: str | None) -> None:
    """fp8 switches and the fused q/k kernel where they cannot run: refused here, before the tiny checkpoint or any
    model loads (the pipeline refuses too; a CUDA GPU's capability, FA3 and triton are checked there)."""
    import torch

    from .modules.fp8 import Fp8UnavailableError, check_fp8_support

    device = torch.device(device_arg) if device_arg else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if options.fp8_linear != "none":
        try:
            check_fp8_support(device)
        except Fp8UnavailableError as exc:
            raise UsageError(str(exc)) from exc
    if options.attn_backend == "flash3_fp8" and device.type != "cuda":
        raise UsageError("attention backend flash3_fp8 needs a Hopper GPU (FA3's fp8 kernels are sm90 only); use "
                         "--attn_backend sdpa on the CPU")
    if options.fused_qk_rope:
        from .modules.attention import BackendUnavailableError
        from .modules.qk_rope import check_request

        try:
            check_request(options.fast_rope, device, options.compile)
        except (ValueError, BackendUnavailableError) as exc:
            raise UsageError(str(exc)) from exc


def _check_prompts(args) -> None:
    """args.prompts: the PromptLines to run; args.bad_lines: [(line number, reason)] of --prompt_file."""
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise UsageError("--prompt and --prompt_file exclude each other; pass one of them")
        if args.save_file is not None:
            raise UsageError("--save_file names one video; with --prompt_file use --save_dir DIR (default names)")
        args.prompts, args.bad_lines = read_prompt_file(args.prompt_file)
    else:
        if args.prompt is None:
            args.prompt = EXAMPLE_PROMPT
        if is_blank_prompt(args.prompt):
            raise UsageError(f"{EMPTY_PROMPT}; pass --prompt \"...\"")
        if args.save_file is not None and args.save_dir is not None:
            raise UsageError("--save_file and --save_dir exclude each other; --save_dir holds default-named videos")
        args.prompts, args.bad_lines = [PromptLine(0, None, args.prompt)], []


def read_image_file(path: str) -> list[str]:
    """The image paths of --image_file, one per line (blank lines and lines starting with '#' are skipped)."""
    entries = [s for s in (line.strip() for line in _read_lines(path, "--image_file").split("\n"))
               if s and not s.startswith("#")]
    if not entries:
        raise UsageError(f"--image_file {path} lists no image; give one image path per prompt line")
    return entries


def _check_images(args, cfg) -> None:
    """i2v (and ti2v when given one): every prompt gets its first frame, decoded once here (before anything loads)
    with the video size it gives; a bad --image is a usage error, a bad --image_file line makes its prompt a bad line
    (skipped). ti2v without an image is text-to-video."""
    if not cfg.takes_image:
        if args.image is not None or args.image_file is not None:
            i2v = ", ".join(n for n, c in WAN_CONFIGS.items() if c.takes_image)
            raise UsageError(f"--image and --image_file are for the image-to-video tasks ({i2v}); {args.task} "
                             "generates from text only")
        return
    if args.image_file is not None:
        if args.prompt_file is None:
            raise UsageError("--image_file pairs its lines with --prompt_file's; pass --prompt_file too, or one "
                             "--image")
        if args.image is not None:
            raise UsageError("--image and --image_file exclude each other; --image gives every prompt the same frame")
        paths = read_image_file(args.image_file)
        lines = len(args.prompts) + len(args.bad_lines)
        if len(paths) != lines:
            raise UsageError(f"--image_file {args.image_file} lists {len(paths)} images for the {lines} prompt lines "
                             f"of {args.prompt_file}; give one image per prompt line, in the same order")
        images = {p.index: paths[p.index] for p in args.prompts}
    elif args.image is None:
        if not cfg.needs_image:  # ti2v: text to video
            return
        raise UsageError(f"{args.task} needs --image PATH, the video's first frame (or --image_file with "
                         "--prompt_file)")
    else:
        images = {p.index: args.image for p in args.prompts}
    from .image_condition import i2v_geometry
    from .ti2v_inputs import ti2v_geometry
    from .utils.image import ImageInputError, load_image

    geometry = ti2v_geometry if cfg.arch.model_type == "ti2v" else i2v_geometry

    checked: dict[str, tuple[int, int] | str] = {}  # path -> video size, or why it cannot be used
    good = []
    for p in args.prompts:
        path = images[p.index]
        if path not in checked:
            flag = "--image" if args.image_file is None else "--image_file image"
            try:
                loaded = load_image(path, flag)
                for note in loaded.notes:
                    log.warning("%s %s: %s", flag, path, note)
                w, h = loaded.size
                geo = geometry(w, h, MAX_AREA_CONFIGS[args.size], cfg.vae_stride, cfg.patch_size)
                checked[path] = (geo.width, geo.height)
            except ImageInputError as exc:
                checked[path] = str(exc)
            except ValueError as exc:  # the geometry: an extreme aspect ratio
                checked[path] = f"{flag} {path}: {exc}"
        if isinstance(checked[path], str):
            if args.image_file is None:
                raise UsageError(checked[path])
            args.bad_lines.append((p.lineno, f"{checked[path]}; skipped"))
            continue
        p.image, p.video_size = path, checked[path]
        good.append(p)
    if not good:
        raise UsageError(f"--image_file {args.image_file}: no prompt has a usable image (see the warnings)")
    args.prompts = good


def plan_size(args) -> tuple[int, int]:
    """(width, height) the memory plan sizes for: --size, or with images the largest video they give."""
    sizes = [p.video_size for p in getattr(args, "prompts", ()) if p.video_size is not None]
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else size_tuple(args.size)


def check_parallel_layout(options: RuntimeOptions, world: int, num_heads: int = 40) -> None:
    """wan.options.check_parallel_layout, as a UsageError."""
    from .options import check_parallel_layout as check

    try:
        check(options, world, num_heads=num_heads)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def guide_scale(args, cfg):
    return cfg.sample_guide_scale if args.sample_guide_scale is None else args.sample_guide_scale


def size_tuple(size: str) -> tuple[int, int]:
    return SIZE_CONFIGS[size]
