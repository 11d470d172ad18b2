"""Schedulers vs the reference (Wan2.2 fm_solvers_unipc.py / fm_solvers.py), computed independently here."""
import numpy as np
import pytest
import torch

from wan.utils.schedulers import build_scheduler, expert_for_timestep

# Reference table (wan22_reference.md section 6): unipc, 40 steps, shift 12.
REFERENCE_TIMESTEPS_40_SHIFT12 = [
    999, 997, 995, 993, 990, 988, 985, 982, 979, 976,
    972, 969, 965, 961, 956, 952, 947, 941, 936, 929,
    922, 915, 907, 898, 888, 877, 865, 852, 837, 819,
    799, 776, 749, 717, 678, 631, 571, 492, 386, 235,
]
BOUNDARY = 875  # 0.875 * 1000


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


def ref_unipc_table(steps, shift):
    """Reference FlowUniPC.set_timesteps: float64 sigmas [steps], int64 timesteps (truncated)."""
    sigma_max = float(np.float32(0.999))  # fp32 train sigma 0.999 -> 0.99900001...
    s = _shift(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)
    return s, (s * 1000).astype(np.int64)


def ref_dpmpp_table(steps, shift):
    """Reference get_sampling_sigmas + FlowDPM.set_timesteps(sigmas=...)."""
    s = _shift(np.linspace(1.0, 0.0, steps + 1)[:steps], shift)
    return s, (s * 1000).astype(np.int64)


# ---------------------------------------------------------------- schedule tables

@pytest.mark.pinned  # hard-coded reference numbers: rerun under other instruction sets (.ci/run)
def test_unipc_40_shift12_table():
    sched, ts = build_scheduler("unipc", 40, 12.0, "cpu")
    assert ts.dtype == torch.int64 and ts.device.type == "cpu"
    assert ts.tolist() == REFERENCE_TIMESTEPS_40_SHIFT12
    assert sched.timesteps.tolist() == REFERENCE_TIMESTEPS_40_SHIFT12
    ref_s, ref_t = ref_unipc_table(40, 12.0)
    assert ts.tolist() == ref_t.tolist()
    sig = sched.sigmas.double().numpy()
    assert sig.shape == (41,) and sched.sigmas.dtype == torch.float32
    assert np.abs(sig[:-1] - ref_s).max() <= 1e-6
    s0 = 12 * float(np.float32(0.999)) / (1 + 11 * float(np.float32(0.999)))
    assert abs(sig[0] - s0) <= 1e-6 and abs(sig[0] - 0.99992) < 1e-5
    assert abs(sig[39] - 0.23511) < 1e-5
    assert sig[40] == 0.0


def test_unipc_expert_split():
    _, ts = build_scheduler("unipc", 40, 12.0, "cpu")
    experts = [expert_for_timestep(t, BOUNDARY) for t in ts]
    assert experts.count("high") == 26 and experts.count("low") == 14
    assert experts.index("low") == 26 and int(ts[26]) == 865
    assert expert_for_timestep(875, 875) == "high" and expert_for_timestep(874, 875) == "low"
    assert expert_for_timestep(torch.tensor(999), 875) == "high"


@pytest.mark.pinned  # hard-coded reference numbers: rerun under other instruction sets (.ci/run)
def test_dpmpp_40_shift12_table():
    sched, ts = build_scheduler("dpm++", 40, 12.0, "cpu")
    ref_s, ref_t = ref_dpmpp_table(40, 12.0)
    assert ts.dtype == torch.int64
    assert ts.tolist() == ref_t.tolist()
    assert int(ts[0]) == 1000 and float(sched.sigmas[0]) == 1.0  # starts at sigma 1.0 / t=1000
    sig = sched.sigmas.double().numpy()
    assert np.abs(sig[:-1] - ref_s).max() <= 1e-6 and sig[-1] == 0.0
    assert sum(expert_for_timestep(t, BOUNDARY) == "high" for t in ts) == 26


@pytest.mark.parametrize("solver,table", [("unipc", ref_unipc_table), ("dpm++", ref_dpmpp_table)])
@pytest.mark.parametrize("steps,shift", [(1, 12.0), (2, 5.0), (10, 3.0), (50, 5.0), (40, 1.0)])
def test_tables_other_settings(solver, table, steps, shift):
    sched, ts = build_scheduler(solver, steps, shift, "cpu")
    ref_s, ref_t = table(steps, shift)
    assert ts.tolist() == ref_t.tolist()
    assert np.abs(sched.sigmas.double().numpy()[:-1] - ref_s).max() <= 1e-6
    assert len(sched.sigmas) == steps + 1 and float(sched.sigmas[-1]) == 0.0


