"""Command line: python generate.py --task t2v-A14B --ckpt_dir ./Wan2.2-T2V-A14B --prompt "..." [--fast]
              python generate.py --task i2v-A14B --ckpt_dir ./Wan2.2-I2V-A14B --image first.jpg --prompt "..."
              python generate.py --task ti2v-5B --ckpt_dir ./Wan2.2-TI2V-5B [--image first.jpg] --prompt "..."

Also: --task t2v-tiny / i2v-tiny / ti2v-tiny (built-in random models, run on a CPU in under a minute; their videos
are noise),
and batch mode (--prompt_file FILE [--image_file FILE] --save_dir DIR: the models load once, one video per prompt).

Exit codes: 0 done; 1 a run-time error (a bad checkpoint file, a failed write, some batch prompts failed);
2 bad input knowable up front (flags, paths, output targets, device); 3 out of memory; 130 / 143 SIGINT / SIGTERM.
Every error ends with one line on stderr that starts with "error: " (set WAN_TRACEBACK=1 to also see the traceback).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_OOM = 0, 1, 2, 3  # signals: 128 + signal number (130, 143)
TRACEBACK_ENV = "WAN_TRACEBACK"
log = logging.getLogger("wan")


class _StdoutHandler(logging.StreamHandler):
    """Writes to the current sys.stdout (not the one of the first call: main() may run many times in tests)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="[%(asctime)s] %(levelname)s: %(message)s", handlers=[_StdoutHandler()])


class BatchFailed(RuntimeError):
    """Some prompts of --prompt_file failed (exit code 1); the others were written."""


class RunState:
    """What the run got to, for the final line: still in preflight or not, which videos were written."""

    def __init__(self):
        self.preflight = True
        self.saved: list[str] = []
        self.total = 0
        self.gen_seconds = 0.0

    def written(self) -> str:
        if not self.saved:
            return "nothing written"
        return f"{len(self.saved)} of {self.total} videos written (last: {self.saved[-1]})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _classify(exc: BaseException, signum: int | None, state: RunState) -> tuple[int, str]:
    """(exit code, the one error line) for any exception that ends the run."""
    import signal

    from wan.cli import UsageError
    from wan.errors import CheckpointError, MemoryPlanError
    from wan.modules.attention import BackendUnavailableError
    from wan.modules.fp8 import Fp8UnavailableError
    from wan.preflight import PathError
    from wan.utils.video import OutputPathError

    if signum is not None or isinstance(exc, KeyboardInterrupt):
        signum = signum if signum is not None else getattr(exc, "signum", signal.SIGINT)
        return 128 + signum, f"interrupted by {signal.Signals(signum).name}; {state.written()}"
    # a kernel the device cannot run (an fp8 switch on the CPU, FA3 missing) is refused before anything loads
    if isinstance(exc, (UsageError, PathError, MemoryPlanError, Fp8UnavailableError, BackendUnavailableError)) or (
            isinstance(exc, OutputPathError) and state.preflight):
        return EXIT_USAGE, _first_line(exc)
    oom = type(exc).__name__ == "OutOfMemoryError" and "torch" in type(exc).__module__
    if oom:
        import torch

        free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
        return EXIT_OOM, (f"out of GPU memory ({_first_line(exc)[:120]}); free {free / 2**30:.1f} of "
                          f"{total / 2**30:.1f} GiB. Try --offload_model true, --convert_model_dtype, a smaller --size "
                          f"or fewer --frame_num; {state.written()}")
    if isinstance(exc, MemoryError):
        return EXIT_OOM, (f"out of host memory ({_first_line(exc)[:120]}); try a smaller --size or fewer "
                          f"--frame_num; {state.written()}")
    msg = _first_line(exc)
    if not isinstance(exc, (CheckpointError, OutputPathError, BatchFailed, ValueError, RuntimeError, OSError,
                            ImportError)):
        msg = f"{type(exc).__name__}: {msg}"  # an unexpected kind: say what it was
    if state.saved and not isinstance(exc, BatchFailed):
        msg += f"; {state.written()}"
    return EXIT_RUNTIME, msg


