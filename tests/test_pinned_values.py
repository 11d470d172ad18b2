"""Pinned numbers of the tiny pipeline, true on every CPU: each stage on fixed inputs (tight), the whole guided run
(looser), and proof that a 0.5% change of any stage fails them. Stages and fingerprints: wan/testing/pinned_stages.py.

Why per stage: four guided steps of a random model amplify a last-bit difference between CPU kernels to ~1e-2 in the
latent, so an end-to-end pin alone is either red on some CPUs or blind; a single pass of one stage is not chaotic.

Pinned under the default settings (torch 2.13 CPU, AVX512 with avx512_bf16, 2 threads). Measured spread, the max
|diff| from these values over ONEDNN_MAX_CPU_ISA AVX2 and SSE41, ATEN_CPU_CAPABILITY default, avx2 and avx512,
OMP_NUM_THREADS 1, 2, 4 and 8, and torch 2.11 (default, ISA AVX2, capability default, 1 thread):
  pin               sampled elements   mean, mean|x|, std   whole tensor   0.5% scale moves std by
  t5 (bf16 on CPU)  1.6e-2 (bf16 ulps) 3.7e-5               6.2e-2         5.7e-3
  dit_high, _low    1.3e-6             8.0e-8               2.6e-6         5.5e-3, 6.0e-3
  scheduler_*       4.8e-7             3.7e-9               1.5e-6         1.1e-2 to 1.8e-2
  vae               1.4e-6             4.6e-8               4.4e-6         2.0e-3
  e2e_latent        4.1e-3             1.9e-4               1.1e-2         (DiT 4.1e-3, scheduler 1.2e-2, T5 6e-4)
  e2e_video         3.0e-3             1.5e-5               6.2e-3         (VAE 2.1e-3, others < 4e-5)
So each stage's own std moves 14x (t5) to 1000x (fp32 stages) its tolerance below; the end-to-end pin alone catches
the DiT (2x), scheduler (6x) and VAE (14x) changes, not T5's.
Re-pin only in a deliberate, explained commit: `python -m wan.testing.pinned_stages` prints the values.
"""
import pytest
import torch

from wan.testing.pinned_stages import end_to_end, fingerprint, scaled_stage, stage_outputs

pytestmark = pytest.mark.pinned  # CI runs these again under other instruction sets (.ci/run)

# pin -> 12 evenly spaced elements, then mean, mean |x|, std
PINS = {
    "t5": [-1.101562, -0.7890625, 0.1552734, -0.1054688, -0.3535156, 1.960938, 0.6015625, 0.2109375, 0.6054688,
           0.3554688, -0.2421875, 0.7539062, -0.002283255, 0.7973351, 1.003309],
    "dit_high": [1.656543, 1.130339, -0.7165712, 3.729053, -0.1722073, 1.885706, -0.5754008, 0.3428651, -0.1691563,
                 -0.1679281, -0.7207468, -1.580855, -0.006830668, 0.8754044, 1.102147],
    "dit_low": [1.050997, -0.2115153, 0.384758, -1.799348, -0.8823923, 1.943182, -0.06734184, -1.510459, 0.4797605,
                -0.9644885, -0.4100774, -0.5047456, -0.07154719, 0.9681701, 1.20833],
    "scheduler_unipc": [-0.33758, 1.615695, 0.4892706, 0.3858111, 0.8080022, -0.148607, 1.39748, 1.299553, 0.4690689,
                        1.591623, -0.2312096, -3.273564, 0.006211522, 1.027747, 1.286122],
    "scheduler_dpm++": [-0.348082, 1.595059, 0.4960468, 0.4206014, 0.7776299, -0.1532844, 1.371299, 1.300379,
                        0.4756432, 1.599661, -0.265642, -3.278792, 0.005958624, 1.024707, 1.282884],
    "scheduler_euler": [-0.4440992, 1.576258, 0.4499026, 0.4885285, 0.6985679, -0.1720224, 1.299097, 1.469679,
                        0.3377826, 1.476663, -0.4224027, -3.298588, 0.004401647, 1.019154, 1.276968],
    "vae": [-0.02119637, -0.1834215, -0.7215337, 0.006892404, 0.3295794, -0.2026156, 0.4982393, -0.7769425,
            -0.004470355, -0.3714697, 0.3258691, 0.4127871, -0.03211022, 0.3227864, 0.4048421],
    "e2e_latent": [-0.3494237, 0.5745865, 1.099011, -0.8191267, 0.7003897, 1.404544, 0.2851571, 0.5964096, -2.690577,
                   -0.2574884, -0.1646875, -1.140044, 0.01648581, 1.214102, 1.528387],
    "e2e_video": [0.004068151, -0.2662997, 0.3814309, 0.07450297, 0.4744981, 0.4596275, 0.2517525, 0.2159639,
                  0.1171719, 0.1807033, -0.1344704, 0.2007493, -0.05700231, 0.3392759, 0.4208099],
}
# pin -> (elements atol, stats atol): fp32 single passes 5e-5 / 5e-6 (>= 35x their spread, >= 400x under what a 0.5%
# change moves); t5 3x its sampled-element spread (2 bf16 ulps) and 11x its stats spread; end to end ~2.3x the
# whole-tensor spread between any two settings (elements) and 10x the stats spread.
FP32_STAGE = (5e-5, 5e-6)
TOL = {"t5": (5e-2, 4e-4), "dit_high": FP32_STAGE, "dit_low": FP32_STAGE, "scheduler_unipc": FP32_STAGE,
       "scheduler_dpm++": FP32_STAGE, "scheduler_euler": FP32_STAGE, "vae": FP32_STAGE,
       "e2e_latent": (3e-2, 2e-3), "e2e_video": (2e-2, 1.5e-4)}