# ---------------------------------------------------------------- step math

def ref_flow_unipc(sig, x, vs):
    """Straightforward flow UniPC (bh2, order 2, predict_x0) in float64.

    sig: [N+1] sigmas (last 0); x: initial sample; vs: N velocity outputs. alpha = 1 - sigma,
    x0 = sample - sigma * v (with the *uncorrected* sample), UniC corrector on every step
    after the first (order = previous predictor's order), predictor order min(2, i+1, N-i).
    Returns the predictor output of every step.
    """
    N = len(sig) - 1
    with np.errstate(divide="ignore"):
        lam = np.log(1 - sig) - np.log(sig)  # lambda = log(alpha/sigma); lam[N] = +inf
    ms, outs = [], []
    last_x, last_order = None, None
    for i in range(N):
        m = x - sig[i] * vs[i]
        if i > 0:  # UniC: re-do the step (i-1 -> i) using m_i
            h = lam[i] - lam[i - 1]
            phi1 = np.expm1(-h)  # = B(h) for bh2
            a = 1 - sig[i]
            x = sig[i] / sig[i - 1] * last_x - a * phi1 * ms[-1]
            dt = m - ms[-1]
            if last_order == 1:
                x = x - a * phi1 * 0.5 * dt
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                d1 = (ms[-2] - ms[-1]) / r
                g = phi1 / -h - 1
                b1 = g / phi1
                b2 = (g / -h - 0.5) * 2 / phi1
                rho0 = (b1 - b2) / (1 - r)  # solve [[1,1],[r,1]] rho = [b1,b2]
                rho1 = b1 - rho0
                x = x - a * phi1 * (rho0 * d1 + rho1 * dt)
        ms.append(m)
        order = min(2, i + 1, N - i)
        last_x, last_order = x, order
        with np.errstate(invalid="ignore"):
            h = lam[i + 1] - lam[i]
            phi1 = np.expm1(-h)
        a = 1 - sig[i + 1]
        xn = sig[i + 1] / sig[i] * x - a * phi1 * m
        if order == 2:
            r = (lam[i - 1] - lam[i]) / h
            xn = xn - a * phi1 * 0.5 * (ms[-2] - m) / r
        outs.append(xn)
        x = xn
    return outs


def ref_flow_dpmpp(sig, x, vs):
    """Flow DPM-Solver++ (midpoint, order 2, first step and final step order 1) in float64."""
    N = len(sig) - 1
    with np.errstate(divide="ignore"):
        lam = np.log(1 - sig) - np.log(sig)  # lam[0] = -inf at sigma 1, lam[N] = +inf
    ms, outs = [], []
    for i in range(N):
        m = x - sig[i] * vs[i]
        ms.append(m)
        h = lam[i + 1] - lam[i]
        a = 1 - sig[i + 1]
        xn = sig[i + 1] / sig[i] * x - a * np.expm1(-h) * m
        if 0 < i < N - 1:
            r0 = (lam[i] - lam[i - 1]) / h  # inf after a sigma-1 start -> D1 = 0
            xn = xn - 0.5 * a * np.expm1(-h) * (m - ms[-2]) / r0
        outs.append(xn)
        x = xn
    return outs


def _run_both(solver, ref_fn, steps, shift, int_t=False):
    sched, ts = build_scheduler(solver, steps, shift, "cpu")
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 3, 5, 6)  # [B, C, T, H, W] like latents[None]
    x = torch.randn(shape, generator=g)
    vs = [torch.randn(shape, generator=g) for _ in range(steps)]
    sig = sched.sigmas.double().numpy()  # reference keeps fp32 sigmas; promote for the fp64 math
    ref = ref_fn(sig, x.double().numpy(), [v.double().numpy() for v in vs])
    errs = []
    for i, t in enumerate(ts):
        x = sched.step(vs[i], int(t) if int_t else t, x, return_dict=False)[0]
        errs.append(float(np.abs(x.double().numpy() - ref[i]).max() / np.abs(ref[i]).max()))
    return errs


@pytest.mark.parametrize("steps,shift", [(40, 12.0), (7, 5.0), (2, 12.0), (1, 12.0)])
def test_unipc_step_matches_reference_math(steps, shift):
    errs = _run_both("unipc", ref_flow_unipc, steps, shift)
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("steps,shift", [(40, 12.0), (7, 5.0), (2, 12.0), (1, 12.0)])
def test_dpmpp_step_matches_reference_math(steps, shift):
    errs = _run_both("dpm++", ref_flow_dpmpp, steps, shift)
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("solver,ref_fn", [("unipc", ref_flow_unipc), ("dpm++", ref_flow_dpmpp)])
def test_rebuild_fresh_state_and_python_int_t(solver, ref_fn):
    # Two builds share no multistep state; the pipeline may pass t as a Python int.
    a = _run_both(solver, ref_fn, 5, 12.0)
    b = _run_both(solver, ref_fn, 5, 12.0, int_t=True)
    assert a == b


