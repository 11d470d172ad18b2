"""The placement chooser of --max_gpu_memory: a table of budgets -> placements from the measured costs, the
one-line refusal before loading, an explicit placement winning, and the estimate against the measured 720p peaks."""
import json
from pathlib import Path

import pytest

from wan.configs.model_config import A14B
from wan.errors import MemoryPlanError
from wan.memory_plan import choose, dit_bytes, estimate, margin_gb

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
P720 = dict(arch=A14B, tokens=75600, pixels=1280 * 720 * 81, bytes_per_param=2, t5_bytes=11.4e9)
P480 = dict(arch=A14B, tokens=32760, pixels=832 * 480 * 81, bytes_per_param=2, t5_bytes=11.4e9)


def test_expert_size_matches_the_parameter_count():
    block, rest = dit_bytes(A14B, 1)
    assert block * 40 + rest == 14_288_491_584  # T2V-A14B, per expert


def test_fp8_block_bytes_match_the_measured_weights():
    """benchmarks/results/h200_720p_fp8.json: 40 blocks hold 28.11 GB in bf16, 22.45 GB with fp8 FFN linears and
    16.17 GB with fp8 in every converted linear."""
    for which, measured in (("none", 28.11e9), ("ffn", 22.45e9), ("all", 16.17e9)):
        block, _ = dit_bytes(A14B, 2, which)
        assert abs(40 * block - measured) / measured < 0.005, (which, 40 * block)


def test_estimates_match_the_measured_peaks():
    """Whole 720p --fast runs on an H200: 80.4 GB (fp32 VAE) and 70.1 GB (bf16 VAE) allocated, batch 1."""
    fp32 = estimate("resident", **P720, batch=1, vae_dtype="fp32", t5_cpu=False)
    bf16 = estimate("resident", **P720, batch=1, vae_dtype="bf16", t5_cpu=False)
    assert 80.4 <= fp32.peak_gb <= 80.4 * 1.08 and 70.1 <= bf16.peak_gb <= 70.1 * 1.08


@pytest.mark.parametrize("budget,geom,kw,want", [
    (139, P720, dict(vae_dtype="fp32"), "resident"),
    (80, P720, dict(vae_dtype="fp32"), "resident"),  # with the banded decode
    (84.5, P720, dict(vae_dtype="fp32"), "resident"),  # an H100 80GB's free memory: banded too
    (80, P720, dict(vae_dtype="bf16"), "resident"),
    (48, P720, dict(vae_dtype="fp32"), "stream"),
    (40, P720, dict(vae_dtype="fp32"), "stream"),
    (24, P720, dict(vae_dtype="bf16", t5_cpu=True), "stream"),
    (16, P480, dict(vae_dtype="bf16", t5_cpu=True), "stream"),
    (48, P480, dict(vae_dtype="fp32"), "stream"),
])
def test_budget_table(budget, geom, kw, want):
    plan = choose(budget, **geom, batch=2, **{"t5_cpu": False, **kw})
    assert plan.placement == want and plan.peak_gb + margin_gb(budget) <= budget


def test_banded_decode_is_chosen_only_when_the_whole_frame_decode_does_not_fit():
    roomy = choose(139, **P720, batch=2, vae_dtype="fp32", t5_cpu=False)
    assert roomy.vae_bands == 0
    tight = choose(24, **P720, batch=2, vae_dtype="fp32", t5_cpu=False)  # whole-frame fp32 decode: 23.5 GB + slots
    assert tight.placement == "stream" and tight.vae_bands > 1 and tight.peak_gb <= 24
    assert "VAE in 4 bands" in tight.describe()
    explicit = choose(139, **P720, batch=2, vae_dtype="fp32", t5_cpu=False, vae_bands=3)
    assert explicit.vae_bands == 3


