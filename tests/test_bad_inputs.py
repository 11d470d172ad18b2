"""Bad inputs and interruptions: one `error:` line, the documented exit code, nothing left behind (README "Flags").

Table-driven, one row per bad input, grouped by class. Every row runs in-process through `generate.main` with the
model loaders replaced by sentinels, so a refusal that does not happen up front fails loudly; the rows marked `sub`
(one or more per class) also run as real `python generate.py` processes, where the exit status, the absence of a
traceback and the log lines are those a user sees. Signals, the write race and batch mode run as processes only.

Test hook: WAN_TEST_WRITE_DELAY_S (read by wan/utils/video.py) sleeps between frames while the mp4 is written, so a
signal or a competing file lands while the temporary file exists.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import generate  # noqa: E402

FAST = ["--device", "cpu", "--size", "64*64", "--frame_num", "5", "--sample_steps", "2"]
SHARD_GLOB = "diffusion_pytorch_model*.safetensors"
T5, VAE, TOK = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl"


@dataclass
class Env:
    tmp: Path
    ckpt: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out.mp4"


def std(e: Env, *extra, prompt=True, save=True, ckpt=None) -> list[str]:
    """A valid, fast tiny command line, plus `extra` (later flags win)."""
    argv = ["--task", "t2v-tiny", "--ckpt_dir", str(ckpt or e.ckpt), *FAST]
    argv += ["--prompt", "a cat boxing"] if prompt else []
    argv += ["--save_file", str(e.out)] if save else []
    return argv + [str(x) for x in extra]


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    code: int
    needle: str  # must appear in the error line
    sub: bool = False  # also run as a subprocess
    keep: dict = field(default_factory=dict)  # files made by argv(): name -> bytes they must still hold


# ---- helpers that build bad files ---------------------------------------------------------------------------------
def _write(e: Env, name: str, data: bytes | str) -> Path:
    p = e.tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _mkdir(e: Env, name: str) -> Path:
    p = e.tmp / name
    p.mkdir(parents=True)
    return p


def _link(e: Env, name: str, target) -> Path:
    p = e.tmp / name
    os.symlink(target, p)
    return p


def _ckpt_copy(e: Env, mutate) -> Path:
    """A copy of the tiny checkpoint (marker included, so nothing is rewritten) with one file damaged."""
    d = e.tmp / "ckpt"
    shutil.copytree(e.ckpt, d)
    mutate(d)
    return d


def _shard(d: Path) -> Path:
    return sorted((d / "high_noise_model").glob(SHARD_GLOB))[0]


def _truncate(p: Path, n: int = 100) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:-n])


def _bad_pickle(p: Path) -> None:
    with zipfile.ZipFile(p) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(p, "w") as z:
        for info, data in entries:
            z.writestr(info, b"\x80\x02garbage that is not a pickle" if info.filename.endswith("data.pkl") else data)


def _edit_json(p: Path, **changes) -> None:
    obj = json.loads(p.read_text())
    obj.update(changes)
    p.write_text(json.dumps(obj))


def i2v(e: Env, *extra, image=None) -> list[str]:
    """A valid, fast i2v-tiny command line with `image` as --image (None: no --image), plus `extra`."""
    argv = ["--task", "i2v-tiny", "--ckpt_dir", str(e.tmp / "i2v_ckpt"), *FAST, "--prompt", "a cat boxing",
            "--save_file", str(e.out)]
    return argv + (["--image", str(image)] if image is not None else []) + [str(x) for x in extra]


def ti2v(e: Env, *extra, image=None) -> list[str]:
    """A valid, fast ti2v-tiny command line (the image optional) plus `extra`."""
    argv = ["--task", "ti2v-tiny", "--ckpt_dir", str(e.tmp / "ti2v_ckpt"), *FAST, "--prompt", "a cat boxing",
            "--save_file", str(e.out)]
    return argv + (["--image", str(image)] if image is not None else []) + [str(x) for x in extra]


def i2v_batch(e: Env, prompts: str, images: str, *extra) -> list[str]:
    """An i2v-tiny batch command line: --prompt_file and --image_file holding these lines."""
    return ["--task", "i2v-tiny", "--ckpt_dir", str(e.tmp / "i2v_ckpt"), *FAST, "--prompt_file",
            str(_prompts(e, prompts)), "--image_file", str(_write(e, "images.txt", images)), *map(str, extra)]


def _png(e: Env, name: str, w: int = 48, h: int = 32, mode: str = "RGB") -> Path:
    from PIL import Image

    p = e.tmp / name
    Image.new(mode, (w, h), 128 if mode in ("L", "F") else (10, 200, 30)).save(p)
    return p


def _png_header_only(e: Env, name: str, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels (what a decompression bomb looks like before decoding)."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return _write(e, name, b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _truncated_png(e: Env) -> Path:
    p = _png(e, "cut.png", 64, 64)
    p.write_bytes(p.read_bytes()[:-40])
    return p


def _comfy(e: Env, name: str = "dit.safetensors") -> Path:
    """The tiny high-noise expert as a ComfyUI single file (fp16, model.diffusion_model. prefix)."""
    from wan.testing.layouts import write_comfy_dit

    return write_comfy_dit(e.ckpt / "high_noise_model", e.tmp / name)


def _other_task(e: Env, **changes) -> Path:
    """A tiny DiT of another architecture (e.g. in_dim 36, an I2V expert) as one safetensors file."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from wan.configs.model_config import TINY
    from wan.modules.model import WanModel

    with __import__("torch").device("meta"):
        shapes = WanModel.from_config(replace(TINY, **changes)).state_dict()
    torch = __import__("torch")
    save_file({k: torch.ones(v.shape) for k, v in shapes.items()}, e.tmp / "other.safetensors")
    return e.tmp / "other.safetensors"


