"""The GPU backlog: OPTIMIZATION.md's "Built, not yet measured on a GPU" as one command, for calls of a few minutes
each on a bare GPU machine:

    python -m benchmarks.backlog --deadline 540 --out DIR [--done FOLDER ...] [--rows a,b] [--list]

Rows run in priority order (ROWS), each in its own process group, with the time left as its own --deadline where
the benchmark takes one; when the backlog's deadline comes the running row's whole group is stopped (SIGINT, then
SIGTERM, then SIGKILL). A row whose estimate does not fit the time left is not started; a smaller one after it may
be. Each row's result is written the moment it ends, atomically: DIR/<gpu>_<row>.json, the benchmark's own JSON
(or the pytest report) plus a "backlog" record (argv, code version, GPU, times, exit code, status, output tail).

A row measured "ok" with the same command at the same code version on the same GPU model (a result file in DIR or
any --done folder) is skipped, so two or three calls finish the list. The code version is a hash of the code's bytes
(wan/, benchmarks/ without results/ and this tool, tests/, generate.py): the same on a copied tree without .git (the
GPU machine), unchanged when only results, documents or the backlog's estimates change, and different for any code
change, committed or not. A row measured ok only at an earlier code version (the committed results that the documents
cite) is skipped too, so a later session starts with what was never measured; `--stale` measures such rows again.
`--list` prints the plan (what would run, what is done, what does not fit) and runs nothing; it works on a CPU.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.emulate import ENV as EMULATE_ENV
from benchmarks.waterfall import ROOT, git, git_commit
from wan.options import FAST_PRESET, fast_options

OUT, DEADLINE = "{out}", "{deadline}"  # placeholders in a row's argv / env: its JSON file, its seconds left
WRAP_UP_S = 20  # a row's own --deadline ends this much before the backlog's: time to write its JSON and exit
STOP = ((signal.SIGINT, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))  # (signal, seconds to wait after it)
TAIL_CHARS = 3000
CODE_PATHS = ("wan", "benchmarks", "tests", "generate.py")
# results, and this tool (its estimates and table): a row's own command is compared separately (Row.command)
NOT_CODE = ("benchmarks/results", "benchmarks/backlog.py", "tests/test_backlog.py")
IGNORED_DIRS = {"__pycache__", "build"}  # and hidden folders, *.egg-info (as .gitignore)
IGNORED_SUFFIXES = (".pyc", ".mp4")


@dataclass(frozen=True)
class Row:
    name: str
    argv: tuple[str, ...]  # "python", "-m", module, ...: OUT and DEADLINE filled in when it starts
    estimate_s: float  # wall seconds on an H100 / H200: process start, random full-size build, compile, timing
    measures: str
    gpus: tuple[str, ...] = ()  # GPU slugs (gpu_slug) it is for; () = any
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables (placeholders allowed)
    key: Callable[[dict], str] | None = None  # the row's headline numbers from its record (for the summary)

    def command(self) -> list[str]:
        """What the row runs, as recorded: a result counts as this row's only while this stays the same."""
        return [*self.argv, *(f"{k}={v}" for k, v in self.env)]


def _whole_run_key(r: dict) -> str:
    run = r["whole_run"]
    return f"{run['first_video_s']:.0f} s, peak {run['runs'][0]['peak_reserved_gb']:.1f} GB reserved"


def _pytest_key(r: dict) -> str:
    counts = collections.Counter(t.get("outcome", "?") for t in r["tests"].values())
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))


def _tiers_key(r: dict) -> str:
    base = r["rows"][0]
    return "; ".join(f"x{x['per_forward_s'] / base['per_forward_s']:.3f} of resident, {x['peak_reserved_gb']:.1f} GB "
                     "reserved" for x in r["rows"][1:])


def _fp8_key(r: dict) -> str:
    bf16, fp8 = r["fewstep"], r["variants"][0]
    return (f"fp8 {fp8['steady_video_s']['median']:.1f} s vs bf16 {bf16['steady_video_s']['median']:.1f} s per "
            f"video; fp8 experts {fp8['expert_weights_gb']['both']:.1f} GB on the GPU")