def test_too_small_says_what_would_fit():
    """The hint names only switches that lower a phase above the budget: streamed, T5 goes by layers and the decode
    in bands, so at 720p the denoising (activations) is what does not fit 8 GB."""
    with pytest.raises(MemoryPlanError, match=r"allow at least 16\.8 GB, or a smaller --size") as err:
        choose(8, **P720, batch=2, vae_dtype="fp32", t5_cpu=False)
    assert "\n" not in str(err.value) and "--t5_cpu" not in str(err.value)
    with pytest.raises(MemoryPlanError, match=r"or --vae_dtype bf16, or a smaller"):  # an explicit whole-frame decode
        choose(16, **P720, batch=2, vae_dtype="fp32", t5_cpu=False, vae_bands=1)


def test_an_80gb_card_keeps_a_margin():
    """An H100 80GB has 84.5 GB free: the whole-frame 720p decode on top of both resident experts is planned at
    83.5 GB, which fits only without a margin; the plan decodes in bands instead and leaves the margin free."""
    plan = choose(84.5, **P720, batch=2, vae_dtype="fp32", t5_cpu=False)
    assert (plan.placement, plan.vae_bands) == ("resident", 4)
    assert plan.peak_gb + margin_gb(84.5) <= 84.5 and margin_gb(84.5) > 4
    whole = estimate("resident", **P720, batch=2, vae_dtype="fp32", t5_cpu=False)
    assert 84.5 - margin_gb(84.5) < whole.peak_gb < 84.5  # what was chosen before the margin


@pytest.mark.parametrize("budget", [8, 24, 60])
def test_the_budget_a_refusal_names_fits(budget):
    try:
        choose(budget, **P720, batch=2, vae_dtype="fp32", t5_cpu=False, vae_bands=1)
    except MemoryPlanError as e:
        named = float(str(e).split("allow at least ")[1].split(" GB")[0])
        assert choose(named, **P720, batch=2, vae_dtype="fp32", t5_cpu=False, vae_bands=1)
        with pytest.raises(MemoryPlanError):
            choose(named - 0.2, **P720, batch=2, vae_dtype="fp32", t5_cpu=False, vae_bands=1)


def test_streamed_plan_streams_t5_by_layers():
    """Streamed, the text phase holds 2 of T5's 24 blocks, not its 11.4 GB: it is never the peak."""
    plan = choose(24, **P720, batch=2, vae_dtype="fp32", t5_cpu=False)
    assert plan.placement == "stream" and plan.phases["text"] < 4 < plan.phases["denoise"]


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
    # the VAE decode mode rides along: 3 bands of rows decode what whole frames decode (to float rounding)
    banded = WanT2V(cfg, tiny_ckpt, device="cpu", options=RuntimeOptions(vae_bands=3))
    whole = WanT2V(cfg, tiny_ckpt, device="cpu")
    assert banded.vae.decode_bands == 3 and whole.vae.decode_bands == 0
    run = dict(size=(64, 64), frame_num=5, sampling_steps=2, seed=3)
    a, b = banded.generate("a cat", **run), whole.generate("a cat", **run)
    assert (a - b).abs().max().item() <= 1e-5
    with pytest.raises(MemoryPlanError):  # refused before any weight is read: a folder with nothing in it
        WanT2V(cfg, tmp_path, device="cpu", options=RuntimeOptions(max_gpu_memory=1e-6))


def test_fast_with_a_budget_leaves_the_placement_to_the_plan():
    """--fast alone keeps the experts resident; --fast --max_gpu_memory lets the plan choose; explicit wins."""
    from wan.options import fast_options

    assert fast_options().offload_model is False
    assert fast_options(max_gpu_memory=24).offload_model is None
    assert fast_options(max_gpu_memory=24, offload_model=True).offload_model is True
    assert fast_options(max_gpu_memory=24).compile and fast_options(max_gpu_memory=24).batched_cfg