def _gguf_unknown(e: Env) -> Path:
    from wan.testing.layouts import write_gguf_dit

    write_gguf_dit(e.ckpt / "high_noise_model", e.tmp / "dit.gguf", override={"blocks.0.ffn.0.weight": "Q8_1"})
    return e.tmp / "dit.gguf"


def _truncated(p: Path) -> Path:
    _truncate(p, 1000)
    return p


def _only_files(e: Env, *missing, task: str = "t2v-A14B") -> list[str]:
    """`task` from per-component files only (the tiny T2V checkpoint's), lacking `missing`."""
    flags = {"--dit_high": "high_noise_model", "--dit_low": "low_noise_model", "--t5": T5, "--vae": VAE,
             "--tokenizer": TOK}
    argv = ["--task", task, "--device", "cpu", "--save_file", str(e.out)]
    for flag, name in flags.items():
        if flag not in missing:
            argv += [flag, str(e.ckpt / name)]
    return argv


def _ti2v_files(e: Env, *extra) -> list[str]:
    """ti2v-tiny from per-component files (a 48-channel DiT file, the tiny T5 and tokenizer; `extra` adds --vae)."""
    dit = _other_task(e, model_type="ti2v", in_dim=48, out_dim=48)
    return ["--task", "ti2v-tiny", *FAST, "--prompt", "a cat", "--save_file", str(e.out), "--dit", str(dit),
            "--t5", str(e.ckpt / T5), "--tokenizer", str(e.ckpt / TOK), *(str(x) for x in extra)]


def _vae22(e: Env) -> Path:
    """A tiny Wan 2.2 VAE in the official layout (Wan2.2_VAE.pth)."""
    from wan.testing.tiny_vae22 import write_tiny_vae22_checkpoint

    write_tiny_vae22_checkpoint(e.tmp / "Wan2.2_VAE.pth")
    return e.tmp / "Wan2.2_VAE.pth"


def ckpt_case(id_, mutate, needle, sub=False) -> Case:
    return Case(id_, lambda e: std(e, ckpt=_ckpt_copy(e, mutate)), 1, needle, sub)


def _prompts(e: Env, text: str | bytes) -> Path:
    return _write(e, "prompts.txt", text)


CACHE12 = ("--sample_steps", "12", "--cache", "magcache")  # a step count the caches accept


def _lora_dir(e: Env) -> Path:
    """A Lightning-layout folder (only its files' presence is checked before the step count)."""
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors"):
        _write(e, f"lora/{name}", b"x")
    return e.tmp / "lora"


