"""Fixed-input runs of each stage of the tiny pipeline, for the tests that pin numbers (tests/test_pinned_values.py).

Each stage runs once on seeded inputs of its own (T5 on a fixed prompt, one DiT forward per expert, four scheduler
steps per solver on seeded velocities, one VAE decode), so a stage's numbers move only by that stage's rounding: a
single pass is not chaotic, unlike four guided steps of a random model, which amplify a last-bit difference between
CPU kernels (oneDNN's AVX512 vs AVX2 bf16 T5) to ~1e-2. The end-to-end run is pinned too, with a looser tolerance.

`fingerprint` reduces a tensor to a few numbers: 12 evenly spaced elements (first and last included), the mean, the
mean absolute value and the standard deviation (a 0.5% change of scale moves the last two by 0.5%).

Print the values to pin (full precision, JSON), and keep the whole outputs to measure the spread across settings:
    python -m wan.testing.pinned_stages [--out FILE] [--tensors FILE.pt]
run once per setting (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, OMP_NUM_THREADS, torch version) and compare.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from unittest import mock

import torch

PROMPT = "two cats fight on a stage under bright light"
GEN = dict(size=(64, 64), frame_num=9, shift=12.0, sampling_steps=4, guide_scale=(3.0, 4.0))
E2E_SEED = 1234
LATENT_SHAPE = (16, 3, 8, 8)  # the tiny VAE's latent of a 64x64, 9-frame video
VAE_LATENT_SHAPE = (16, 2, 8, 8)  # two latent frames: the first frame and a cached 4-frame one
SEQ_LEN = 48  # 3 x 4 x 4 tokens (patch 1x2x2)
DIT_T = {"high": 972, "low": 799}  # one timestep in each expert's range (boundary 875)
SOLVERS = ("unipc", "dpm++", "euler")
CPU = torch.device("cpu")


def seeded(shape, seed: int) -> torch.Tensor:
    """Standard normal fp32 values from their own CPU generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def fingerprint(x: torch.Tensor) -> list[float]:
    """12 evenly spaced elements, then mean, mean |x| and std (float64 reductions)."""
    x = x.detach().to(torch.float64).flatten()
    idx = torch.linspace(0, x.numel() - 1, 12).round().long()
    return x[idx].tolist() + [x.mean().item(), x.abs().mean().item(), x.std().item()]


@torch.no_grad()
def t5_output(pipe) -> torch.Tensor:
    """The prompt's T5 embedding [n_tokens, 4096]."""
    return pipe.text_encoder([PROMPT], CPU)[0]


@torch.no_grad()
def dit_output(pipe, expert: str) -> torch.Tensor:
    """One forward of one expert on a seeded latent [16, 3, 8, 8] and seeded context [12, 4096]."""
    model = pipe.high_noise_model if expert == "high" else pipe.low_noise_model
    latent, context = seeded(LATENT_SHAPE, 11), seeded((12, model.text_dim), 12)
    t = torch.tensor([DIT_T[expert]], dtype=torch.int64)
    return model([latent], t=t, context=[context], seq_len=SEQ_LEN)[0]


@torch.no_grad()
def scheduler_output(solver: str) -> torch.Tensor:
    """Four steps of the solver (shift 12, as the end-to-end run) from a seeded latent with seeded velocities."""
    from ..utils.schedulers import build_scheduler

    scheduler, timesteps = build_scheduler(solver, GEN["sampling_steps"], GEN["shift"], CPU)
    scheduler.set_begin_index(0)
    x = seeded(LATENT_SHAPE, 21)
    for i, t in enumerate(timesteps.tolist()):
        v = seeded(LATENT_SHAPE, 30 + i)
        x = scheduler.step(v.unsqueeze(0), t, x.unsqueeze(0), return_dict=False)[0].squeeze(0)
    return x


@torch.no_grad()
def vae_output(pipe) -> torch.Tensor:
    """The decode of a seeded latent [16, 2, 8, 8] -> video [3, 5, 64, 64]."""
    return pipe.vae.decode([seeded(VAE_LATENT_SHAPE, 41)])[0]