def main(argv=None) -> int:
    """Run the CLI; returns the exit code. SIGINT / SIGTERM handlers are installed only while it runs."""
    from wan.utils.interrupt import handle_signals

    state = RunState()
    with handle_signals() as sig:
        try:
            return _run(argv, state)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        except BaseException as exc:  # noqa: BLE001 - every failure ends as one line and an exit code
            try:
                code, line = _classify(exc, sig.signum, state)
            except Exception:  # noqa: BLE001 - the library itself is broken: still one line
                code, line = EXIT_RUNTIME, f"{type(exc).__name__}: {_first_line(exc)}"
            if os.environ.get(TRACEBACK_ENV):
                import traceback

                traceback.print_exception(exc)
            log.debug("failure", exc_info=exc)
            sys.stdout.flush()
            print(f"error: {line}", file=sys.stderr, flush=True)
            return code


def _plan(args) -> list:
    """One (PromptLine, output path) per video; every target is checked before anything loads."""
    from datetime import datetime

    from wan.utils.video import check_output_path, default_save_name

    now, batch = datetime.now(), args.prompt_file is not None
    jobs = []
    for p in args.prompts:
        if args.save_file is not None:
            target = args.save_file
        else:
            name = default_save_name(args.task, args.size, args.options.ulysses_size, p.text, now=now,
                                     index=p.index if batch else None)
            target = os.path.join(args.save_dir or ".", name)
        jobs.append((p, check_output_path(target, args.overwrite)))
    return jobs


def _placement_given(args) -> bool:
    return any(getattr(args, f) is not None for f in ("max_gpu_memory", "offload_model", "stream_blocks", "vae_bands"))


def _fast_budget(args, cfg, device, weights):
    """--fast on one GPU with no placement flag: plan for the memory the card has free (wan.memory_plan.fast_budget);
    the options change only where the resident run would not fit."""
    import torch

    from wan.cli import plan_size
    from wan.memory_plan import fast_budget, plan_inputs, t5_weight_bytes

    free = torch.cuda.mem_get_info(device)[0] / 1e9
    # the resolved weights (any layout: the T5 as loaded, in its dtype), or an official folder (the .pth's size)
    t5_bytes = weights.t5.param_bytes(cfg.t5_dtype) if hasattr(weights, "t5") else \
        t5_weight_bytes(Path(weights) / cfg.t5_checkpoint)
    kw = plan_inputs(cfg, args.options, (*plan_size(args), args.frame_num), t5_bytes)
    options, line = fast_budget(args.options, free, **kw)
    log.info(line)
    return options