# ---- the table ----------------------------------------------------------------------------------------------------
CASES = [
    # numbers: finite, in range, the flag and the range named
    Case("shift-nan", lambda e: std(e, "--sample_shift", "nan"), 2, "--sample_shift must be a finite number", True),
    Case("shift-inf", lambda e: std(e, "--sample_shift", "inf"), 2, "--sample_shift"),
    Case("shift-zero", lambda e: std(e, "--sample_shift", "0"), 2, "> 0 and <= 100"),
    Case("shift-negative", lambda e: std(e, "--sample_shift", "-3"), 2, "--sample_shift"),
    Case("shift-huge", lambda e: std(e, "--sample_shift", "1e6"), 2, "<= 100"),
    Case("guide-nan", lambda e: std(e, "--sample_guide_scale", "nan"), 2, "--sample_guide_scale", True),
    Case("guide-inf", lambda e: std(e, "--sample_guide_scale", "-inf"), 2, "--sample_guide_scale"),
    Case("guide-negative", lambda e: std(e, "--sample_guide_scale", "-1"), 2, ">= 0 and <= 50"),
    Case("guide-huge", lambda e: std(e, "--sample_guide_scale", "1e300"), 2, "<= 50"),
    Case("frames-not-4n+1", lambda e: std(e, "--frame_num", "80"), 2, "4n+1 (e.g. 77 or 81), from 1 to 4093"),
    Case("frames-zero", lambda e: std(e, "--frame_num", "0"), 2, "--frame_num must be 4n+1"),
    Case("frames-negative", lambda e: std(e, "--frame_num", "-3"), 2, "--frame_num must be 4n+1"),
    Case("frames-over-rope", lambda e: std(e, "--frame_num", "4097"), 2, "RoPE table holds 1024", True),
    Case("frames-absurd", lambda e: std(e, "--frame_num", str(10**30)), 2, "--frame_num"),
    Case("frames-float", lambda e: std(e, "--frame_num", "81.0"), 2, "--frame_num: invalid int value"),
    Case("steps-zero", lambda e: std(e, "--sample_steps", "0"), 2, "--sample_steps must be between 1 and 1000"),
    Case("steps-over", lambda e: std(e, "--sample_steps", "1001"), 2, "--sample_steps must be between 1 and 1000"),
    Case("seed-below", lambda e: std(e, "--base_seed", "-2"), 2, "--base_seed must be -1"),
    Case("seed-over", lambda e: std(e, "--base_seed", str(2**63)), 2, "[0, 2**63)"),
    Case("size-not-for-tiny", lambda e: std(e, "--size", "1280*720"), 2, "not supported by t2v-tiny", True),
    Case("size-garbage", lambda e: std(e, "--size", "big"), 2, "WIDTH*HEIGHT"),
    Case("ulysses-zero", lambda e: std(e, "--ulysses_size", "0"), 2, "ulysses_size must be >= 1"),
    Case("ulysses-without-torchrun", lambda e: std(e, "--ulysses_size", "2"), 2, "torchrun"),
    Case("bad-bool", lambda e: std(e, "--tf32", "maybe"), 2, "expected a boolean"),
    Case("bad-choice", lambda e: std(e, "--attn_backend", "fastest"), 2, "invalid choice"),
    Case("fp8-linear-on-cpu", lambda e: std(e, "--fp8_linear", "all"), 2, "drop --fp8_linear"),
    Case("fp8-attention-on-cpu", lambda e: std(e, "--attn_backend", "flash3_fp8"), 2, "use --attn_backend sdpa"),
    Case("vae-bands-negative", lambda e: std(e, "--vae_bands", "-1"), 2, "vae_bands must be 0 (whole frames)"),
    Case("ffn-chunks-out-of-range", lambda e: std(e, "--ffn_chunks", "17"), 2, "ffn_chunks must be 0 (whole) or 2..16"),
    Case("fused-qk-rope-without-fast-rope", lambda e: std(e, "--fused_qk_rope"), 2, "add --fast_rope (or --fast)"),
    Case("fused-qk-rope-on-cpu", lambda e: std(e, "--fused_qk_rope", "--fast_rope"), 2, "leave it off"),
    Case("fused-qk-rope-with-compile", lambda e: std(e, "--fused_qk_rope", "--fast"), 2, "add --compile false"),
    Case("unknown-flag", lambda e: std(e, "--sample_stepz", "3"), 2, "unrecognized arguments", True),
    Case("unknown-task", lambda e: std(e, "--task", "t2v-5B"), 2, "unknown task"),
    Case("prompt-extend", lambda e: std(e, "--use_prompt_extend"), 2, "not supported"),
    # prompts: invisible and control characters count as empty
    Case("prompt-empty", lambda e: std(e, "--prompt", ""), 2, "the prompt is empty"),
    Case("prompt-spaces", lambda e: std(e, "--prompt", " \t "), 2, "the prompt is empty"),
    Case("prompt-zero-width", lambda e: std(e, "--prompt", "\u200b"), 2, "the prompt is empty", True),
    Case("prompt-control", lambda e: std(e, "--prompt", "\x01\x02\x1b\x7f"), 2, "the prompt is empty"),
    Case("prompt-invisible-mix", lambda e: std(e, "--prompt", "\u200d\ufeff\u2060\u3164\u00a0"), 2, "is empty"),
    Case("prompt-and-file", lambda e: std(e, "--prompt_file", _prompts(e, "a cat\n"), save=False), 2,
         "exclude each other"),
    Case("prompt-file-and-save-file", lambda e: std(e, "--prompt_file", _prompts(e, "a cat\n"), prompt=False), 2,
         "--save_dir"),
    Case("prompt-file-missing", lambda e: std(e, "--prompt_file", e.tmp / "nope.txt", prompt=False, save=False), 2,
         "does not exist"),
    Case("prompt-file-no-prompt", lambda e: std(e, "--prompt_file", _prompts(e, "# c\n\n  \n\u200b\n"),
                                                prompt=False, save=False), 2, "no usable prompt (bad lines: 4)"),
    Case("prompt-file-not-utf8", lambda e: std(e, "--prompt_file", _prompts(e, b"ok\n\xff\xfe\n"), prompt=False,
                                               save=False), 2, "not UTF-8 text (line 2)"),
    # LoRA and the distilled preset
    Case("distilled-without-lora", lambda e: std(e, "--distilled"), 2, "needs a distilled LoRA", True),
    Case("lora-strength-without-lora", lambda e: std(e, "--lora_strength", "0.5"), 2, "needs a LoRA"),
    Case("lora-high-missing", lambda e: std(e, "--lora_high", e.tmp / "h.safetensors"), 2,
         "--lora_high", True),
    Case("lora-dir-lacks-low", lambda e: std(e, "--lora_dir", _write(e, "lora/high_noise_model.safetensors",
                                                                       b"x").parent), 2,
         "lacks low_noise_model.safetensors"),
    Case("lora-dir-not-dir", lambda e: std(e, "--lora_dir", e.tmp / "nolora"), 2, "--lora_dir"),
    Case("lora-strength-three", lambda e: std(e, "--lora_high", _write(e, "h.safetensors", b"x"), "--lora_strength",
                                              "1", "1", "1"), 2, "one value (both experts) or two"),
    Case("lora-strength-nan", lambda e: std(e, "--lora_high", _write(e, "h.safetensors", b"x"), "--lora_strength",
                                            "nan"), 2, "--lora_strength must be a finite number"),
    Case("lora-garbage-file", lambda e: std(e, "--lora_high", _write(e, "h.safetensors", b"not a safetensors")),
         1, "h.safetensors is not a safetensors file"),
    # devices
    Case("device-tpu", lambda e: std(e, "--device", "tpu"), 2, "--device 'tpu' is not a device", True),
    Case("device-meta", lambda e: std(e, "--device", "meta"), 2, "--device meta is not supported"),
    Case("device-garbage", lambda e: std(e, "--device", "gpu please"), 2, "is not a device"),
    Case("device-empty", lambda e: std(e, "--device", ""), 2, "is not a device"),
    Case("device-cuda9", lambda e: std(e, "--device", "cuda:9"), 2, "cuda:9"),
    # the output target
    Case("target-exists", lambda e: std(e, "--save_file", _write(e, "old.mp4", b"keep")), 2, "--overwrite", True,
         keep={"old.mp4": b"keep"}),
    Case("target-dangling-symlink", lambda e: std(e, "--save_file", _link(e, "dangling.mp4", e.tmp / "gone.mp4")), 2,
         "symlink", True),
    Case("target-symlink-to-file", lambda e: std(e, "--save_file", _link(e, "l.mp4", _write(e, "real.mp4", b"r"))),
         2, "--overwrite", keep={"real.mp4": b"r"}),
    Case("target-is-dir", lambda e: std(e, "--save_file", _mkdir(e, "d.mp4"), "--overwrite"), 2, "is a directory"),
    Case("target-parent-missing", lambda e: std(e, "--save_file", e.tmp / "no" / "v.mp4"), 2, "does not exist"),
    Case("target-parent-is-file", lambda e: std(e, "--save_file", _write(e, "f", b"x") / "v.mp4"), 2,
         "not a directory", keep={"f": b"x"}),
    Case("target-not-mp4", lambda e: std(e, "--save_file", e.tmp / "v.avi"), 2, "must end in .mp4"),
    Case("target-empty-name", lambda e: std(e, "--save_file", ""), 2, "empty"),
    Case("target-name-too-long", lambda e: std(e, "--save_file", e.tmp / ("a" * 248 + ".mp4")), 2,
         "too long", True),
    Case("target-read-only-place", lambda e: std(e, "--save_file", "/proc/wan_video.mp4"), 2, "cannot write in",
         True),
    Case("save-dir-missing", lambda e: std(e, "--save_dir", e.tmp / "nodir", save=False), 2, "does not exist"),
    Case("save-file-and-save-dir", lambda e: std(e, "--save_dir", e.tmp), 2, "exclude each other"),
    # image-to-video: the first frame, checked (decoded) before anything loads
    Case("i2v-without-image", lambda e: i2v(e), 2, "i2v-tiny needs --image PATH", True),
    Case("i2v-image-missing", lambda e: i2v(e, image=e.tmp / "gone.png"), 2, "--image", True),
    Case("i2v-image-is-dir", lambda e: i2v(e, image=_mkdir(e, "pics")), 2, "is not a file"),
    Case("i2v-text-named-jpg", lambda e: i2v(e, image=_write(e, "photo.jpg", "not a picture\n")), 2,
         "is not an image Pillow can read", True),
    Case("i2v-image-1x1", lambda e: i2v(e, image=_png(e, "dot.png", 1, 1)), 2, "too small to start a video"),
    Case("i2v-image-truncated", lambda e: i2v(e, image=_truncated_png(e)), 2, "cannot be decoded", True),
    Case("i2v-image-too-large", lambda e: i2v(e, image=_png_header_only(e, "bomb.png", 20000, 20000)), 2,
         "too large to decode", True),
    Case("i2v-image-bomb", lambda e: i2v(e, image=_png_header_only(e, "bomb2.png", 100000, 100000)), 2,
         "too large to decode"),
    Case("i2v-image-float", lambda e: i2v(e, image=_png(e, "f.tiff", 40, 40, mode="F")), 2, "floating-point"),
    Case("i2v-extreme-aspect", lambda e: i2v(e, image=_png(e, "strip.png", 4000, 16)), 2, "crop the image"),
    Case("t2v-with-image", lambda e: std(e, "--image", _png(e, "a.png")), 2, "generates from text only", True),
    Case("i2v-with-a-t2v-checkpoint", lambda e: i2v(e, image=_png(e, "a.png"))[:2] + ["--ckpt_dir", str(e.ckpt)]
         + i2v(e, image=e.tmp / "a.png")[4:], 1, "in_dim=16 (expected 36)"),
    Case("image-file-without-prompt-file", lambda e: i2v(e, "--image_file", _write(e, "i.txt", "a.png\n")), 2,
         "pass --prompt_file too"),
    Case("image-and-image-file", lambda e: i2v_batch(e, "a cat\n", "a.png\n", "--image", _png(e, "a.png")), 2,
         "exclude each other"),
    Case("image-file-count", lambda e: i2v_batch(e, "a cat\ntwo dogs\n", "# one image\na.png\n"), 2,
         "lists 1 images for the 2 prompt lines"),
    Case("image-file-no-usable-image", lambda e: i2v_batch(e, "a cat\n", "gone.png\n"), 2,
         "no prompt has a usable image"),
    Case("image-file-empty", lambda e: i2v_batch(e, "a cat\n", "# nothing\n\n"), 2, "lists no image"),
    # step caching: few-step runs, settings without their cache, ratio files, the calibration's output
    Case("cache-few-steps", lambda e: std(e, "--cache", "magcache"), 2, "needs at least 10 sampling steps, this run "
         "has 2", True),
    Case("cache-distilled", lambda e: std(e, "--distilled", "--lora_dir", _lora_dir(e), "--cache", "easycache"), 2,
         "few-step (distilled) runs"),
    Case("cache-calibrate-few-steps", lambda e: std(e, "--cache_calibrate", e.tmp / "r.json"), 2,
         "--cache_calibrate needs at least 10"),
    Case("cache-choice", lambda e: std(e, "--cache", "teacache"), 2, "invalid choice"),
    Case("cache-thresh-without-cache", lambda e: std(e, "--cache_thresh", "0.1"), 2,
         "add --cache magcache or --cache easycache", True),
    Case("cache-thresh-nan", lambda e: std(e, *CACHE12, "--cache_thresh", "nan"), 2,
         "--cache_thresh must be a finite number from 0 to 10"),
    Case("cache-max-skip-negative", lambda e: std(e, *CACHE12, "--cache_max_skip", "-1"), 2,
         "--cache_max_skip must be a whole number"),
    Case("cache-retention-over-one", lambda e: std(e, *CACHE12, "--cache_retention", "1.5"), 2, "from 0 to 1"),
    Case("cache-retention-for-easycache", lambda e: std(e, "--sample_steps", "12", "--cache", "easycache",
                                                        "--cache_retention", "0.2"), 2, "unused by --cache easycache"),
    Case("cache-warmup-for-magcache", lambda e: std(e, *CACHE12, "--cache_warmup", "3"), 2,
         "unused by --cache magcache"),
    Case("cache-ratios-missing", lambda e: std(e, *CACHE12, "--cache_ratios", e.tmp / "r.json"), 2,
         "does not exist; write one with --cache_calibrate", True),
    Case("cache-ratios-not-json", lambda e: std(e, *CACHE12, "--cache_ratios", _write(e, "r.json", "{oops")), 2,
         "is not a JSON file"),
    Case("cache-ratios-not-ratios", lambda e: std(e, *CACHE12, "--cache_ratios", _write(e, "r.json", "[1, 2]")), 2,
         "is not a ratio file"),
    Case("cache-ratios-negative", lambda e: std(e, *CACHE12, "--cache_ratios", _write(e, "r.json", json.dumps(
        {"format": "wan22-magcache-ratios", "branches": ["cond", "uncond"], "ratios": [0.99, -1.0]}))), 2,
         "positive finite numbers"),
    Case("cache-calibrate-with-cache", lambda e: std(e, *CACHE12, "--cache_calibrate", e.tmp / "r.json"), 2,
         "drop --cache magcache"),
    Case("cache-calibrate-exists", lambda e: std(e, "--sample_steps", "12", "--cache_calibrate",
                                                 _write(e, "old.json", "keep")), 2, "pass --overwrite",
         keep={"old.json": b"keep"}),
    Case("cache-calibrate-folder-missing", lambda e: std(e, "--sample_steps", "12", "--cache_calibrate",
                                                         e.tmp / "no" / "r.json"), 2, "does not exist; create it"),
    Case("cache-calibrate-batch", lambda e: std(e, "--sample_steps", "12", "--cache_calibrate", e.tmp / "r.json",
                                                "--prompt_file", _prompts(e, "a cat\n"), prompt=False, save=False),
         2, "use --prompt, not --prompt_file"),
    # text-image-to-video: the image optional, its own sizes, one DiT (no LoRA)
    Case("ti2v-size-not-for-the-task", lambda e: ti2v(e, "--size", "832*480"), 2, "not supported by ti2v-tiny", True),
    Case("ti2v-5b-reference-default-size", lambda e: ["--task", "ti2v-5B", "--size", "1280*720", "--ckpt_dir",
                                                      str(e.tmp)], 2, "one of 704*1280, 1280*704", True),
    Case("ti2v-lora", lambda e: ti2v(e, "--lora_high", _write(e, "h.safetensors", b"x")), 2, "has one DiT", True),
    Case("ti2v-distilled", lambda e: ti2v(e, "--distilled"), 2, "--distilled: ti2v-tiny has one DiT"),
    Case("ti2v-image-missing", lambda e: ti2v(e, image=e.tmp / "gone.png"), 2, "--image"),
    Case("ti2v-text-named-png", lambda e: ti2v(e, image=_write(e, "p.png", "text")), 2, "is not an image Pillow"),
    Case("ti2v-image-1x1", lambda e: ti2v(e, image=_png(e, "dot.png", 1, 1)), 2, "too small to start a video"),
    Case("ti2v-extreme-aspect", lambda e: ti2v(e, image=_png(e, "strip.png", 4000, 16)), 2, "crop the image"),
    Case("ti2v-frames-not-4n+1", lambda e: ti2v(e, "--frame_num", "8"), 2, "--frame_num must be 4n+1"),
    Case("ti2v-with-a-t2v-checkpoint", lambda e: ti2v(e)[:2] + ["--ckpt_dir", str(e.ckpt)] + ti2v(e)[4:], 1,
         "Wan2.2_VAE.pth (the VAE; part of the official Wan2.2-TI2V-5B download)"),
    # the tiny model's --ckpt_dir
    Case("tiny-ckpt-is-file", lambda e: std(e, ckpt=_write(e, "ck", b"x")), 2, "is a file", True, keep={"ck": b"x"}),
    Case("tiny-ckpt-foreign", lambda e: std(e, ckpt=_write(e, "mine/notes.txt", b"n").parent), 2,
         "holds other files", True),
    Case("tiny-ckpt-under-file", lambda e: std(e, ckpt=_write(e, "blk", b"x") / "ckpt"), 2, "is a file"),
    Case("tiny-ckpt-unwritable", lambda e: std(e, ckpt="/proc/wan_tiny_ckpt"), 2, "cannot be written", True),
    # checkpoint files: read cheaply, each failure names the file
    ckpt_case("shard-truncated", lambda d: _truncate(_shard(d)), "is truncated", True),
    ckpt_case("shard-garbage", lambda d: _shard(d).write_bytes(b"\xff" * 4096), "is not a safetensors file"),
    ckpt_case("shard-empty", lambda d: _shard(d).write_bytes(b""), "too short"),
    ckpt_case("shard-missing", lambda d: _shard(d).unlink(), "missing shard"),
    ckpt_case("index-malformed", lambda d: (d / "low_noise_model" / "diffusion_pytorch_model.safetensors.index.json"
                                            ).write_text("{oops"), "index.json is not valid JSON"),
    ckpt_case("index-no-weight-map", lambda d: (d / "low_noise_model" /
                                                "diffusion_pytorch_model.safetensors.index.json").write_text("{}"),
              "no 'weight_map'"),
    ckpt_case("config-malformed", lambda d: (d / "high_noise_model" / "config.json").write_text("{"),
              "config.json is not valid JSON", True),
    ckpt_case("config-bad-value", lambda d: _edit_json(d / "high_noise_model" / "config.json", dim="big"),
              "key 'dim' must be a int"),
    ckpt_case("config-unknown-key", lambda d: _edit_json(d / "high_noise_model" / "config.json", flavour=1),
              "key 'flavour'"),
    ckpt_case("config-other-model", lambda d: _edit_json(d / "high_noise_model" / "config.json", num_layers=30),
              "num_layers=30"),
    ckpt_case("t5-corrupt-pickle", lambda d: _bad_pickle(d / T5), f"{T5} (the T5 text encoder) cannot be read", True),
    ckpt_case("t5-truncated", lambda d: _truncate(d / T5, 5000), "neither a zip"),
    ckpt_case("t5-missing", lambda d: (d / T5).unlink(), f"/ckpt/{T5}"),
    ckpt_case("vae-empty", lambda d: (d / VAE).write_bytes(b""), f"{VAE} (the VAE) is empty"),
    ckpt_case("vae-corrupt-pickle", lambda d: _bad_pickle(d / VAE), "cannot be read as a torch checkpoint"),
    ckpt_case("tokenizer-missing", lambda d: shutil.rmtree(d / TOK), "missing tokenizer folder"),
    # other weight layouts (wan/formats): every header read, key mapped and shape checked before loading
    ckpt_case("layout-mixed-folder", lambda d: (d / "model_index.json").write_text("{}"), "mixes a Diffusers layout",
              True),
    ckpt_case("layout-diffusers-incomplete", lambda d: [shutil.rmtree(d / n) for n in ("high_noise_model",
                                                                                        "low_noise_model", "google")]
              + [(d / n).unlink() for n in (T5, VAE)] + [(d / "model_index.json").write_text("{}")],
              "Diffusers-format folder"),
    Case("layout-truncated-file", lambda e: std(e, "--dit_high", _truncated(_comfy(e))), 1, "is truncated", True),
    Case("layout-wrong-task", lambda e: std(e, "--dit_low", _other_task(e, in_dim=36)), 1,
         "and in_dim 36 are not the t2v-tiny DiT's 64 and 16", True),
    Case("layout-gguf-unknown-type", lambda e: std(e, "--dit_high", _gguf_unknown(e)), 1,
         "GGUF type Q8_1, which the installed gguf package cannot dequantize"),
    Case("layout-dit-for-two-experts", lambda e: std(e, "--dit", _comfy(e)), 2, "pass --dit_high FILE and --dit_low"),
    Case("layout-flag-path-missing", lambda e: std(e, "--t5", e.tmp / "umt5.safetensors"), 2,
         "umt5.safetensors does not exist"),
    Case("layout-no-tokenizer", lambda e: _only_files(e, "--tokenizer"), 2, "pass --tokenizer DIR"),
    # an I2V task takes the same flags; a T2V expert file (in_dim 16) is refused from its header, before loading
    Case("layout-t2v-dit-for-i2v", lambda e: _only_files(e, task="i2v-tiny") + [
        *FAST[2:], "--image", str(_png(e, "a.png")), "--dit_high", str(_comfy(e)), "--dit_low", str(_comfy(e))],
         1, "and in_dim 16 are not the i2v-tiny DiT's 64 and 36", True),
    Case("layout-t2v-expert-folder-for-i2v", lambda e: _only_files(e, task="i2v-tiny") + [
        *FAST[2:], "--image", str(_png(e, "a.png"))], 1, "in_dim=16 (expected 36)"),
    Case("layout-i2v-no-ckpt-no-files", lambda e: _only_files(e, "--dit_high", "--dit_low", "--t5", "--vae",
                                                               "--tokenizer", task="i2v-A14B")
         + ["--image", str(_png(e, "a.png"))], 2, "official Wan2.2-I2V-A14B download"),
    Case("layout-no-ckpt-no-files", lambda e: _only_files(e, "--dit_high", "--dit_low", "--t5", "--vae",
                                                           "--tokenizer"), 2, "or per-component files"),
    # TI2V-5B with the layouts and the step cache: its DiT flag, its VAE, MagCache without a published curve
    Case("ti2v-dit-high", lambda e: ti2v(e, "--dit_high", _comfy(e)), 2,
         "ti2v-tiny has one DiT; pass it with --dit FILE", True),
    Case("ti2v-wan21-vae", lambda e: _ti2v_files(e, "--vae", e.ckpt / VAE), 1,
         "is a Wan 2.1 VAE (encoder.conv1 takes 3 channels, 16 latent channels); this task needs the Wan 2.2 VAE"),
    Case("ti2v-5b-files-without-dit", lambda e: ["--task", "ti2v-5B", "--device", "cpu", "--prompt", "a cat",
                                                 "--save_file", str(e.out), "--t5", str(e.ckpt / T5)], 2,
         "pass --dit FILE, --vae FILE, --tokenizer DIR"),
    Case("t2v-wan22-vae", lambda e: std(e, "--vae", _vae22(e)), 1, "is a Wan 2.2 VAE", True),
    Case("ti2v-magcache-without-ratios", lambda e: ti2v(e, "--sample_steps", "12", "--cache", "magcache"), 2,
         "--cache magcache needs --cache_ratios FILE for ti2v", True),
    ckpt_case("tokenizer-json-malformed", lambda d: (d / TOK / "tokenizer.json").write_text("[1,"),
              "tokenizer.json is not valid JSON"),
]


