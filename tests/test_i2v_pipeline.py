"""WanI2V on the tiny I2V checkpoint (random non-zero weights, in_dim 36, written and loaded in the official layout):
the whole pipeline against an independent loop written from the facts file (every DiT call's inputs, the final
latent and the video, bit for bit), then each speed switch against the original I2V path within the tolerances of
the T2V tests, A/B in one process, block streaming, banded decode, fp8 (emulated kernels), compile, few-step with a
Lightning-layout LoRA pair, and the public API."""
import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import wan
from i2v_reference import ref_condition, ref_geometry
from wan.configs import WAN_CONFIGS
from wan.configs.model_config import TINY_I2V
from wan.errors import LoadTimeOptionError
from wan.image2video import WanI2V
from wan.options import RuntimeOptions, fast_options
from wan.utils.schedulers import build_scheduler

PROMPT, NEG = "a cat boxing on a stage under bright light", "static, blurry"
AREA = 64 * 64
GEN = dict(max_area=AREA, frame_num=5, shift=5.0, sample_solver="unipc", sampling_steps=4, guide_scale=(3.0, 4.5),
           seed=11)
CALL_FAST = dict(batched_cfg=True, tf32=True, fast_time_embedding=True, fast_rope=True, attn_backend="math",
                 fast_encode=True)


def image(w=50, h=30, seed=0):
    """A smooth random picture (so the bicubic stretch and the VAE see structure, not only noise)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + c) + c) * np.cos(yy / (4 + c)) for c in range(3)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + g.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def new_pipe(ckpt, **options):
    return WanI2V(WAN_CONFIGS["i2v-tiny"], ckpt, device="cpu", options=RuntimeOptions(**options))


def generate(pipe, options=None, img=None, **kw):
    video, latent = pipe.generate(PROMPT, img or image(), n_prompt=NEG, options=options, return_latents=True,
                                  **{**GEN, **kw})
    return video, latent, list(pipe.last_result.expert_trace)


class Spy:
    """Records every DiT call's inputs (per sample: x, t, context, y) of both experts, then runs the real forward."""

    def __init__(self, pipe):
        self.calls, self.models = [], {"high": pipe.high_noise_model, "low": pipe.low_noise_model}

    def __enter__(self):
        for name, m in self.models.items():
            def forward(x, t, context, seq_len, y=None, _orig=m.forward, _name=name):
                for i in range(len(x)):
                    self.calls.append(dict(expert=_name, x=x[i].clone(), t=t.expand(len(x))[i].clone(),
                                           context=context[i].clone(), seq_len=seq_len,
                                           y=None if y is None else y[i].clone()))
                return _orig(x, t, context, seq_len, y=y)
            m.forward = forward
        return self

    def __exit__(self, *exc):
        for m in self.models.values():
            del m.forward


def test_whole_pipeline_matches_an_independent_loop(tiny_i2v_pipe, tiny_i2v_ckpt):
    """Geometry, noise, y, the expert split at t >= 900, the guidance per expert, the same y for both CFG passes,
    x joined before y (16 + 20 channels), the scheduler steps and the decode: as the facts file says, bit for bit."""
    pipe, img, frames, steps, guide = tiny_i2v_pipe, image(50, 30), 9, 6, (3.0, 4.5)
    with Spy(pipe) as spy:
        video, latent = pipe.generate(PROMPT, img, max_area=AREA, frame_num=frames, shift=5.0, sampling_steps=steps,
                                      guide_scale=guide, n_prompt=NEG, seed=7, return_latents=True)
    # the independent re-computation, from the raw checkpoint files and the facts file
    lat_h, lat_w = ref_geometry(50, 30, AREA)
    assert video.shape == (3, frames, 8 * lat_h, 8 * lat_w) == (3, 9, 48, 80)
    y = ref_condition(img, frames, AREA, torch.load(tiny_i2v_ckpt / "Wan2.1_VAE.pth", weights_only=True))
    lat_f, seq_len = (frames - 1) // 4 + 1, ((frames - 1) // 4 + 1) * lat_h * lat_w // 4
    x = torch.randn(16, lat_f, lat_h, lat_w, generator=torch.Generator().manual_seed(7))
    ctx = [pipe.text_encoder([p], torch.device("cpu"))[0].float() for p in (PROMPT, NEG)]
    scheduler, timesteps = build_scheduler("unipc", steps, 5.0, "cpu", 1000)
    want = []
    with torch.no_grad():
        for t in timesteps:
            high = t.item() >= 900
            model, g = (pipe.high_noise_model, guide[1]) if high else (pipe.low_noise_model, guide[0])
            cond, uncond = (model([x], t=t[None], context=[c], seq_len=seq_len, y=[y])[0] for c in ctx)
            want += [("high" if high else "low", x.clone(), t.clone(), c) for c in ctx]
            x = scheduler.step((uncond + g * (cond - uncond))[None], t, x[None], return_dict=False)[0][0]
        ref_video = pipe.vae.decode([x])[0]
    assert len(spy.calls) == 2 * steps == len(want)
    for got, (expert, xi, ti, ci) in zip(spy.calls, want):
        assert got["expert"] == expert and got["seq_len"] == seq_len and torch.equal(got["t"], ti)
        assert torch.equal(got["x"], xi) and torch.equal(got["context"], ci) and torch.equal(got["y"], y)
    assert [c["expert"] for c in spy.calls[::2]] == pipe.last_result.expert_trace
    assert "high" in pipe.last_result.expert_trace and "low" in pipe.last_result.expert_trace
    assert torch.equal(latent, x) and torch.equal(video, ref_video)
    assert latent.abs().mean() > 0.1 and y[4:, 1:].abs().mean() > 0.1  # non-trivial, the black frames included