def _waterfall_key(r: dict) -> str:
    rows = ", ".join(f"{x['per_forward_s']:.2f}" if "error" not in x else "error" for x in r["rows"])
    peer = r.get("peer") or {}
    return f"s/forward {rows}" + (f"; peer {peer['per_forward_s']:.2f}" if "per_forward_s" in peer else "")


def _full_key(r: dict) -> str:
    return (f"{r['first_video_s']:.0f} s, peak {r['runs'][0]['peak_reserved_gb']:.1f} GB reserved, "
            f"{r['cli_plan']['free_gb']:.1f} GB free before the build")


def _fewstep_key(r: dict) -> str:
    row = r.get("row_40_steps")  # absent with --skip row
    return (f"4-step video {r['fewstep']['steady_video_s']['median']:.1f} s"
            + (f"; 40-step row {row['per_forward_s']:.2f} s/forward" if row and "per_forward_s" in row else ""))


def _cache_ab_key(r: dict) -> str:
    ab = r["cache_ab"]
    err = ab["video_vs_uncached"]
    return (f"video {ab['video_s']['uncached']:.0f} -> {ab['video_s']['cached']:.0f} s ({ab['video_ratio']:.3f}x), "
            f"DiT {ab['dit_ratio']:.3f}x, {ab['cache']['computed_calls']}/{ab['cache']['calls']} calls; PSNR "
            f"{err['psnr_mean_db']:.1f} dB, SSIM {err['ssim_mean']:.3f}, latent rel {ab['latent_rel_diff']:.1e}")


def _cache_cost_key(r: dict) -> str:
    cost = r["rows"][-1]["cache_cost"]
    mag = cost["magcache"]
    return (f"reused step {mag['reused_over_computed']:.1%} (magcache), "
            f"{cost['easycache']['reused_over_computed']:.1%} (easycache) of a computed one; magcache DiT projected "
            f"{mag['projected_dit_ratio']:.3f}x")


def _vae_key(r: dict) -> str:
    vae = r["vae"]
    parts = [f"{k} {v['decode_s']:.1f} s / {v['peak_gb']:.1f} GB" + (f" (max abs {v['max_abs_vs_fp32']:.1e})" if
             "max_abs_vs_fp32" in v else "") + (f", banded {v['banded']['decode_s']:.1f} s / "
                                                f"{v['banded']['peak_gb']:.1f} GB" if "banded" in v else "")
             for k, v in vae.items()]
    return "; ".join(parts)


def _bench(module: str, *args: str, deadline: bool = True) -> tuple[str, ...]:
    return ("python", "-m", f"benchmarks.{module}", *args, *(("--deadline", DEADLINE, "--out", OUT) if deadline
                                                               else ()))


_FAST = json.dumps(fast_options().changed())  # generate.py --fast
_FEWSTEP_OPTIONS = json.dumps({**FAST_PRESET, "vae_dtype": "bf16"})
_FP8_VARIANT = "fp8 all + flash3_fp8=" + json.dumps({"fp8_linear": "all", "attn_backend": "flash3_fp8"})
_FAST_FP8 = json.dumps({**fast_options().changed(), "fp8_linear": "all", "attn_backend": "flash3_fp8"})


def _cache_ab(options: str, cache: str) -> tuple[str, ...]:
    """A whole 480p 40-step video with `options`, then with a step cache, on the same weights (benchmarks.rows full):
    a one-step generation first compiles, so both timed videos are steady."""
    return _bench("rows", "--res", "480p", "full", "--options", options, "--sampling_steps", "40", "--repeat", "0",
                  "--warmup_steps", "1", "--cache_variant", json.dumps({"cache": cache}), deadline=False)


# The GPU test files (pytest collects only these on the GPU machine: CPU-only test modules may import packages that
# the GPU image lacks); tests/test_backlog.py checks that every test marked gpu lives in one of them.
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_gpu_fp8.py", "tests/test_gpu_load.py", "tests/test_gpu_vae.py",
                  "tests/test_qk_rope.py")