@pytest.mark.parametrize("free,changed,needle", [
    (139.0, False, "resident, expected"),
    (80.0, True, "resident, VAE in 4 bands"),
    (30.0, True, "stream, expected"),
    (24.0, True, "stream, VAE in 4 bands"),
])
def test_fast_plans_for_the_free_memory_only_when_resident_does_not_fit(free, changed, needle):
    from wan.configs import WAN_CONFIGS
    from wan.memory_plan import fast_budget, plan_inputs
    from wan.options import fast_options

    opts = fast_options()
    kw = plan_inputs(WAN_CONFIGS["t2v-A14B"], opts, (1280, 720, 81), 11.4e9)
    new, line = fast_budget(opts, free, **kw)
    assert (new != opts) == changed and needle in line
    if changed:  # the pipeline plans (and caps) under the free memory; the preset's resident choice is lifted
        assert new.max_gpu_memory == free and new.offload_model is None


def test_fast_on_a_card_too_small_says_so():
    from wan.configs import WAN_CONFIGS
    from wan.memory_plan import fast_budget, plan_inputs
    from wan.options import fast_options

    kw = plan_inputs(WAN_CONFIGS["t2v-A14B"], fast_options(), (1280, 720, 81), 11.4e9)
    with pytest.raises(MemoryPlanError, match=r"^--fast: 8.0 GB free on the GPU: .*allow at least"):
        fast_budget(fast_options(), 8.0, **kw)


def test_cli_fast_plans_for_the_free_memory(monkeypatch, tmp_path):
    """generate.py: --fast with no placement flag asks the card for its free memory (mocked: 24 GB free)."""
    import torch

    import generate
    from wan.cli import build_parser, options_from_args
    from wan.configs import WAN_CONFIGS

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24e9, 141e9))
    args = build_parser().parse_args(["--fast", "--size", "1280*720", "--frame_num", "81"])
    args.options = options_from_args(args)
    assert not generate._placement_given(args)
    opts = generate._fast_budget(args, WAN_CONFIGS["t2v-A14B"], torch.device("cuda"), tmp_path)
    assert opts.max_gpu_memory == 24.0 and opts.offload_model is None and opts.compile
    assert generate._placement_given(build_parser().parse_args(["--fast", "--stream_blocks", "2"]))


# ---- image-to-video: the 36-channel patch embedding and the condition's encode ----------------------------------
def test_i2v_expert_size_counts_the_36_input_channels():
    from wan.configs.model_config import A14B_I2V

    block, rest = dit_bytes(A14B_I2V, 1)
    assert block * 40 + rest == 14_288_901_184  # the t2v count + 20 x 4 x 5120 (i2v_ti2v_facts.md §1.9)