def test_i2v_dit_is_the_float64_reference_on_noise_then_condition():
    """The i2v DiT joins y after x along the channels (noise 16, mask 4, image latent 16) and is otherwise the t2v
    math: its forward equals the independent float64 forward (test_model.py) of the 36-channel concatenation."""
    from test_model import reference_forward, tiny_model

    model = tiny_model(seed=2, model_type="i2v", in_dim=36)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 3, 4, 6, generator=g) for _ in range(2)]
    ys = [torch.randn(20, 3, 4, 6, generator=g) for _ in range(2)]
    ctx = [torch.randn(n, 4096, generator=g) for n in (5, 9)]
    t = torch.tensor([937, 412])
    with torch.no_grad():
        out = model(xs, t, ctx, seq_len=20, y=ys)
    ref = reference_forward(model, [torch.cat([x, y]) for x, y in zip(xs, ys)], t, ctx, 20)
    for o, r in zip(out, ref):
        assert o.shape == (16, 3, 4, 6) and r.abs().mean() > 0.05
        assert rel(o.double(), r) < 1e-5, rel(o.double(), r)
    swapped = reference_forward(model, [torch.cat([y, x]) for x, y in zip(xs, ys)], t, ctx, 20)
    assert rel(out[0].double(), swapped[0]) > 0.1  # the order matters, so the test sees it


def test_40_steps_split_15_high_25_low(tiny_i2v_pipe):
    tiny_i2v_pipe.generate(PROMPT, image(), max_area=AREA, frame_num=1, sampling_steps=40, shift=5.0, seed=1)
    assert tiny_i2v_pipe.last_result.expert_trace == ["high"] * 15 + ["low"] * 25  # boundary 0.900, facts §1.8


def test_recorded_result_and_stage_timings(tiny_i2v_pipe):
    generate(tiny_i2v_pipe, sampling_steps=2)
    res = tiny_i2v_pipe.last_result
    assert {"text_encode", "vae_encode", "dit_high", "vae_decode"} <= set(res.timings) and res.seed == 11
    assert res.backends["guidance"] == {"low": "two passes (reference)", "high": "two passes (reference)"}


@pytest.fixture(scope="module")
def original(tiny_i2v_pipe):
    return generate(tiny_i2v_pipe)


@pytest.mark.parametrize("flags", [{"batched_cfg": True}, {"fast_rope": True}, {"fast_time_embedding": True},
                                   {"tf32": True}, {"attn_backend": "math"}, CALL_FAST])
def test_each_switch_keeps_the_video(tiny_i2v_pipe, original, flags):
    video, latent, trace = generate(tiny_i2v_pipe, RuntimeOptions(**flags))
    assert trace == original[2] and original[1].abs().mean() > 0.1
    assert rel(latent, original[1]) < 1e-5, rel(latent, original[1])
    assert (video - original[0]).abs().max() < 1e-4