# Priority order (issue 18, then issue 19's I2V rows, then issue 21's TI2V rows). Estimates: measured on an H100 at
# a34a1b2 where a row ran there (benchmarks/results/backlog/), else the committed H200 results plus about 15%, each
# rounded up: process start, random full-size experts built on the GPU (and pinned on the host when streamed),
# compile, the timed part.
ROWS: tuple[Row, ...] = (
    Row("whole_720p_24gb", _bench("memory_tiers", "--res", "720p", "--whole_run", "24", "--only_whole_run"), 240,
        "the whole 720p --fast run under a 24 GB cap (T5 streamed by layers, 4 Euler steps with CFG over both "
        "experts, banded VAE decode): target at most 22 GB reserved", key=_whole_run_key),
    Row("gpu_tier", ("python", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES), 300,
        "the GPU test tier (tests marked gpu): band-order VAE at 720p bf16 (6 GB target), the fused q/k kernel, FFN "
        "chunks, copy/compute overlap, fp8 kernels, build and load peaks, the I2V encode, step caching, the tiny "
        "TI2V pipeline and the Wan 2.2 VAE (streamed T5 is measured by the whole-run rows)",
        env=(("WAN_GPU_REPORT", OUT),), key=_pytest_key),
    Row("stream_480p_16gb", _bench("memory_tiers", "--res", "480p", "--caps", "16", "--ffn_chunks", "4"), 330,
        "480p resident, then block-streamed under a 16 GB cap without and with the FFN in 4 token chunks: target at "
        "most 1.15x resident", key=_tiers_key),
    Row("whole_480p_16gb", _bench("memory_tiers", "--res", "480p", "--whole_run", "16", "--only_whole_run"), 220,
        "the whole 480p --fast run under a 16 GB cap (the memory plan's choice, its peak)", key=_whole_run_key),
    Row("fewstep_720p_fp8", _bench("fewstep", "--res", "720p", "--skip", "row,stages", "--repeat", "2", "--options",
                                   _FEWSTEP_OPTIONS, "--variant", _FP8_VARIANT), 420,
        "the 4-step 720p video with fp8 linears and fp8 attention beside the bf16 one, its error and the GB of both "
        "fp8 experts on the GPU: targets at most 35 s and 34 GB", key=_fp8_key),
    Row("i2v_waterfall_720p", _bench("waterfall", "--task", "i2v", "--res", "720p", "--rows", "1,8", "--beside_t2v",
                                     "--stages", "--steps", "3"), 480,
        "I2V 720p: the original I2V path (bf16 experts offloaded), I2V --fast and T2V --fast beside it at the same "
        "tokens, with the stage costs: target I2V within 2% of T2V per forward", key=_waterfall_key),
    Row("i2v_encode_720p", _bench("rows", "stages", "--task", "i2v", "--res", "720p", "--vae_dtypes", "fp32,bf16",
                                  deadline=False), 150,
        "I2V 720p: the condition's VAE encode in fp32 (the reference) and bf16, plain and --fast_encode, equality "
        "checked"),
    Row("i2v_fewstep_720p", _bench("fewstep", "--task", "i2v", "--res", "720p", "--skip", "row"), 420,
        "I2V 720p: a 4-step video with a random rank-64 LoRA pair: target at most 45 s", key=_fewstep_key),
    Row("i2v_cli_720p_fast", _bench("rows", "--task", "i2v", "--res", "720p", "full", "--cli_plan", "--options", _FAST,
                                    "--sampling_steps", "4", "--solver", "euler", "--shift", "5", "--guide", "3.5",
                                    "3.5", "--repeat", "0", deadline=False), 240,
        "I2V 720p: the plain --fast whole run (fp32 encode and decode, 4 Euler steps with CFG) on the plan generate.py "
        "picks for the card's free memory (an 80 GB H100: resident, VAE in bands, the plain encode, 78.3 GB "
        "planned): its peak against the plan", key=_full_key),
    # step caching (issue 22): estimates from h200_480p_full_generation.json (218 s per --fast video, 17 s build) and
    # the 720p waterfall rows, plus about 15% for an H100
    # checkpoint layouts (issue 20): one random A14B expert in bf16 written in each layout (one on disk at a time,
    # 28.6 GB at most), its load onto the GPU timed against the official layout's
    Row("cache_480p_magcache", _cache_ab(_FAST, "magcache"), 500,
        "a whole 480p 40-step --fast video without and with --cache magcache (published settings, 52 of 80 calls) on "
        "the same weights: video and DiT seconds, latent drift and decoded-video PSNR / SSIM against the uncached "
        "video (random weights: numerics, not quality)", key=_cache_ab_key),
    Row("cache_720p_projection", _bench("waterfall", "--res", "720p", "--rows", "8", "--steps", "3", "--cache_cost",
                                        "magcache,easycache"), 330,
        "720p --fast: a reused step of each cache against a computed one, through the real loop (target: at most 3%), "
        "and MagCache's 40-step DiT time projected from them and its schedule (target: at most 0.67x)",
        key=_cache_cost_key),
    Row("ti2v_waterfall_720p", _bench("waterfall", "--task", "ti2v", "--res", "720p", "--rows", "0,1,8", "--steps",
                                      "3"), 330,
        "TI2V-5B 720p (1280x704, 121 frames, image mode): the original path (fp32 weights, as the reference on an "
        "80 GB card), bf16 weights, and --fast per forward: target --fast at least 1.4x the original path",
        key=_waterfall_key),
    Row("ti2v_vae_720p", _bench("rows", "stages", "--task", "ti2v", "--res", "720p", "--vae_dtypes", "fp32,bf16",
                                "--vae_bands", "4", deadline=False), 300,
        "TI2V-5B: the Wan 2.2 VAE decode of 1280x704 x 121 in fp32 and bf16 (its error against fp32), whole and in "
        "4 bands (peak, time, difference), and the one-frame image encode", key=_vae_key),
    Row("ti2v_full_720p", _bench("rows", "--task", "ti2v", "--res", "720p", "full", "--cli_plan", "--options", _FAST,
                                 "--sampling_steps", "50", "--shift", "5", "--guide", "5", "5", "--repeat", "0",
                                 deadline=False), 360,
        "TI2V-5B 720p: a whole 50-step --fast video (image mode: T5, the image's encode, 50 steps with CFG, fp32 "
        "decode) on the plan generate.py picks for the card's free memory, end to end", key=_full_key),
    Row("ti2v_tiers_720p", _bench("memory_tiers", "--task", "ti2v", "--res", "720p", "--caps", "16,24"), 420,
        "TI2V-5B 720p per forward: resident --fast, then block-streamed under 24 and 16 GB caps: targets at most "
        "1.05x / 1.15x the resident time", key=_tiers_key),
    Row("ti2v_whole_720p_24gb", _bench("memory_tiers", "--task", "ti2v", "--res", "720p", "--whole_run", "24",
                                       "--only_whole_run"), 240,
        "TI2V-5B: the whole 720p --fast run under a 24 GB cap (the memory plan's choice: planned resident with T5 "
        "streamed by layers, VAE in 4 bands, 19.7 GB): target at most 22 GB reserved", key=_whole_run_key),
    Row("ti2v_whole_720p_16gb", _bench("memory_tiers", "--task", "ti2v", "--res", "720p", "--whole_run", "16",
                                       "--only_whole_run"), 240,
        "TI2V-5B: the whole 720p --fast run under a 16 GB cap (planned block-streamed, VAE in 4 bands, 10.0 GB): "
        "its peak", key=_whole_run_key),
    Row("cache_480p_easycache", _cache_ab(_FAST, "easycache"), 500,
        "the 480p A/B with --cache easycache (adaptive: on random weights its schedule shows the mechanics, not the "
        "reuse real weights allow)", key=_cache_ab_key),
    Row("cache_480p_magcache_fp8", _cache_ab(_FAST_FP8, "magcache"), 480,
        "the 480p A/B of --cache magcache on top of the fp8 tier (fp8 linears and fp8 attention in both videos)",
        key=_cache_ab_key),
    # issue 21 (TI2V-5B): estimates from the A14B rows scaled by the model (5B, 27,280 tokens at 1280x704 x 121) and
    # the Wan 2.2 VAE's counted decode work (1006 TMAC at 720p x 121, about 3x the 2.1 decode's); none measured yet
    Row("layouts_a14b_comfy", _bench("layouts", "--size", "a14b", "--device", "cuda", "--repeat", "2", "--layouts",
                                     "official,comfy_bf16,fp8_scaled", "--out", OUT, deadline=False), 420,
        "load time onto the GPU of one A14B expert: official, ComfyUI bf16, fp8_scaled (target: within 10% of the "
        "official layout's for the same dtype)"),
    Row("layouts_a14b_diffusers", _bench("layouts", "--size", "a14b", "--device", "cuda", "--repeat", "2",
                                         "--layouts", "official,diffusers,gguf_q8_0", "--out", OUT, deadline=False),
        420, "load time onto the GPU of one A14B expert: official, Diffusers, GGUF Q8_0"),
    # issue 18's rows left after the H100 sessions: an H200's peer re-measure, the CLI row again (--fast gained
    # fast_encode, a no-op for t2v), the 4-step LoRA video beside 40 steps (its bf16 4-step video is in the fp8 row)
    Row("waterfall_720p_peer", _bench("waterfall", "--res", "720p", "--rows", "8", "--peer", "--steps", "3"), 300,
        "720p: the --fast row and the diffusers peer, three timed steps / forwards each (the + fused_qk_rope row "
        "waits for the kernel to compile: refused with --compile since the H100 run)", key=_waterfall_key),
    Row("waterfall_720p_h100", _bench("waterfall", "--res", "720p", "--rows", "1,8", "--peer", "--steps", "3"), 420,
        "H100 720p: the reference's single-GPU setting, --fast and the peer in one run", gpus=("h100",),
        key=_waterfall_key),
    Row("cli_720p_fast", _bench("rows", "--res", "720p", "full", "--cli_plan", "--options", _FAST, "--sampling_steps",
                                "4", "--solver", "euler", "--shift", "5", "--guide", "3", "4", "--repeat", "0",
                                deadline=False), 180,
        "H100 720p: the plain --fast whole run (4 Euler steps with CFG over both experts: 40 do not fit a call) on "
        "the plan generate.py picks for the card's free memory; its peak", gpus=("h100",), key=_full_key),
    Row("fewstep_720p", _bench("fewstep", "--res", "720p", "--repeat", "2"), 470,
        "H100 720p: a 4-step LoRA video beside the 40-step --fast row", gpus=("h100",), key=_fewstep_key),
)


