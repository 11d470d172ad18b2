"""Flow-matching samplers for Wan 2.2 T2V, built on stock diffusers schedulers.

The reference ships modified copies of diffusers' UniPC / DPM++ (wan/utils/fm_solvers*.py).
Their update math equals diffusers' flow-prediction branch (alpha = 1 - sigma,
x0 = sample - sigma * v); only the sigma/timestep tables differ. So we build the
diffusers scheduler, call set_timesteps() to reset its state, then install the
reference tables (sigmas: float32 on CPU with a final 0; timesteps: int64, truncated).

"euler" is the Wan2.2-Lightning fork's few-step sampler (its 4-step LoRAs were distilled with it): a small class
here, float32 unrounded timesteps, deterministic Euler update.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch

SOLVERS = ("unipc", "dpm++", "euler")


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    # Same expression and operation order as the reference (float64).
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _reference_sigmas(sample_solver: str, steps: int, shift: float,
                      num_train_timesteps: int) -> np.ndarray:
    """The reference's `steps` float64 sigmas (without the trailing 0)."""
    if sample_solver == "unipc":
        # FlowUniPC: train sigmas 1 - linspace(1, 1/N, N) reversed, stored fp32 ->
        # sigma_max = fp32(0.999) = 0.99900001..., sigma_min = 0.
        sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
        sigmas = np.linspace(sigma_max, 0.0, steps + 1).copy()[:-1]
        return _shift(sigmas, shift)
    # dpm++: get_sampling_sigmas() starts at exactly 1.0; the scheduler's own shift=1
    # re-shift is an exact identity, so it is omitted.
    sigmas = np.linspace(1, 0, steps + 1)[:steps]
    return _shift(sigmas, shift)


def euler_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The Wan2.2-Lightning fork's Euler sigmas: float32 [steps + 1], from 1.0 down to exactly 0.

    Same operations, order and dtype as the fork: t = linspace(N, 0, steps + 1) in float32 (numpy), sigma = t / N,
    then the flow shift, all in float32. 4 steps, shift 5 -> [1.0, 0.9375, 0.8333333, 0.625, 0.0].
    """
    t = torch.from_numpy(np.linspace(num_train_timesteps, 0, steps + 1, dtype=np.float32))
    sigmas = t / num_train_timesteps
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class EulerStepOutput(NamedTuple):
    prev_sample: torch.Tensor


class FlowEulerScheduler:
    """Deterministic flow-matching Euler: x <- x + (sigma_next - sigma) * v in float32 (the Lightning fork's solver).

    Same calling convention as the diffusers schedulers the pipeline uses: `set_begin_index(0)`, then one
    `step(v, t, x, return_dict=False)[0]` per entry of `timesteps`. The step index is tracked here, so `timestep` is
    not looked up (no device sync). The result is float32 whatever the input dtypes, as in the fork.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.sigmas = sigmas  # float32 [steps + 1] on CPU, last entry 0
        self.timesteps = timesteps  # float32 [steps], unrounded
        self.num_inference_steps = len(timesteps)
        self._dts = (sigmas[1:] - sigmas[:-1]).tolist()  # float32 differences, exact as Python floats
        self._begin_index: int | None = None
        self._step_index: int | None = None

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)
        self._step_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One Euler step from sigmas[i] to sigmas[i + 1]; `timestep` is accepted for API parity and not used."""
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        i = self._step_index
        if i >= self.num_inference_steps:
            raise IndexError(f"FlowEulerScheduler.step called {i + 1} times for a {self.num_inference_steps}-step "
                             "schedule; build a new scheduler for each generation")
        prev = sample.to(torch.float32) + self._dts[i] * model_output.to(torch.float32)
        self._step_index = i + 1
        return EulerStepOutput(prev) if return_dict else (prev,)


def build_scheduler(sample_solver: str, sampling_steps: int, shift: float, device,
                    num_train_timesteps: int = 1000):
    """Return (scheduler, timesteps[steps] on `device`) matching the reference.

    unipc / dpm++: int64 timesteps (truncated, as the official code); euler: float32, unrounded (the Lightning fork).
    Use as: latents = scheduler.step(v, t, latents, return_dict=False)[0].
    """
    if sample_solver not in SOLVERS:
        raise ValueError(f"unknown sample_solver {sample_solver!r}; choose one of {', '.join(SOLVERS)}")
    if (isinstance(sampling_steps, bool) or not isinstance(sampling_steps, (int, np.integer))
            or sampling_steps < 1):
        raise ValueError(f"sampling_steps must be an integer >= 1, got {sampling_steps!r}")
    steps = int(sampling_steps)

    if sample_solver == "euler":
        sigmas = euler_schedule(steps, float(shift), num_train_timesteps)
        timesteps = (sigmas[:-1] * num_train_timesteps).to(device)
        return FlowEulerScheduler(sigmas, timesteps), timesteps
    if sample_solver == "unipc":
        from diffusers import UniPCMultistepScheduler
        sched = UniPCMultistepScheduler(
            num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=float(shift), solver_order=2, solver_type="bh2",
            predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    else:
        from diffusers import DPMSolverMultistepScheduler
        sched = DPMSolverMultistepScheduler(
            num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=float(shift), algorithm_type="dpmsolver++",
            solver_type="midpoint", solver_order=2, lower_order_final=True,
            final_sigmas_type="zero")

    # set_timesteps resets the multistep state (model_outputs, step_index, ...). Its own
    # tables differ from the reference (UniPC: linspace(1, 1/N) base, first sigma 1-1e-6;
    # DPM++: starts at shift(0.999) instead of 1.0), so overwrite them below.
    with warnings.catch_warnings():
        # diffusers' DPM set_timesteps calls np.array(torch tensor): a numpy-2 DeprecationWarning.
        warnings.simplefilter("ignore", DeprecationWarning)
        sched.set_timesteps(steps, device=device)
    sigmas = _reference_sigmas(sample_solver, steps, float(shift), num_train_timesteps)
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(device=device, dtype=torch.int64)
    sched.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))  # [steps+1], CPU
    sched.timesteps = timesteps
    sched.num_inference_steps = steps
    return sched, timesteps


def expert_for_timestep(t, boundary) -> str:
    """'high' (high-noise expert) when t >= boundary (875 for T2V-A14B), else 'low'."""
    return "high" if int(t) >= int(boundary) else "low"