@torch.no_grad()
def end_to_end(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole tiny guided run (T5 -> DiT x 4 steps -> UniPC -> VAE): (latent, video)."""
    video, latent = pipe.generate(PROMPT, seed=E2E_SEED, return_latents=True, **GEN)
    return latent, video


# single-pass pin name -> its run on a pipeline
STAGES = {"t5": t5_output,
          **{f"dit_{expert}": (lambda pipe, e=expert: dit_output(pipe, e)) for expert in DIT_T},
          **{f"scheduler_{solver}": (lambda pipe, s=solver: scheduler_output(s)) for solver in SOLVERS},
          "vae": vae_output}


def stage_outputs(pipe, names=None, end_to_end_run: bool = False) -> dict[str, torch.Tensor]:
    """The outputs of the single-pass stages `names` (default: all of STAGES), and with `end_to_end_run`
    e2e_latent and e2e_video too."""
    out = {name: STAGES[name](pipe) for name in (STAGES if names is None else names)}
    if end_to_end_run:
        out["e2e_latent"], out["e2e_video"] = end_to_end(pipe)
    return out


def _stage_methods(stage: str) -> list[tuple[type, str]]:
    """The (class, method) pairs whose return value is the stage's output."""
    if stage == "t5":
        from ..modules.t5 import T5EncoderModel

        return [(T5EncoderModel, "__call__")]
    if stage == "dit":  # __call__ is looked up on the class: an instance's `forward` attribute cannot bypass it
        from ..modules.model import WanModel

        return [(WanModel, "__call__")]
    if stage == "scheduler":  # every solver build_scheduler can return
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

        from ..utils.schedulers import FlowEulerScheduler

        return [(UniPCMultistepScheduler, "step"), (DPMSolverMultistepScheduler, "step"), (FlowEulerScheduler, "step")]
    if stage == "vae":
        from ..modules.vae import Wan2_1_VAE

        return [(Wan2_1_VAE, "decode")]
    raise ValueError(f"unknown stage {stage!r}; choose t5, dit, scheduler or vae")


def _scaled(out, factor: float):
    """A stage's output times `factor`: a tensor, a list of tensors, or a scheduler's (prev_sample, ...) tuple."""
    if torch.is_tensor(out):
        return out * factor
    if isinstance(out, list):
        return [_scaled(u, factor) for u in out]
    if isinstance(out, tuple):
        return (_scaled(out[0], factor),) + out[1:]
    raise TypeError(f"cannot scale a {type(out).__name__} (call the scheduler with return_dict=False)")


@contextmanager
def scaled_stage(stage: str, factor: float):
    """Inside: every call of `stage` (t5, dit, scheduler, vae) returns its output times `factor`, everywhere (the
    stage runs above and the pipeline alike): a deliberate error that the pins must catch. Patched on the classes
    (T5EncoderModel.__call__, WanModel.__call__, each solver's step, Wan2_1_VAE.decode) and restored on exit."""
    with ExitStack() as stack:
        for cls, name in _stage_methods(stage):
            original = getattr(cls, name)

            def wrapper(*args, _original=original, **kwargs):
                return _scaled(_original(*args, **kwargs), factor)

            stack.enter_context(mock.patch.object(cls, name, wrapper))
        yield


def tiny_pipeline(ckpt_dir):
    """The tiny pipeline on CPU, its checkpoint written into `ckpt_dir` (new or complete) and loaded from there."""
    from ..configs import WAN_CONFIGS
    from ..text2video import WanT2V
    from .tiny import ensure_tiny_checkpoint

    return WanT2V(WAN_CONFIGS["t2v-tiny"], ensure_tiny_checkpoint(ckpt_dir), device="cpu")


def main(argv=None) -> None:
    import argparse
    import json
    import os
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    parser.add_argument("--tensors", help="also save every stage's whole output here (torch.save), to compare")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:  # a fresh checkpoint: the weights are drawn under these settings too
        pipe = tiny_pipeline(os.path.join(tmp, "ckpt"))
        tensors = stage_outputs(pipe, end_to_end_run=True)
        result = {"settings": {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "threads": torch.get_num_threads(),
                               **{k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                                  "OMP_NUM_THREADS")}},
                  "values": {name: fingerprint(x) for name, x in tensors.items()}}
    if args.tensors:
        torch.save(tensors, args.tensors)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
