"""Command line: python generate.py --task t2v-A14B --ckpt_dir ./Wan2.2-T2V-A14B --prompt "..." [--fast]

Also: --task t2v-tiny (a built-in random model, runs on a CPU in under a minute; its video is noise).
"""
from __future__ import annotations

import logging
import os
import sys

EXIT_USAGE, EXIT_RUNTIME, EXIT_OOM = 2, 1, 3


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format="[%(asctime)s] %(levelname)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])


def main(argv=None) -> int:
    from wan.cli import UsageError, build_parser, guide_scale, size_tuple, validate_args
    from wan.utils.video import OutputPathError, check_output_path, default_save_name, save_video

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    log = logging.getLogger("wan")
    try:
        validate_args(args)
        from wan.configs import WAN_CONFIGS
        cfg = WAN_CONFIGS[args.task]
        save_file = args.save_file or default_save_name(args.task, args.size, args.options.ulysses_size, args.prompt)
        if rank == 0:
            check_output_path(save_file, args.overwrite)  # before minutes of generation
    except (UsageError, OutputPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    import torch

    from wan.distributed.setup import init_distributed
    from wan.text2video import WanT2V

    if args.fast:
        log.info("--fast turned on: %s", ", ".join(f"{k}={v}" for k, v in args.options.changed().items()))
    dist = init_distributed(args.options, args.device)
    if args.task == "t2v-tiny":
        from wan.tiny import ensure_tiny_checkpoint

        ckpt_dir = ensure_tiny_checkpoint(args.ckpt_dir)
    else:
        ckpt_dir = args.ckpt_dir
    log.info("task %s, size %s, %d frames, %d steps, shift %s, solver %s, world %d, options %s", args.task, args.size,
             args.frame_num, args.sample_steps, args.sample_shift, args.sample_solver, dist.world_size,
             args.options.changed() or "original path")
    try:
        pipe = WanT2V(cfg, ckpt_dir, device_id=dist.local_rank, rank=dist.rank, device=dist.device,
                      options=args.options)
        seed = dist.broadcast_seed(args.base_seed)
        video = pipe.generate(args.prompt, size=size_tuple(args.size), frame_num=args.frame_num,
                              shift=args.sample_shift, sample_solver=args.sample_solver,
                              sampling_steps=args.sample_steps, guide_scale=guide_scale(args, cfg), seed=seed,
                              offload_model=pipe.offload_model)
        if dist.rank == 0:
            path = save_video(video, save_file, fps=cfg.sample_fps, overwrite=args.overwrite)
            log.info("saved %s", path)
    except torch.OutOfMemoryError as exc:
        free, total = torch.cuda.mem_get_info() if torch.cuda.is_available() else (0, 0)
        print(f"error: out of GPU memory ({str(exc).splitlines()[0][:120]}); free {free / 2**30:.1f} of "
              f"{total / 2**30:.1f} GiB. Try --offload_model true, --convert_model_dtype, a smaller --size or "
              "fewer --frame_num", file=sys.stderr)
        return EXIT_OOM
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        dist.shutdown()
    log.info("Finished.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