def test_i2v_plan_has_an_encode_phase_from_the_measured_cost():
    """The encode's per-pixel cost measured on an H100 (plain and --fast_encode, which holds more); --fast plans the
    --fast_encode one."""
    from wan.configs import WAN_CONFIGS
    from wan.memory_plan import VAE_ENCODE_BYTES_PER_PIXEL, VAE_FAST_ENCODE_BYTES_PER_PIXEL, plan_inputs
    from wan.options import RuntimeOptions, fast_options

    measured = json.loads((RESULTS / "backlog/h100_i2v_encode_720p.json").read_text())["vae_encode"]
    px = 1280 * 720 * 81
    for dtype, m in measured.items():
        assert m["peak_gb"] * 1e9 / px <= VAE_ENCODE_BYTES_PER_PIXEL[dtype] < 1.05 * m["peak_gb"] * 1e9 / px
        assert m["reuse_peak_gb"] * 1e9 / px <= VAE_FAST_ENCODE_BYTES_PER_PIXEL[dtype] < \
            1.05 * m["reuse_peak_gb"] * 1e9 / px
    plain = plan_inputs(WAN_CONFIGS["i2v-A14B"], RuntimeOptions(convert_model_dtype=True), (1280, 720, 81), 11.4e9)
    assert estimate("resident", **plain).phases["encode"] < estimate("resident", **{**plain, "fast_encode": True}
                                                                     ).phases["encode"]
    opts = fast_options()
    t2v = plan_inputs(WAN_CONFIGS["t2v-A14B"], opts, (1280, 720, 81), 11.4e9)
    i2v = plan_inputs(WAN_CONFIGS["i2v-A14B"], opts, (1280, 720, 81), 11.4e9)
    assert t2v["encode_pixels"] == 0 and i2v["encode_pixels"] == 1280 * 720 * 81
    assert "encode" not in estimate("resident", **t2v).phases
    plan = estimate("resident", **i2v)
    base = 2 * sum(x * y for x, y in zip(dit_bytes(i2v["arch"], 2), (40, 1)))
    want = (base + VAE_FAST_ENCODE_BYTES_PER_PIXEL["fp32"] * 1280 * 720 * 81) * 1.05 / 1e9
    assert abs(plan.phases["encode"] - want) < 1e-6 and plan.phases["encode"] < plan.phases["decode"]
    # streamed under 24 GB with the banded decode, the encode is the phase to watch: --fast_encode's reuse does not
    # fit there, the plain encode (the same latent) does; bf16 halves it and keeps the reuse
    tight = choose(24, **i2v)
    assert tight.placement == "stream" and tight.vae_bands and tight.phases["encode"] > tight.phases["decode"]
    assert not tight.fast_encode and "encode" in estimate("stream", **{**i2v, "vae_bands": 4}).phases
    assert estimate("stream", **{**i2v, "vae_bands": 4}).peak_gb + margin_gb(24) > 24  # the reuse would not fit
    with pytest.raises(MemoryPlanError, match="--vae_dtype bf16") as err:
        choose(tight.phases["encode"] - 0.5, **{**i2v, "t5_cpu": True})
    assert "\n" not in str(err.value)
    half = choose(24, **{**i2v, "vae_dtype": "bf16"})
    assert half.fast_encode and half.phases["encode"] < 0.7 * tight.phases["encode"]
    # an 80 GB H100 at 720p: resident, VAE in bands, the plain encode (the reuse's 2 GB more does not fit the margin)
    h100 = choose(84.5, **i2v)
    assert (h100.placement, h100.vae_bands, h100.fast_encode) == ("resident", 4, False)


def test_pipeline_turns_fast_encode_off_where_the_plan_could_not_afford_it(tiny_i2v_ckpt, monkeypatch, caplog):
    """The plan's choice of the plain encode becomes the pipeline's option, said in one warning; a later call that
    asks for --fast_encode gets the plain encode too, and the record says so."""
    from wan import memory_plan
    from wan.configs import WAN_CONFIGS
    from wan.image2video import WanI2V
    from wan.options import RuntimeOptions

    plan = memory_plan.MemoryPlan("resident", 1.0, {"encode": 1.0}, 0, False, False)
    monkeypatch.setattr(memory_plan, "choose", lambda budget, **kw: plan)
    with caplog.at_level("WARNING", logger="wan"):
        pipe = WanI2V(WAN_CONFIGS["i2v-tiny"], tiny_i2v_ckpt, device="cpu",
                      options=RuntimeOptions(max_gpu_memory=100, fast_encode=True))
    assert not pipe.options.fast_encode and "--fast_encode is off for this pipeline" in caplog.text
    assert not pipe._check_call_options(RuntimeOptions(max_gpu_memory=100, fast_encode=True)).fast_encode