def _run(argv, state: RunState) -> int:
    from wan.cli import build_parser, guide_scale, plan_size, size_tuple, validate_args
    from wan.formats import resolve_weights
    from wan.preflight import check_lora_file, check_tiny_dir

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    validate_args(args)
    for lineno, reason in args.bad_lines:
        log.warning("line %d of %s: %s", lineno, args.prompt_file, reason)
    from wan.configs import WAN_CONFIGS

    cfg = WAN_CONFIGS[args.task]
    jobs = _plan(args)  # output preflight: before minutes of loading and generating
    state.total = len(jobs)
    for prompt, _ in jobs:
        if prompt.video_size is not None:  # i2v: the size follows each image
            log.info("%svideo %dx%d, %d frames, from %s", f"line {prompt.lineno}: " if prompt.lineno else "",
                     *prompt.video_size, args.frame_num, prompt.image)
    tiny, weights = not cfg.needs_ckpt_dir, None
    if tiny and args.ckpt_dir is None and args.weight_paths.complete(cfg):  # every component given: nothing to write
        weights = resolve_weights(cfg, None, args.weight_paths)
    elif tiny:
        from wan.testing.tiny import MARKER, default_tiny_dir

        tiny_dir = Path(args.ckpt_dir or default_tiny_dir(args.task))
        check_tiny_dir(tiny_dir)
        if (tiny_dir / MARKER).is_file() or (tiny_dir / "model_index.json").is_file():  # written already, or given
            weights = resolve_weights(cfg, tiny_dir, args.weight_paths)  # else once it is written
    else:
        weights = resolve_weights(cfg, args.ckpt_dir, args.weight_paths)  # every header, key and shape
    for path in (args.lora_high, args.lora_low):
        if path is not None:
            check_lora_file(path)
    if (args.lora_high or args.lora_low) and args.sample_solver != "euler":
        log.warning("a LoRA with --sample_solver %s: the Lightning LoRAs were distilled for 4 euler steps "
                    "(--distilled sets them)", args.sample_solver)
    state.preflight = False

    from wan.distributed.setup import init_distributed
    from wan.image2video import WanI2V
    from wan.text2video import WanT2V
    from wan.textimage2video import WanTI2V

    if args.fast:
        log.info("--fast turned on: %s", ", ".join(f"{k}={v}" for k, v in args.options.changed().items()))
    dist = init_distributed(args.options, args.device)
    try:
        if weights is None:  # the tiny task's random checkpoint, written now
            from wan.testing.tiny import ensure_tiny_checkpoint

            weights = resolve_weights(cfg, ensure_tiny_checkpoint(args.ckpt_dir, task=args.task), args.weight_paths)
        for line in weights.describe():
            log.info("weights: %s", line)
        if args.fast and dist.world_size == 1 and dist.device.type == "cuda" and not _placement_given(args):
            args.options = _fast_budget(args, cfg, dist.device, weights)
        log.info("task %s, size %s, %d frames, %d steps, shift %s, solver %s, world %d, options %s", args.task,
                 args.size, args.frame_num, args.sample_steps, args.sample_shift, args.sample_solver,
                 dist.world_size, args.options.changed() or "original path")
        t_load = time.perf_counter()
        pipeline = {"t2v": WanT2V, "i2v": WanI2V, "ti2v": WanTI2V}[cfg.arch.model_type]
        pipe = pipeline(cfg, None, device_id=dist.local_rank, rank=dist.rank, device=dist.device, weights=weights,
                        options=args.options, lora_high=args.lora_high, lora_low=args.lora_low,
                        lora_strength=args.lora_strength, plan_for=(*plan_size(args), args.frame_num))
        load_s = time.perf_counter() - t_load
        failed = _generate_all(args, cfg, pipe, dist, jobs, state, guide_scale(args, cfg), size_tuple(args.size))
    finally:
        dist.shutdown()
    if args.prompt_file is None:
        log.info("Finished.")
        return EXIT_OK
    done = len(state.saved)
    log.info("batch done: %d of %d videos; models loaded once in %.1f s; %s", done, len(jobs), load_s,
             f"{state.gen_seconds / max(done, 1):.1f} s per video" if done else "no video written")
    failed += [(n, reason) for n, reason in args.bad_lines]
    if failed:
        lines = ", ".join(str(n) for n, _ in sorted(failed))
        raise BatchFailed(f"{len(failed)} of {len(jobs) + len(args.bad_lines)} prompts failed (lines {lines} of "
                          f"{args.prompt_file}; see the log); {done} videos written")
    return EXIT_OK


def _generate_all(args, cfg, pipe, dist, jobs, state: RunState, guide, size) -> list:
    """Generate and save each job; in batch mode a failing prompt is logged and skipped (one rank only)."""
    from wan.utils.video import save_video

    batch, failed = args.prompt_file is not None, []
    for i, (prompt, path) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        where = f"[{i}/{len(jobs)}] line {prompt.lineno}" if batch else "video"
        try:
            seed = dist.broadcast_seed(args.base_seed)
            sampling = dict(frame_num=args.frame_num, shift=args.sample_shift, sample_solver=args.sample_solver,
                            sampling_steps=args.sample_steps, guide_scale=guide, seed=seed)
            if prompt.image is not None:  # i2v: the checked image, read again (only its size was kept)
                from wan.configs import MAX_AREA_CONFIGS
                from wan.utils.image import load_image

                video = pipe.generate(prompt.text, load_image(prompt.image).image,
                                      max_area=MAX_AREA_CONFIGS[args.size], **sampling)
            else:
                video = pipe.generate(prompt.text, size=size, **sampling)
            if dist.rank == 0:
                log.info("%s: writing %s", where, path)
                save_video(video, path, fps=cfg.sample_fps, overwrite=args.overwrite)
                state.saved.append(str(path))
        except Exception as exc:
            if not batch or dist.world_size > 1 or isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
                raise
            log.error("%s failed: %s", where, _first_line(exc))
            failed.append((prompt.lineno, _first_line(exc)))
            continue
        secs = time.perf_counter() - t0
        state.gen_seconds += secs
        result = getattr(pipe, "last_result", None)
        log.info("%s: saved %s in %.1f s (seed %s; stages %s)", where, path, secs, getattr(result, "seed", seed),
                 {k: round(v, 1) for k, v in (getattr(result, "timings", None) or {}).items()})
    return failed


if __name__ == "__main__":
    sys.exit(main())