def test_fast_encode_is_bit_for_bit_and_recorded(tiny_i2v_pipe, original):
    video, latent, _ = generate(tiny_i2v_pipe, RuntimeOptions(fast_encode=True))
    assert torch.equal(latent, original[1]) and torch.equal(video, original[0])
    assert tiny_i2v_pipe.last_result.backends["vae_encode"].startswith("reuses repeated layers")
    generate(tiny_i2v_pipe, sampling_steps=1)
    assert tiny_i2v_pipe.last_result.backends["vae_encode"] == "every chunk, every layer (reference)"


def test_ab_in_one_process_equals_fresh_pipelines(tiny_i2v_ckpt):
    pipe = new_pipe(tiny_i2v_ckpt)
    first = generate(pipe)
    middle = generate(pipe, RuntimeOptions(**CALL_FAST))
    assert pipe.last_result.options.batched_cfg and pipe.last_result.backends["rope"].startswith("fast")
    last = generate(pipe, RuntimeOptions())
    fresh_orig, fresh_fast = generate(new_pipe(tiny_i2v_ckpt)), generate(new_pipe(tiny_i2v_ckpt, **CALL_FAST))
    for run in (first, last):
        assert torch.equal(run[0], fresh_orig[0]) and torch.equal(run[1], fresh_orig[1])
    assert torch.equal(middle[0], fresh_fast[0]) and torch.equal(middle[1], fresh_fast[1])
    assert not torch.equal(middle[1], first[1])  # the switches really ran
    with pytest.raises(LoadTimeOptionError, match="vae_dtype.*build a new WanI2V"):
        pipe.generate(PROMPT, image(), options=RuntimeOptions(vae_dtype="bf16"), **GEN)


def test_block_streaming_and_banded_decode(tiny_i2v_ckpt, original):
    streamed = generate(new_pipe(tiny_i2v_ckpt, stream_blocks=2))
    assert torch.equal(streamed[1], original[1]) and torch.equal(streamed[0], original[0])
    banded = generate(new_pipe(tiny_i2v_ckpt, vae_bands=3))
    assert torch.equal(banded[1], original[1]) and (banded[0] - original[0]).abs().max() <= 1e-5


def test_fp8_emulated_runs_close_to_the_original(tiny_i2v_ckpt, original):
    pipe = WanI2V(WAN_CONFIGS["i2v-tiny"], tiny_i2v_ckpt, device="cpu", options=RuntimeOptions(fp8_linear="all"),
                  fp8_kernel="emulated")
    _, latent, trace = generate(pipe)
    assert pipe.backends()["fp8_linear"]["high"].startswith("all (emulated)") and trace == original[2]
    assert 0 < rel(latent, original[1]) < 0.1


def test_fast_preset_with_compile_keeps_the_video_and_never_recompiles(tiny_i2v_ckpt, original):
    counters.clear()
    pipe = WanI2V(WAN_CONFIGS["i2v-tiny"], tiny_i2v_ckpt, device="cpu", options=fast_options(vae_dtype="fp32"))
    video, latent, trace = generate(pipe)
    assert pipe.options.compile and trace == original[2] and "high" in trace and "low" in trace
    assert rel(latent, original[1]) < 1e-4, rel(latent, original[1])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):  # both experts, all steps, another image of its size
        generate(pipe, img=image(seed=3), seed=12)
    assert counters["stats"]["unique_graphs"] == graphs


# ---- few-step: the Lightning I2V LoRA layout -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from wan.testing.random_lora import write_random_lora_dir

    return write_random_lora_dir(tmp_path_factory.mktemp("i2v_lora"), TINY_I2V, rank=4, seed=5)