def test_ti2v_plan_counts_one_model_and_the_wan22_vae():
    """TI2V-5B: one 5B DiT (4,999,787,712 parameters, facts §2), the Wan 2.2 VAE's counted costs, the per-token time
    embedding of the image mode, a one-frame encode. Every cost here is an estimate until measured on a GPU."""
    from wan.configs import WAN_CONFIGS
    from wan.configs.model_config import TI2V_5B
    from wan.memory_plan import VAE_COSTS, activation_bytes_per_token, plan_inputs
    from wan.options import fast_options

    block, rest = dit_bytes(TI2V_5B, 1)
    assert block * 30 + rest == 4_999_787_712
    kw = plan_inputs(WAN_CONFIGS["ti2v-5B"], fast_options(), (1280, 704, 121), 11.4e9)
    assert (kw["n_models"], kw["vae_version"], kw["per_token_time"], kw["tokens"], kw["encode_pixels"]) == \
        (1, "2.2", True, 27280, 1280 * 704)
    plan = estimate("resident", **kw)
    weights = 2 * (block * 30 + rest)
    act = activation_bytes_per_token(TI2V_5B, True) * 27280 * 2
    assert abs(plan.phases["denoise"] - (weights + act) * 1.05 / 1e9) < 1e-9
    assert abs(plan.phases["decode"] - (weights + VAE_COSTS["2.2"][0]["fp32"] * 1280 * 704 * 121) * 1.05 / 1e9) < 1e-9
    assert activation_bytes_per_token(A14B) == 84e3 and 70e3 < activation_bytes_per_token(TI2V_5B) < 80e3
    # the plans README states (estimates): resident on 80 GB, resident + VAE bands under 24, streamed under 16
    assert choose(80, **kw).placement == "resident" and not choose(80, **kw).vae_bands
    assert (choose(24, **kw).placement, choose(24, **kw).vae_bands, choose(24, **kw).t5_streamed) == \
        ("resident", 4, True)  # T5's whole copy beside the model would be the peak: streamed by layers
    assert (choose(16, **kw).placement, choose(16, **kw).vae_bands) == ("stream", 4)
    t2v = estimate("resident", **plan_inputs(WAN_CONFIGS["t2v-A14B"], fast_options(), (1280, 720, 81), 11.4e9))
    assert t2v.peak_gb > 2 * plan.peak_gb  # two 14B experts


def test_a_resident_plan_streams_t5_where_its_whole_copy_would_be_the_peak():
    """Under a budget a resident plan whose text phase (T5's whole copy beside the DiTs) is its peak streams T5 by
    layers instead; the uncapped --fast check keeps the whole copy where it fits; --t5_cpu or an explicit
    --t5_stream are taken as given."""
    from wan.configs import WAN_CONFIGS
    from wan.memory_plan import fast_budget, plan_inputs
    from wan.options import fast_options

    kw = plan_inputs(WAN_CONFIGS["ti2v-5B"], fast_options(), (1280, 704, 121), 11.4e9)
    whole = choose(24, prefer_t5_stream=False, **kw)
    streamed = choose(24, **kw)
    assert max(whole.phases, key=whole.phases.get) == "text" and not whole.t5_streamed
    assert streamed.t5_streamed and streamed.phases["text"] < whole.phases["text"] - 10
    assert streamed.peak_gb < whole.peak_gb and "T5 streamed by layers" in streamed.describe()
    assert not choose(24, **{**kw, "t5_cpu": True}).t5_streamed
    assert estimate("resident", **{**kw, "t5_streamed": True}).phases == \
        choose(100, **{**kw, "t5_streamed": True}).phases  # explicit: no choice left
    # A14B at 480p on an 80 GB card: the plain --fast run (T5's whole copy) fits: unchanged, uncapped
    a14b = plan_inputs(WAN_CONFIGS["t2v-A14B"], fast_options(), (832, 480, 81), 11.4e9)
    options, line = fast_budget(fast_options(), 84.5, **a14b)
    assert options == fast_options() and "T5 streamed" not in line
    assert choose(84.5, **a14b).t5_streamed  # under an explicit budget the lower peak is chosen


def test_pipeline_sets_t5_stream_from_the_plan(tiny_ckpt, monkeypatch):
    """The plan's choice becomes the resident placement's streamed T5 (options and log say so)."""
    from wan import memory_plan
    from wan.configs import WAN_CONFIGS
    from wan.options import RuntimeOptions
    from wan.text2video import WanT2V

    plan = memory_plan.MemoryPlan("resident", 1.0, {"text": 1.0}, 0, True)
    monkeypatch.setattr(memory_plan, "choose", lambda budget, **kw: plan)
    pipe = WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu", options=RuntimeOptions(max_gpu_memory=100))
    assert pipe.options.t5_stream and pipe.placement.name == "resident" and pipe.placement.t5_streamer is not None
    assert "T5 in host memory streamed by layers" in pipe.placement.describe()
