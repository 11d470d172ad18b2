"""Every speed switch against the original path on the tiny model (non-zero random weights, fp32 on CPU), and the
A/B contract: per-call options change only the call, load-time options need a new pipeline, globals are restored."""
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from wan.errors import LoadTimeOptionError
from wan.guidance import BatchedPass, CondOnly, TwoPasses, choose_guidance
from wan.options import CALL_FIELDS, FAST_PRESET, LOAD_FIELDS, RuntimeOptions, fast_options
from wan.testing.tiny import build_tiny_dit

GEN = dict(size=(64, 64), frame_num=5, shift=12.0, sample_solver="unipc", sampling_steps=4, guide_scale=(3.0, 4.0),
           seed=11)
PROMPT, NEG = "a cat boxing on a stage under bright light", "static, blurry"
# every per-call switch on (compile separately: it is slow on CPU)
CALL_FAST = dict(batched_cfg=True, tf32=True, fast_time_embedding=True, fast_rope=True, attn_backend="math")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dit_inputs(seed=0, text_lens=(7, 19)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 8, 12, generator=g)
    return x, [torch.randn(n, 4096, generator=g) for n in text_lens]


def new_pipe(tiny_ckpt, **options):
    from wan.configs import WAN_CONFIGS
    from wan.text2video import WanT2V

    return WanT2V(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, device="cpu", options=RuntimeOptions(**options))


def generate(pipe, options=None, **kw):
    video, latent = pipe.generate(PROMPT, n_prompt=NEG, options=options, return_latents=True, **{**GEN, **kw})
    return video, latent, list(pipe.last_result.expert_trace)


@pytest.mark.parametrize("switch", ["fast_rope", "fast_time_embedding"])
def test_dit_switch_matches_original(switch):
    model = build_tiny_dit(1)
    x, (ctx, _) = dit_inputs()
    with torch.no_grad():
        ref = model([x], torch.tensor([913]), [ctx], seq_len=80)[0]  # 72 tokens + 8 padded
        out = model.configure(**{switch: True})([x], torch.tensor([913]), [ctx], seq_len=80)[0]
    assert ref.abs().mean() > 0.05
    assert rel(out, ref) < 1e-5, rel(out, ref)


def test_guidance_strategies_match_two_passes_with_different_text_lengths():
    model = build_tiny_dit(2)
    x, ctx = dit_inputs(text_lens=(5, 23))
    t = torch.tensor([880])
    with torch.no_grad():
        ref = TwoPasses()(model, x, t, ctx[:1], ctx[1:], 80, 4.0)
        batched = BatchedPass()(model, x, t, ctx[:1], ctx[1:], 80, 4.0)
        ref1 = TwoPasses()(model, x, t, ctx[:1], ctx[1:], 80, 1.0)
        one = CondOnly()(model, x, t, ctx[:1], None, 80, 1.0)
    assert ref.abs().mean() > 0.05
    assert rel(batched, ref) < 1e-5, rel(batched, ref)
    # uncond + 1 * (cond - uncond) is cond up to one fp32 rounding of the subtraction and addition
    assert rel(one, ref1) < 1e-6 and (one - ref1).abs().max() < 1e-5


def test_choose_guidance():
    assert isinstance(choose_guidance(3.0, batched=False), TwoPasses)
    assert isinstance(choose_guidance(3.0, batched=True), BatchedPass)
    assert isinstance(choose_guidance(1.0, batched=True), CondOnly)
    with pytest.raises(ValueError, match="cfg_parallel"):
        choose_guidance(1.0, batched=False, cfg_group=object())
    with pytest.raises(ValueError, match="finite"):
        choose_guidance(float("nan"), batched=False)


@pytest.fixture(scope="module")
def original(tiny_pipe):
    return generate(tiny_pipe)


@pytest.mark.parametrize("flags", [{"batched_cfg": True}, {"fast_rope": True}, {"fast_time_embedding": True},
                                   {"tf32": True}, {"attn_backend": "math"}])
def test_each_switch_keeps_the_video(tiny_pipe, original, flags):
    video, latent, trace = generate(tiny_pipe, RuntimeOptions(**flags))
    assert trace == original[2]
    assert rel(latent, original[1]) < 1e-5, rel(latent, original[1])
    assert (video - original[0]).abs().max() < 1e-4


def test_ab_in_one_process_equals_fresh_pipelines(tiny_ckpt):
    """original -> fast per-call -> original on one pipeline == fresh pipelines with those options, bit for bit."""
    pipe = new_pipe(tiny_ckpt)
    first = generate(pipe)
    middle = generate(pipe, RuntimeOptions(**CALL_FAST))
    assert pipe.last_result.options.batched_cfg and pipe.last_result.backends["rope"].startswith("fast")
    last = generate(pipe, RuntimeOptions())
    assert pipe.last_result.backends["rope"].startswith("reference")
    fresh_orig = generate(new_pipe(tiny_ckpt))
    fresh_fast = generate(new_pipe(tiny_ckpt, **CALL_FAST))
    for run in (first, last):
        assert torch.equal(run[0], fresh_orig[0]) and torch.equal(run[1], fresh_orig[1])
    assert torch.equal(middle[0], fresh_fast[0]) and torch.equal(middle[1], fresh_fast[1])
    assert not torch.equal(middle[1], first[1])  # the switches really ran (different rounding)
    # a call without options runs the built options again
    assert generate(pipe)[1].equal(first[1]) and not pipe.last_result.options.batched_cfg