STAGE_PINS = [name for name in PINS if not name.startswith("e2e")]
STAT_NAMES = ("mean", "mean |x|", "std")


def pin_mismatches(name: str, values: list[float]) -> list[str]:
    """One line per fingerprint entry of `name` that is off its pinned value by more than the tolerance."""
    want, (elem_tol, stats_tol) = PINS[name], TOL[name]
    out = []
    for i, (got, pinned) in enumerate(zip(values, want, strict=True)):
        tol, what = (elem_tol, f"element {i}") if i < 12 else (stats_tol, STAT_NAMES[i - 12])
        if not abs(got - pinned) <= tol:  # NaN fails too
            out.append(f"{name} {what}: got {got:.7g}, pinned {pinned:.7g} (|diff| {abs(got - pinned):.1e} > {tol:g})")
    return out


@pytest.fixture(scope="module")
def stage_values(tiny_pipe):
    return {name: fingerprint(x) for name, x in stage_outputs(tiny_pipe).items()}


@pytest.mark.parametrize("name", STAGE_PINS)
def test_stage_matches_pin(stage_values, name):
    assert pin_mismatches(name, stage_values[name]) == []


def test_end_to_end_matches_pin(tiny_pipe):
    latent, video = end_to_end(tiny_pipe)  # T5 -> 3 high-noise + 1 low-noise guided UniPC steps -> VAE
    assert video.shape == (3, 9, 64, 64) and latent.shape == (16, 3, 8, 8)
    assert video.min() >= -1 and video.max() <= 1
    assert pin_mismatches("e2e_latent", fingerprint(latent)) + pin_mismatches("e2e_video", fingerprint(video)) == []
    assert tiny_pipe.last_result.expert_trace == ["high", "high", "high", "low"]  # t = 999 972 922 | 799


@pytest.mark.parametrize("factor", [1.005, 0.995])
@pytest.mark.parametrize("stage, pins", [("t5", ["t5"]), ("dit", ["dit_high", "dit_low"]),
                                         ("scheduler", ["scheduler_unipc", "scheduler_dpm++", "scheduler_euler"]),
                                         ("vae", ["vae"])])
def test_half_percent_change_of_a_stage_fails_its_pins(tiny_pipe, stage, pins, factor):
    with scaled_stage(stage, factor):
        values = {name: fingerprint(x) for name, x in stage_outputs(tiny_pipe, pins).items()}
    for name in pins:  # the std moves 0.5%: 14x (t5) to 1000x (fp32 stages) its tolerance
        assert any(m.startswith(f"{name} std") for m in pin_mismatches(name, values[name])), name


@pytest.mark.parametrize("stage, pin", [("dit", "e2e_latent"), ("scheduler", "e2e_latent"), ("vae", "e2e_video")])
def test_half_percent_change_fails_the_end_to_end_pin(tiny_pipe, stage, pin):
    with scaled_stage(stage, 1.005):  # (T5's 0.5% moves the end-to-end run less than the CPUs do: its own pin above)
        latent, video = end_to_end(tiny_pipe)
    assert pin_mismatches(pin, fingerprint(latent if pin == "e2e_latent" else video))


def test_scaled_stage_scales_only_inside():
    from diffusers import UniPCMultistepScheduler

    from wan.testing.pinned_stages import scheduler_output

    step, before = UniPCMultistepScheduler.step, scheduler_output("unipc")
    with scaled_stage("scheduler", 2.0):
        inside = scheduler_output("unipc")
    assert UniPCMultistepScheduler.step is step and torch.equal(scheduler_output("unipc"), before)
    assert not torch.equal(inside, before)
