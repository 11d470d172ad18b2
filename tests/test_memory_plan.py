"""The placement chooser of --max_gpu_memory: a table of budgets -> placements from the measured costs, the
one-line refusal before loading, an explicit placement winning, and the estimate against the measured 720p peaks."""
import pytest

from wan.configs.model_config import A14B
from wan.errors import MemoryPlanError
from wan.memory_plan import choose, dit_bytes, estimate

P720 = dict(arch=A14B, tokens=75600, pixels=1280 * 720 * 81, bytes_per_param=2, t5_bytes=11.4e9)
P480 = dict(arch=A14B, tokens=32760, pixels=832 * 480 * 81, bytes_per_param=2, t5_bytes=11.4e9)


def test_expert_size_matches_the_parameter_count():
    block, rest = dit_bytes(A14B, 1)
    assert block * 40 + rest == 14_288_491_584  # T2V-A14B, per expert


def test_estimates_match_the_measured_peaks():
    """Whole 720p --fast runs on an H200: 80.4 GB (fp32 VAE) and 70.1 GB (bf16 VAE) allocated, batch 1."""
    fp32 = estimate("resident", **P720, batch=1, vae_dtype="fp32", t5_cpu=False)
    bf16 = estimate("resident", **P720, batch=1, vae_dtype="bf16", t5_cpu=False)
    assert 80.4 <= fp32.peak_gb <= 80.4 * 1.08 and 70.1 <= bf16.peak_gb <= 70.1 * 1.08


@pytest.mark.parametrize("budget,geom,kw,want", [
    (139, P720, dict(vae_dtype="fp32"), "resident"),
    (80, P720, dict(vae_dtype="fp32"), "offload"),
    (80, P720, dict(vae_dtype="bf16"), "resident"),
    (48, P720, dict(vae_dtype="fp32"), "offload"),
    (40, P720, dict(vae_dtype="fp32"), "stream"),
    (24, P720, dict(vae_dtype="bf16", t5_cpu=True), "stream"),
    (16, P480, dict(vae_dtype="bf16", t5_cpu=True), "stream"),
    (48, P480, dict(vae_dtype="fp32"), "offload"),
])
def test_budget_table(budget, geom, kw, want):
    plan = choose(budget, **geom, batch=2, **{"t5_cpu": False, **kw})
    assert plan.placement == want and plan.peak_gb <= budget


def test_too_small_says_what_would_fit():
    with pytest.raises(MemoryPlanError, match=r"allow at least \d+\.\d GB, or --t5_cpu, or --vae_dtype bf16") as err:
        choose(8, **P720, batch=2, vae_dtype="fp32", t5_cpu=False)
    assert "\n" not in str(err.value)


def test_pipeline_plans_before_loading(tiny_ckpt, tmp_path):
    from wan.configs import WAN_CONFIGS
    from wan.options import RuntimeOptions
    from wan.text2video import WanT2V

    cfg = WAN_CONFIGS["t2v-tiny"]
    pipe = WanT2V(cfg, tiny_ckpt, device="cpu", options=RuntimeOptions(max_gpu_memory=100), plan_for=(64, 64, 5))
    assert pipe.memory_plan.placement == "resident" and pipe.placement.name == "resident"
    # an explicit placement wins (and is only estimated)
    pipe = WanT2V(cfg, tiny_ckpt, device="cpu", options=RuntimeOptions(max_gpu_memory=100, stream_blocks=1))
    assert pipe.placement.name == "block-streamed" and pipe.memory_plan.placement == "stream"
    pipe.generate("a cat", size=(64, 64), frame_num=5, sampling_steps=1, seed=1,
                  options=RuntimeOptions(max_gpu_memory=100, stream_blocks=1, fast_rope=True))
    with pytest.raises(MemoryPlanError):  # refused before any weight is read: a folder with nothing in it
        WanT2V(cfg, tmp_path, device="cpu", options=RuntimeOptions(max_gpu_memory=1e-6))