def test_load_time_fields_need_a_new_pipeline(tiny_pipe):
    with pytest.raises(LoadTimeOptionError, match="vae_dtype"):
        tiny_pipe.generate(PROMPT, options=RuntimeOptions(vae_dtype="bf16"), **GEN)
    with pytest.raises(LoadTimeOptionError, match="t5_cpu"):
        tiny_pipe.generate(PROMPT, options=RuntimeOptions(t5_cpu=True), **GEN)
    with pytest.raises(LoadTimeOptionError, match="offload_model"):
        tiny_pipe.generate(PROMPT, offload_model=True, **GEN)
    # on the CPU fast_options() resolves to what the build has (bf16 weights and offload are GPU-only): accepted
    tiny_pipe.generate(PROMPT, options=fast_options(compile=False, vae_dtype="fp32"), **{**GEN, "sampling_steps": 1})
    assert tiny_pipe.last_result.options.convert_model_dtype is False  # what ran, not what was asked


def test_lifetimes_cover_every_field():
    names = {f.name for f in dataclasses.fields(RuntimeOptions)}
    assert set(LOAD_FIELDS) | set(CALL_FIELDS) == names and not set(LOAD_FIELDS) & set(CALL_FIELDS)
    assert {"offload_model", "convert_model_dtype", "vae_dtype", "ulysses_size", "dit_fsdp"} <= set(LOAD_FIELDS)
    assert {"attn_backend", "compile", "tf32", "batched_cfg"} <= set(CALL_FIELDS)


def _flags():
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def test_global_flags_restored_also_after_an_exception(tiny_pipe):
    before = _flags()
    generate(tiny_pipe, RuntimeOptions(tf32=True), sampling_steps=1)
    assert _flags() == before
    seen = {}
    model = tiny_pipe.high_noise_model

    def boom(*a, **k):
        seen["tf32"] = torch.backends.cuda.matmul.allow_tf32
        raise RuntimeError("injected")

    model.forward = boom
    try:
        with pytest.raises(RuntimeError, match="injected"):
            generate(tiny_pipe, RuntimeOptions(tf32=True), sampling_steps=1)
    finally:
        del model.forward  # the class's forward again (assigning `orig` back would leave an instance attribute)
    assert seen["tf32"] is True and _flags() == before
    # and the pipeline is back at its built configuration
    assert tiny_pipe.call_options == tiny_pipe.options


def test_placements_equal_on_cpu(tiny_ckpt, original):
    """The whole-expert offload placement (the reference's) computes what the resident one does."""
    from wan.placement import ExpertOffload

    pipe = new_pipe(tiny_ckpt)
    assert pipe.placement.name == "resident"
    pipe.placement = ExpertOffload(pipe.device, False)
    pipe.placement.attach({"high": pipe.high_noise_model, "low": pipe.low_noise_model}, pipe.text_encoder)
    video, latent, trace = generate(pipe)
    assert torch.equal(latent, original[1]) and torch.equal(video, original[0]) and trace == original[2]


def test_guidance_one_makes_one_call_per_step_and_skips_the_negative_prompt(tiny_pipe):
    calls = {"dit": 0, "texts": []}
    enc = tiny_pipe.placement.encode
    models = (tiny_pipe.high_noise_model, tiny_pipe.low_noise_model)
    origs = [m.forward for m in models]

    def counting(orig):
        def f(*a, **k):
            calls["dit"] += 1
            return orig(*a, **k)
        return f

    def encode(texts):
        calls["texts"] += texts
        return enc(texts)

    for m, o in zip(models, origs):
        m.forward = counting(o)
    tiny_pipe.placement.encode = encode
    try:
        _, one, _ = generate(tiny_pipe, guide_scale=1.0)
        assert calls["dit"] == GEN["sampling_steps"] and calls["texts"] == [PROMPT]
        assert tiny_pipe.last_result.backends["guidance"]["high"].startswith("one conditional pass")
        calls["dit"] = 0
        _, two, _ = generate(tiny_pipe, RuntimeOptions(), guide_scale=1.0 + 2e-6)  # just above the cut: two passes
        assert calls["dit"] == 2 * GEN["sampling_steps"]
    finally:
        for m in models:
            del m.forward
        del tiny_pipe.placement.encode
    assert rel(one, two) < 1e-4


def test_fast_preset_with_compile_keeps_the_video_and_never_recompiles(tiny_ckpt, original):
    counters.clear()
    pipe = new_pipe(tiny_ckpt, **fast_options(vae_dtype="fp32").__dict__)
    video, latent, trace = generate(pipe)
    assert pipe.options.compile and pipe.options.batched_cfg
    assert trace == original[2] and "high" in trace and "low" in trace
    assert rel(latent, original[1]) < 1e-4, rel(latent, original[1])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    # another run: both experts, all steps, no new graph and no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(pipe)
    assert counters["stats"]["unique_graphs"] == graphs


def test_fast_preset_contents():
    opts = fast_options(compile=False)
    assert not opts.compile and opts.batched_cfg and opts.fast_rope and opts.fast_time_embedding and opts.tf32
    assert set(FAST_PRESET) <= {f.name for f in dataclasses.fields(RuntimeOptions)}
    with pytest.raises(ValueError, match="attn_backend"):
        RuntimeOptions(attn_backend="flash4")