# ---------------------------------------------------------------- euler (Wan2.2-Lightning fork)

def ref_euler_sigmas(steps, shift):
    """The fork's schedule written out independently: float64 grid rounded once to float32, then float32 math."""
    grid = 1000.0 - np.arange(steps + 1, dtype=np.float64) * (1000.0 / steps)
    grid[-1] = 0.0
    s = torch.from_numpy(grid.astype(np.float32)) / 1000
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.pinned  # hard-coded reference numbers: rerun under other instruction sets (.ci/run)
def test_euler_4_steps_shift5_exact():
    sched, ts = build_scheduler("euler", 4, 5.0, "cpu")
    assert ts.dtype == torch.float32 and ts.device.type == "cpu"
    assert ts.tolist() == [1000.0, 937.5, 833.3333129882812, 625.0]  # unrounded: not 833
    assert sched.timesteps.tolist() == ts.tolist()
    assert sched.sigmas.dtype == torch.float32
    assert sched.sigmas.tolist() == torch.tensor([1.0, 0.9375, 0.8333333, 0.625, 0.0]).tolist()
    experts = [expert_for_timestep(t, BOUNDARY) for t in ts.tolist()]
    assert experts == ["high", "high", "low", "low"]  # the fork's 2 + 2 split


@pytest.mark.parametrize("steps", [1, 2, 8, 40])
@pytest.mark.parametrize("shift", [5.0, 12.0, 1.0, 3.0])
def test_euler_tables_other_settings(steps, shift):
    sched, ts = build_scheduler("euler", steps, shift, "cpu")
    ref = ref_euler_sigmas(steps, shift)
    assert torch.equal(sched.sigmas, ref) and float(sched.sigmas[-1]) == 0.0
    assert ts.dtype == torch.float32 and torch.equal(ts, ref[:-1] * 1000)
    exact = _shift(np.linspace(1.0, 0.0, steps + 1), shift)  # float64 math: only fp32 rounding apart
    assert np.abs(sched.sigmas.double().numpy() - exact).max() <= 1e-6
    assert float(ts[0]) == 1000.0 and len(ts) == steps


@pytest.mark.parametrize("steps,shift", [(4, 5.0), (7, 12.0), (1, 5.0)])
def test_euler_step_update(steps, shift):
    sched, ts = build_scheduler("euler", steps, shift, "cpu")
    sched.set_begin_index(0)
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 3, 5, 6)
    x = torch.randn(shape, generator=g)
    sig = ref_euler_sigmas(steps, shift)
    for i, t in enumerate(ts.tolist()):
        v = torch.randn(shape, generator=g)
        out = sched.step(v, t, x, return_dict=False)[0]
        want = x + (sig[i + 1] - sig[i]) * v
        assert out.dtype == torch.float32 and torch.equal(out, want)
        x = out
    assert sched.step_index == steps
    with pytest.raises(IndexError):
        sched.step(v, 0.0, x, return_dict=False)


def test_euler_straight_flow_reaches_x0_and_dtypes():
    # A constant velocity v = noise - x0 is integrated exactly: the last step lands on sigma 0, i.e. on x0.
    sched, ts = build_scheduler("euler", 4, 5.0, "cpu")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    x = noise.clone()
    for t in ts:
        x = sched.step(noise - x0, t, x).prev_sample
    assert (x - x0).abs().max() < 1e-5
    # bf16 inputs: the update is done (and returned) in float32, like the fork
    sched, _ = build_scheduler("euler", 4, 5.0, "cpu")
    xb, vb = noise.bfloat16(), (noise - x0).bfloat16()
    out = sched.step(vb, 1000.0, xb, return_dict=False)[0]
    assert out.dtype == torch.float32 and torch.equal(out, xb.float() + (0.9375 - 1.0) * vb.float())
    sched.set_begin_index(0)  # restarts the schedule
    assert torch.equal(sched.step(vb, 1000.0, xb, return_dict=False)[0], out)


# ---------------------------------------------------------------- errors

def test_bad_solver():
    with pytest.raises(ValueError, match=r"unipc.*dpm\+\+.*euler"):
        build_scheduler("heun", 40, 12.0, "cpu")


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="sampling_steps"):
        build_scheduler("unipc", steps, 12.0, "cpu")
