"""Every speed switch against the original path on the tiny model (non-zero random weights, fp32 on CPU)."""
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from wan.options import FAST_PRESET, RuntimeOptions, fast_options
from wan.tiny import build_tiny_dit

GEN = dict(size=(64, 64), frame_num=5, shift=12.0, sample_solver="unipc", sampling_steps=4, guide_scale=(3.0, 4.0),
           seed=11, offload_model=False)
PROMPT, NEG = "a cat boxing on a stage under bright light", "static, blurry"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dit_inputs(seed=0, text_lens=(7, 19)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 8, 12, generator=g)
    return x, [torch.randn(n, 4096, generator=g) for n in text_lens]


@pytest.mark.parametrize("switch", ["fast_rope", "fast_time_embedding"])
def test_dit_switch_matches_original(switch):
    model = build_tiny_dit(1)
    x, (ctx, _) = dit_inputs()
    with torch.no_grad():
        ref = model([x], torch.tensor([913]), [ctx], seq_len=80)[0]  # 72 tokens + 8 padded
        out = model.configure(**{switch: True})([x], torch.tensor([913]), [ctx], seq_len=80)[0]
    assert ref.abs().mean() > 0.05
    assert rel(out, ref) < 1e-5, rel(out, ref)


def test_batched_cfg_matches_two_passes_with_different_text_lengths(tiny_pipe):
    model = build_tiny_dit(2)
    x, ctx = dit_inputs(text_lens=(5, 23))
    t = torch.tensor([880])
    with torch.no_grad():
        tiny_pipe.options = RuntimeOptions()
        ref = tiny_pipe._guided_prediction(model, x, t, ctx[:1], ctx[1:], 80, 4.0)
        tiny_pipe.options = RuntimeOptions(batched_cfg=True)
        out = tiny_pipe._guided_prediction(model, x, t, ctx[:1], ctx[1:], 80, 4.0)
    tiny_pipe.options = RuntimeOptions()
    assert ref.abs().mean() > 0.05
    assert rel(out, ref) < 1e-5, rel(out, ref)


def generate(pipe, options):
    video, latent = pipe.generate(PROMPT, n_prompt=NEG, options=options, return_latents=True, **GEN)
    return video, latent, list(pipe.expert_trace)


@pytest.fixture(scope="module")
def original(tiny_pipe):
    return generate(tiny_pipe, RuntimeOptions())


@pytest.mark.parametrize("flags", [{"batched_cfg": True}, {"fast_rope": True}, {"fast_time_embedding": True},
                                   {"tf32": True}, {"attn_backend": "math"}])
def test_each_switch_keeps_the_video(tiny_pipe, original, flags):
    video, latent, trace = generate(tiny_pipe, RuntimeOptions(**flags))
    assert trace == original[2]
    assert rel(latent, original[1]) < 1e-5, rel(latent, original[1])
    assert (video - original[0]).abs().max() < 1e-4


def test_fast_preset_with_compile_keeps_the_video_and_never_recompiles(tiny_pipe, original):
    counters.clear()
    opts = fast_options()
    video, latent, trace = generate(tiny_pipe, opts)
    # effective options: bf16 weights are GPU-only and reported as not applied on CPU
    assert tiny_pipe.options.compile and tiny_pipe.options.batched_cfg
    assert trace == original[2] and "high" in trace and "low" in trace
    assert rel(latent, original[1]) < 1e-4, rel(latent, original[1])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    # another run: both experts, all steps, no new graph and no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(tiny_pipe, tiny_pipe.options)
    assert counters["stats"]["unique_graphs"] == graphs
    tiny_pipe.apply_options(RuntimeOptions())
    assert not any(getattr(b, "_wan_compiled", False) for b in tiny_pipe.low_noise_model.blocks)


def test_fast_preset_contents():
    opts = fast_options(compile=False)
    assert not opts.compile and opts.batched_cfg and opts.fast_rope and opts.fast_time_embedding and opts.tf32
    assert set(FAST_PRESET) <= {f.name for f in dataclasses.fields(RuntimeOptions)}
    with pytest.raises(ValueError, match="attn_backend"):
        RuntimeOptions(attn_backend="flash4")