def test_fewstep_lightning_lora_euler_two_plus_two(tiny_i2v_ckpt, lora_dir, tiny_i2v_pipe):
    pipe = WanI2V(WAN_CONFIGS["i2v-tiny"], tiny_i2v_ckpt, device="cpu", lora_dir=str(lora_dir))
    assert not torch.equal(pipe.high_noise_model.blocks[0].ffn[0].weight,
                           tiny_i2v_pipe.high_noise_model.blocks[0].ffn[0].weight)  # merged
    few = dict(max_area=AREA, frame_num=5, shift=5.0, sample_solver="euler", sampling_steps=4, guide_scale=1.0, seed=3)
    with Spy(pipe) as spy:
        video, latent = pipe.generate(PROMPT, image(), return_latents=True, **few)
    assert [c["expert"] for c in spy.calls] == ["high", "high", "low", "low"]  # one conditional pass per step
    assert [c["t"].item() for c in spy.calls] == [1000.0, 937.5, pytest.approx(833.3333129882812, abs=0), 625.0]
    y = spy.calls[0]["y"]
    assert all(torch.equal(c["y"], y) for c in spy.calls) and y.shape[0] == 20
    assert pipe.last_result.backends["guidance"]["high"] == "one conditional pass (guidance 1)"
    assert video.shape == (3, 5, 48, 80) and torch.isfinite(latent).all()
    # the same few steps without the LoRA differ: the merge reached the experts
    _, plain = tiny_i2v_pipe.generate(PROMPT, image(), return_latents=True, **few)
    assert rel(latent, plain) > 1e-3


# ---- inputs and API ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_refused_before_running(tiny_i2v_pipe):
    with pytest.raises(ValueError, match="RGB"):
        tiny_i2v_pipe.generate(PROMPT, image().convert("RGBA"), **GEN)
    with pytest.raises(ValueError, match="crop the image"):
        tiny_i2v_pipe.generate(PROMPT, image(2000, 16), **GEN)
    with pytest.raises(ValueError, match="4n\\+1"):
        tiny_i2v_pipe.generate(PROMPT, image(), **{**GEN, "frame_num": 8})
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_i2v_pipe.generate(" ", image(), **GEN)
    with pytest.raises(ValueError, match="needs y"):
        tiny_i2v_pipe.high_noise_model([torch.zeros(16, 1, 4, 4)], torch.tensor([1.0]), [torch.zeros(3, 4096)], 4)


def test_public_api_follows_the_reference():
    assert wan.WanI2V is WanI2V and "WanI2V" in wan.__all__
    gen = {n: p.default for n, p in inspect.signature(WanI2V.generate).parameters.items() if n != "self"}
    assert list(gen)[:11] == ["input_prompt", "img", "max_area", "frame_num", "shift", "sample_solver",
                              "sampling_steps", "guide_scale", "n_prompt", "seed", "offload_model"]
    assert (gen["max_area"], gen["frame_num"], gen["shift"], gen["sample_solver"], gen["sampling_steps"],
            gen["guide_scale"], gen["n_prompt"], gen["seed"], gen["offload_model"]) == \
        (720 * 1280, 81, 5.0, "unipc", 40, 5.0, "", -1, None)
    cfg = WAN_CONFIGS["i2v-A14B"]
    assert (cfg.boundary, cfg.sample_shift, cfg.sample_guide_scale, cfg.sample_steps, cfg.frame_num,
            cfg.sample_fps, cfg.arch.in_dim, cfg.arch.model_type) == (0.9, 5.0, (3.5, 3.5), 40, 81, 16, 36, "i2v")
    assert cfg.arch.dim == 5120 and cfg.arch.num_layers == 40 and cfg.takes_image
    assert not WAN_CONFIGS["t2v-A14B"].takes_image


def test_tiny_i2v_checkpoint_layout(tiny_i2v_ckpt, tmp_path):
    import json

    from wan.testing.tiny import default_tiny_dir, write_tiny_checkpoint

    for sub in ("high_noise_model", "low_noise_model"):
        cfg = json.loads((tiny_i2v_ckpt / sub / "config.json").read_text())
        assert cfg["model_type"] == "i2v" and cfg["in_dim"] == 36 and cfg["out_dim"] == 16
    assert default_tiny_dir("i2v-tiny").name.startswith("i2v-tiny-v") != default_tiny_dir().name.startswith("i2v")
    # the head is not zero (the reference zero-initialises it): a real test of every path above
    from wan.modules.model import WanModel

    m = WanModel.from_pretrained(tiny_i2v_ckpt, "high_noise_model")
    assert m.head.head.weight.abs().mean() > 0.01 and m.patch_embedding.weight.shape[1] == 36
    with pytest.raises(ValueError, match="not a tiny task"):
        write_tiny_checkpoint(tmp_path / "x", task="i2v-A14B")