def _check_error(code, err, case: Case):
    assert code == case.code, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert case.needle in lines[-1], lines[-1]
    assert "Traceback" not in err


def _check_left(tmp: Path, before: dict[str, bytes], case: Case):
    """Nothing new next to the target, no temporary file anywhere, kept files unchanged."""
    after = {str(p.relative_to(tmp)) for p in tmp.rglob("*")}
    assert not [p for p in after if p.endswith((".tmp.mp4", ".prb.mp4"))], after
    assert not (tmp / "out.mp4").exists()
    assert after == set(before), sorted(after ^ set(before))
    for name, data in case.keep.items():
        assert (tmp / name).read_bytes() == data


def _snapshot(tmp: Path) -> dict:
    return {str(p.relative_to(tmp)): None for p in tmp.rglob("*")}


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model, or writing the tiny checkpoint, fails loudly: refusals must come before either."""
    import wan.image2video as i2v_module
    import wan.testing.tiny as tiny
    import wan.text2video as t2v
    import wan.textimage2video as ti2v_module

    class NoPipeline:
        def __init__(self, *a, **k):
            raise AssertionError("SENTINEL: a model was loaded")

    real = tiny.ensure_tiny_checkpoint

    def ensure(ckpt_dir=None, task="t2v-tiny"):
        if ckpt_dir is None or not (Path(ckpt_dir) / tiny.MARKER).is_file():
            raise AssertionError("SENTINEL: the tiny checkpoint was written")
        return real(ckpt_dir, task)

    monkeypatch.setattr(t2v, "WanT2V", NoPipeline)
    monkeypatch.setattr(i2v_module, "WanI2V", NoPipeline)
    monkeypatch.setattr(ti2v_module, "WanTI2V", NoPipeline)
    monkeypatch.setattr(tiny, "ensure_tiny_checkpoint", ensure)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case, tmp_path, tiny_ckpt, no_loading, capsys, monkeypatch):
    if case.id == "device-cuda9" and __import__("torch").cuda.device_count() > 9:
        pytest.skip("ten GPUs here")
    monkeypatch.chdir(tmp_path)
    e = Env(tmp_path, tiny_ckpt)
    argv = case.argv(e)
    before = _snapshot(tmp_path)
    code = generate.main(argv)
    err = capsys.readouterr().err
    assert "SENTINEL" not in err, err
    _check_error(code, err, case)
    _check_left(tmp_path, before, case)


def run_cli(argv, env=None, timeout=120):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "generate.py", *argv], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})})
    return res, time.monotonic() - t0


SUB_CASES = [c for c in CASES if c.sub]


@pytest.mark.parametrize("case", SUB_CASES, ids=[c.id for c in SUB_CASES])
def test_bad_input_subprocess(case, tmp_path, tiny_ckpt):
    e = Env(tmp_path, tiny_ckpt)
    argv = case.argv(e)
    before = _snapshot(tmp_path)
    res, _ = run_cli(argv)
    _check_error(res.returncode, res.stderr, case)
    assert "loaded " not in res.stdout and "writing the tiny" not in res.stdout, res.stdout  # refused up front
    assert "denoise" not in res.stderr
    _check_left(tmp_path, before, case)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA refusal")
def test_a14b_without_cuda_refuses_with_the_fix(tmp_path):
    res, secs = run_cli(["--task", "t2v-A14B", "--ckpt_dir", str(tmp_path), "--save_file", str(tmp_path / "o.mp4")])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: t2v-A14B needs a CUDA GPU")
    assert "--device cpu" in res.stderr and "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []


def test_a14b_diffusers_layout_named(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    res, _ = run_cli(["--task", "t2v-A14B", "--device", "cpu", "--ckpt_dir", str(tmp_path), "--save_file",
                      str(tmp_path / "o.mp4")])
    assert res.returncode == 1 and "Diffusers-format" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["model_index.json"]


# ---- process-level behaviour: signals, the write race, batch mode, a long emoji prompt ----------------------------
class Running:
    """A generate.py process whose stdout and stderr are collected as they come (tqdm writes without newlines)."""

    def __init__(self, argv, env=None):
        self.p = subprocess.Popen([sys.executable, "generate.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        self.out, self.err = [], []
        self.threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                        for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf.append(chunk.decode(errors="replace"))

    def text(self) -> tuple[str, str]:
        return "".join(self.out), "".join(self.err)

    def wait_for(self, cond, timeout=90):
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.p.poll() is None, f"exited early with {self.p.returncode}: {self.text()}"
            assert time.monotonic() < deadline, f"timed out waiting: {self.text()}"
            time.sleep(0.05)

    def finish(self, timeout=60) -> int:
        try:
            code = self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
        for t in self.threads:
            t.join(5)
        return code


def _temps(folder: Path) -> list[Path]:
    """The video being written (not the up-front writability probe, which is named *.prb.mp4)."""
    return [p for p in folder.iterdir() if p.name.endswith(".tmp.mp4")]


@pytest.mark.parametrize("sig,stage", [(signal.SIGINT, "denoise"), (signal.SIGTERM, "denoise"),
                                       (signal.SIGINT, "write"), (signal.SIGTERM, "write")],
                         ids=["SIGINT-denoise", "SIGTERM-denoise", "SIGINT-write", "SIGTERM-write"])
def test_signal_ends_cleanly(sig, stage, tmp_path, tiny_ckpt):
    e = Env(tmp_path, tiny_ckpt)
    if stage == "denoise":
        run = Running(std(e, "--sample_steps", "1000"))
        run.wait_for(lambda: "t=" in run.text()[1])  # the denoise bar has shown a step: inside the loop
    else:
        run = Running(std(e), env={"WAN_TEST_WRITE_DELAY_S": "1.0"})
        run.wait_for(lambda: bool(_temps(tmp_path)))  # the temporary video exists
    run.p.send_signal(sig)
    code = run.finish()
    out, err = run.text()
    name = signal.Signals(sig).name
    assert code == 128 + sig, (code, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted by {name}; nothing written"), err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file


def test_target_appearing_during_the_write_is_kept(tmp_path, tiny_ckpt):
    e = Env(tmp_path, tiny_ckpt)
    run = Running(std(e), env={"WAN_TEST_WRITE_DELAY_S": "0.5"})
    run.wait_for(lambda: bool(_temps(tmp_path)))
    e.out.write_bytes(b"other")  # another process wins the name
    code = run.finish()
    err = run.text()[1]
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: output file") and "appeared while the video was being written" in last
    assert "Traceback" not in err and e.out.read_bytes() == b"other" and list(tmp_path.iterdir()) == [e.out]


def test_batch_skips_bad_lines_and_reports_them(tmp_path, tiny_ckpt):
    import imageio_ffmpeg

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n\na cat boxing\n\u200b\u200b\n  two dogs dancing  \n", encoding="utf-8")
    out = tmp_path / "videos"
    out.mkdir()
    e = Env(tmp_path, tiny_ckpt)
    res, _ = run_cli(std(e, "--prompt_file", prompts, "--save_dir", out, "--base_seed", "3", prompt=False,
                         save=False))
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 prompts failed (lines 4 of") and "2 videos written" in last, last
    assert "Traceback" not in res.stderr
    assert "line 4 of" in res.stdout and "[2/2] line 5: saved" in res.stdout and "s per video" in res.stdout
    assert res.stdout.count("loaded in") == 1  # the models load once
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0].startswith("t2v-tiny_64*64_0000_a_cat_boxing_")
    assert names[1].startswith("t2v-tiny_64*64_0002_two_dogs_dancing_")  # the bad line keeps its index
    assert all(imageio_ffmpeg.count_frames_and_secs(str(out / n))[0] == 5 for n in names)


def test_long_emoji_prompt_gets_a_safe_default_name(tmp_path, tiny_ckpt):
    e = Env(tmp_path, tiny_ckpt)
    res, _ = run_cli(std(e, "--prompt", "\U0001f431/\u200b" * 200, "--save_dir", tmp_path, save=False))
    assert res.returncode == 0, res.stderr
    (video,) = list(tmp_path.iterdir())
    assert len(os.fsencode(video.name)) <= 160 and "/" not in video.name and "\u200b" not in video.name


def test_second_signal_during_clean_up_exits_at_once_and_removes_the_temp(tmp_path):
    """A second Ctrl-C while the first one's clean-up is still running: leave now, temporary videos removed."""
    tmp = tmp_path / ".v.mp4.00000000.tmp.mp4"
    code = f"""
import os, signal, time
from pathlib import Path
from wan.utils import video
from wan.utils.interrupt import Interrupted, handle_signals
tmp = Path({str(tmp)!r})
tmp.write_bytes(b"partial")
video._LIVE_TEMP_FILES.add(tmp)
with handle_signals():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except Interrupted:
        os.kill(os.getpid(), signal.SIGTERM)  # the clean-up is slow; a second signal arrives
        time.sleep(5)
print("not reached")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 143 and "not reached" not in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("error: interrupted again by SIGTERM")
    assert not tmp.exists()