# --- where and what: GPU, code version, results already measured ------------------------------------------------

def gpu_name() -> str:
    """torch.cuda.get_device_name(0), asked in a child process so this one holds no CUDA context (the rows plan for
    the card's free memory); "cpu" without CUDA."""
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else "cpu"


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200'; else the name in lower case and dashes."""
    low = name.lower()
    m = re.search(r"\b[a-z]{1,3}\d{2,4}[a-z]?\b", low.replace("nvidia", ""))
    return m.group(0) if m else re.sub(r"[^a-z0-9]+", "-", low).strip("-") or "unknown"


def code_files(root: Path = ROOT) -> list[Path]:
    """The files whose bytes make the code version, sorted: CODE_PATHS without NOT_CODE, caches and hidden files."""
    files = []
    for top in CODE_PATHS:
        path = root / top
        if path.is_file():
            files.append(path)
            continue
        for folder, dirs, names in os.walk(path):
            rel = Path(folder).relative_to(root).as_posix()
            dirs[:] = [d for d in dirs if not (d.startswith(".") or d in IGNORED_DIRS or d.endswith(".egg-info")
                                               or f"{rel}/{d}" in NOT_CODE)]
            files += [Path(folder) / n for n in names if not (n.startswith(".") or n.endswith(IGNORED_SUFFIXES)
                                                                or f"{rel}/{n}" in NOT_CODE)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def code_version(root: Path = ROOT) -> str:
    """'code-' + 12 hex digits of a SHA-256 over the code files' relative paths and bytes."""
    h = hashlib.sha256()
    for f in code_files(root):
        data = f.read_bytes()
        h.update(f"{f.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return "code-" + h.hexdigest()[:12]


def find_done(folders: list[Path], rows, slug: str, version: str | None) -> dict[str, Path]:
    """Row name -> a result file (in any of `folders`) that measured it ok, with the same command, at code
    `version` (None: at any code version) on a `slug` GPU."""
    commands = {row.name: row.command() for row in rows}
    done = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                rec = json.loads(path.read_text()).get("backlog")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(rec, dict) and rec.get("status") == "ok" and version in (None, rec.get("code_version")) \
                    and rec.get("gpu_slug") == slug and rec.get("command") == commands.get(rec.get("row")):
                done.setdefault(rec["row"], path)
    return done


def plan(rows, slug: str, done: dict[str, Path], chosen: bool, earlier: dict[str, Path] | None = None
         ) -> list[tuple[Row, str]]:
    """(row, why) for every row: why is "pending", or the reason it is skipped. Rows named by --rows (`chosen`) run
    on any GPU; the others only on the GPUs they are for. `earlier`: rows measured ok only at other code versions,
    skipped too (their files are what the documents cite; --stale leaves this empty to measure them again)."""
    out, earlier = [], earlier or {}
    for row in rows:
        if row.name in done:
            out.append((row, f"done: ok at this code version on {slug} ({done[row.name]})"))
        elif row.name in earlier:
            out.append((row, f"done: ok at an earlier code version on {slug} ({earlier[row.name]}; --stale "
                             "measures it again)"))
        elif row.gpus and slug not in row.gpus and not chosen:
            out.append((row, f"not for this GPU (for {', '.join(row.gpus)}; name it in --rows to run it anyway)"))
        else:
            out.append((row, "pending"))
    return out


# --- running one row ---------------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGTERM to the backlog: raised in the main thread, so the running row is stopped and recorded."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def group_alive(pgid: int) -> bool:
    """Whether process group `pgid` has a member that is not a zombie (Linux /proc; else any member)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, pgrp = text[text.rindex(")") + 2:].split()[:3]  # fields after "pid (comm) "
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


def stop_group(proc: subprocess.Popen) -> None:
    """Stop every process of `proc`'s group (it leads a session of its own): each signal of STOP in turn until
    none is left; `proc` is reaped."""
    for sig, wait in STOP:
        proc.poll()
        if not group_alive(proc.pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end and (proc.poll() is None or group_alive(proc.pid)):
            time.sleep(0.05)
    proc.wait()


def run_in_group(argv: list[str], env: dict, log: Path, kill_at: float) -> tuple[int, bool]:
    """Run argv in a new session (its own process group), stdout and stderr to `log`; stop the whole group at
    `kill_at` (time.monotonic()). Returns (exit code, timed out); no process of the group is left, also when the
    backlog is interrupted."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=max(kill_at - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        stop_group(proc)  # also after a normal end: workers it left behind (compile pools) hold GPU memory
    return proc.returncode, timed_out


def read_result(path: Path, output: str):
    """The row's JSON: its --out / report file, else the last `RESULT {json}` line of its output (benchmarks.rows);
    None if neither."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    for line in reversed(output.splitlines()):
        if line.startswith("RESULT "):
            with contextlib.suppress(ValueError):
                return json.loads(line[len("RESULT "):])
    return None


def errors_in(record, where: str = "") -> list[str]:
    """'path: message' for every "error" entry in a benchmark record (a part it could not run, out of time, OOM) and
    every failed test of a pytest report: such a row is not ok, even with exit code 0."""
    found = []
    if isinstance(record, dict):
        for k, v in record.items():
            if k == "error":
                found.append(f"{where or '.'}: {str(v)[-200:]}")
            elif k == "outcome" and v not in ("passed", "skipped"):
                found.append(f"{where}: {v}")
            else:
                found += errors_in(v, f"{where}.{k}" if where else k)
    elif isinstance(record, list):
        for i, v in enumerate(record):
            found += errors_in(v, f"{where}[{i}]")
    return found


def write_json_atomic(path: Path, record: dict) -> None:
    """Write `record` to `path` through a temporary file in the same folder and a rename: a reader sees the old file
    or the whole new one, and no temporary file is left behind (Ctrl-C, SIGTERM, a full disk)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_row(row: Row, out_dir: Path, kill_at: float, info: dict) -> dict:
    """Run one row until it ends or `kill_at`; write out_dir/<gpu>_<row>.json at once. Returns its backlog record."""
    work = Path(tempfile.mkdtemp(prefix="backlog_"))
    raw, log = work / "result.json", work / "output.log"
    fill = {OUT: str(raw), DEADLINE: f"{max(kill_at - time.monotonic() - WRAP_UP_S, 1):.0f}"}

    def filled(text: str) -> str:
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    argv = [sys.executable if i == 0 and a == "python" else filled(a) for i, a in enumerate(row.argv)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: filled(v) for k, v in row.env}}
    rec = dict(row=row.name, command=row.command(), argv=argv, **info, estimate_s=row.estimate_s, started=_now())
    t0 = time.monotonic()
    code, status = None, "interrupted"
    try:
        code, timed_out = run_in_group(argv, env, log, kill_at)
        status = "timed_out" if timed_out else "failed"
    finally:  # also when the backlog is interrupted: the row is stopped (run_in_group) and recorded
        output = log.read_text(errors="replace") if log.is_file() else ""
        result = read_result(raw, output)
        errors = errors_in(result) if result is not None else ["no result: the row wrote no JSON"]
        if status == "failed" and code == 0 and not errors:
            status = "ok"
        rec.update(ended=_now(), wall_s=round(time.monotonic() - t0, 1), exit_code=code, status=status,
                   errors=errors[:20], output_tail=output[-TAIL_CHARS:])
        body = result if isinstance(result, dict) else {"result": result}
        rec["file"] = str(out_dir / f"{info['gpu_slug']}_{row.name}.json")
        write_json_atomic(Path(rec["file"]), {**body, "backlog": rec})
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(Exception):
            rec["key"] = row.key(result) if row.key and status == "ok" else ""
    return rec


def run_backlog(rows: list[Row], out_dir: Path, deadline_s: float, start: float, info: dict) -> list[dict]:
    """Run `rows` in order within `deadline_s` seconds from `start` (time.monotonic()): a row starts only if its
    estimate fits the time left. Returns one record per row (skipped ones included)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kill_at = start + deadline_s
    done = []
    for row in rows:
        left = kill_at - time.monotonic()
        if row.estimate_s > left:
            print(f"[{time.monotonic() - start:5.0f} s] {row.name}: not started, estimate {row.estimate_s:.0f} s > "
                  f"{int(left)} s left", flush=True)
            done.append(dict(row=row.name, status="skipped_deadline", estimate_s=row.estimate_s, left_s=int(left)))
            continue
        print(f"[{time.monotonic() - start:5.0f} s] {row.name}: start (estimate {row.estimate_s:.0f} s, {left:.0f} s "
              "left)", flush=True)
        rec = run_row(row, out_dir, kill_at, info)
        done.append(rec)
        print(f"[{time.monotonic() - start:5.0f} s] {row.name}: {rec['status']} after {rec['wall_s']:.0f} s, exit "
              f"{rec['exit_code']}, {rec['file']}" + (f": {rec['key']}" if rec.get("key") else ""), flush=True)
        if rec["status"] != "ok":
            print("  " + "\n  ".join(rec["errors"][:5]) + "\n  output ends:\n" + rec["output_tail"][-1500:],
                  flush=True)
    return done


# --- the command -------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deadline", type=float, default=540, help="seconds from the start: no row runs past it")
    p.add_argument("--out", default="backlog_out", help="folder for the rows' JSON files")
    p.add_argument("--done", action="append", default=[], metavar="FOLDER",
                   help="also skip rows measured ok in result files here (repeatable; --out is always searched)")
    p.add_argument("--rows", default="", help="comma-separated row names (default: all, in priority order)")
    p.add_argument("--stale", action="store_true",
                   help="also run rows measured ok only at an earlier code version (skipped by default)")
    p.add_argument("--list", "--dry_run", dest="list", action="store_true", help="print the plan, run nothing")
    p.add_argument("--gpu", default=None, help="plan (--list) for this GPU name, e.g. h100, instead of this one's")
    return p


def summary(records: list[dict]) -> str:
    lines = ["| row | status | wall s | file | key numbers |", "|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['row']} | {r['status']} | {r.get('wall_s', '')} | {r.get('file', '')} | "
                     f"{r.get('key', '')} |")
    return "\n".join(lines)


def print_plan(entries: list[tuple[Row, str]], deadline_s: float) -> None:
    """The rows in order with what a call of `deadline_s` seconds would do with each, by the estimates."""
    t = 0.0
    print("| row | estimate s | for | plan |\n|---|---|---|---|")
    for row, why in entries:
        if why == "pending":
            if row.estimate_s <= deadline_s - t:
                why = f"would run at about {t:.0f}-{t + row.estimate_s:.0f} s"
                t += row.estimate_s
            else:
                why = f"pending, would not start: estimate {row.estimate_s:.0f} s > {int(deadline_s - t)} s left"
        print(f"| {row.name} | {row.estimate_s:.0f} | {', '.join(row.gpus) or 'any'} | {why} |")
    print("\n" + "\n".join(f"- {row.name}: {row.measures}\n  {shlex.join(row.argv)}" for row, _ in entries))


def main(argv=None) -> int:
    start = time.monotonic()
    p = build_parser()
    args = p.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; the rows: {', '.join(r.name for r in ROWS)}")
    if args.gpu and not args.list:
        p.error("--gpu NAME is for planning (--list); a run records the GPU it runs on")
    name = args.gpu or gpu_name()
    slug, version = gpu_slug(name), code_version()
    if os.environ.get(EMULATE_ENV):  # the rows run as on a smaller card (benchmarks/emulate.py): results say so
        slug += f"-as-{float(os.environ[EMULATE_ENV]):g}gib"
    out = Path(args.out)
    rows = [r for r in ROWS if not names or r.name in names]
    folders = [out, *map(Path, args.done)]
    done = find_done(folders, rows, slug, version)
    earlier = {} if args.stale else \
        {k: v for k, v in find_done(folders, rows, slug, None).items() if k not in done}
    entries = plan(rows, slug, done, chosen=bool(names), earlier=earlier)
    print(f"GPU {name} ({slug}); code version {version} (git {git_commit()}); deadline {args.deadline:g} s; "
          f"results to {out}", flush=True)
    if args.list:
        print_plan(entries, args.deadline - (time.monotonic() - start))
        return 0
    if slug == "cpu":
        print("error: no CUDA GPU here: the rows need one; --list plans without running (--gpu NAME plans for that "
              "GPU)", file=sys.stderr)
        return 2
    skipped = {}
    for row, why in entries:
        if why != "pending":
            print(f"{row.name}: skipped, {why}")
            was = done.get(row.name) or earlier.get(row.name)
            skipped[row.name] = dict(row=row.name, status="skipped_done" if was else "skipped_gpu", file=str(was or ""))
    info = dict(code_version=version, git_commit=git_commit(),
                code_commit=git("log", "-1", "--format=%h", "--", *CODE_PATHS, *(f":!{p}" for p in NOT_CODE)),
                gpu=name, gpu_slug=slug, backlog_deadline_s=args.deadline)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, on_term)
    records, code = [], 0
    try:
        records = run_backlog([r for r, why in entries if why == "pending"], out, args.deadline, start, info)
        code = 0 if all(r["status"] in ("ok", "skipped_deadline") for r in records) else 1
    except (KeyboardInterrupt, Interrupted) as e:
        code = 128 + getattr(e, "signum", signal.SIGINT)
        print(f"interrupted: the running row was stopped and recorded in {out}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    ran = {r["row"]: r for r in records}
    print(summary([skipped.get(r.name) or ran[r.name] for r, _ in entries if r.name in skipped or r.name in ran]))
    return code


if __name__ == "__main__":
    sys.exit(main())
