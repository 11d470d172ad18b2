"""WanTI2V on the tiny TI2V checkpoint (random non-zero weights, 48 channels, the DiT at the folder root, a tiny Wan 2.2
VAE; written and loaded in the official layout): both modes against an independent loop written from the facts file
(every DiT call's latent, per-token timesteps and context, the final latent and the video, bit for bit), then each
speed switch against the original path, A/B in one process, block streaming, banded decode, fp8 (emulated kernels),
compile, and the public API. (Against the reference's own textimage2video.py: bit for bit in both modes, run once on
CPU; see the notes of issue 21.)"""
import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import wan
from ti2v_reference import RefEncoder22, ref_best_output_size, ref_first_frame, ref_loop
from wan.configs import WAN_CONFIGS
from wan.errors import LoadTimeOptionError
from wan.modules.token_timesteps import TokenTimesteps
from wan.options import RuntimeOptions, fast_options
from wan.textimage2video import WanTI2V

PROMPT, NEG = "a cat boxing on a stage under bright light", "static, blurry"
AREA = 64 * 96
GEN = dict(max_area=AREA, frame_num=5, shift=5.0, sample_solver="unipc", sampling_steps=4, guide_scale=5.0, seed=11)
CALL_FAST = dict(batched_cfg=True, tf32=True, fast_time_embedding=True, fast_rope=True, attn_backend="math")


def image(w=50, h=30, seed=0):
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + c) + c) * np.cos(yy / (4 + c)) for c in range(3)], -1) * 100 + 128
    return Image.fromarray(np.clip(base + g.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def new_pipe(ckpt, fp8_kernel="scaled_mm", **options):
    return WanTI2V(WAN_CONFIGS["ti2v-tiny"], ckpt, device="cpu", options=RuntimeOptions(**options),
                   fp8_kernel=fp8_kernel)


def generate(pipe, options=None, img="default", **kw):
    img = image() if img == "default" else img
    video, latent = pipe.generate(PROMPT, img, n_prompt=NEG, options=options, return_latents=True, **{**GEN, **kw})
    return video, latent


class Spy:
    """Records every DiT call's inputs (x, dense per-token t, context) per sample, then runs the real forward."""

    def __init__(self, pipe):
        self.calls, self.model = [], pipe.model

    def __enter__(self):
        def forward(x, t, context, seq_len, y=None, _orig=self.model.forward):
            dense = t.dense() if isinstance(t, TokenTimesteps) else t.view(-1, 1).float().expand(len(x), seq_len)
            for i in range(len(x)):
                self.calls.append(dict(x=x[i].clone(), t=dense.expand(len(x), -1)[i:i + 1].clone(),
                                       raw_t=t, context=context[i].clone(), seq_len=seq_len))
            return _orig(x, t, context, seq_len, y=y)
        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


def _contexts(pipe):
    return [pipe.text_encoder([p], torch.device("cpu"))[0].float() for p in (PROMPT, NEG)]


@pytest.mark.parametrize("solver,steps", [("unipc", 5), ("dpm++", 3)])
def test_image_mode_matches_an_independent_loop(tiny_ti2v_pipe, tiny_ti2v_ckpt, solver, steps):
    """Geometry, LANCZOS + crop, the image's VAE latent, the noise, frame 0 replaced before the loop and after every
    step, the per-token timesteps (0 on frame 0's tokens), CFG, the scheduler and the decode: bit for bit."""
    pipe, img, frames = tiny_ti2v_pipe, image(50, 30), 9
    with Spy(pipe) as spy:
        video, latent = pipe.generate(PROMPT, img, max_area=AREA, frame_num=frames, shift=5.0, sample_solver=solver,
                                      sampling_steps=steps, guide_scale=4.5, n_prompt=NEG, seed=7, return_latents=True)
    ow, oh = ref_best_output_size(50, 30, 32, 32, AREA)
    assert (ow, oh) == (96, 64) and video.shape == (3, frames, oh, ow)
    z = RefEncoder22(torch.load(tiny_ti2v_ckpt / "Wan2.2_VAE.pth", weights_only=True)).encode(
        ref_first_frame(img, ow, oh))
    shape, seq_len = (48, 3, oh // 16, ow // 16), 3 * (oh // 32) * (ow // 32)
    calls, want = ref_loop(pipe, _contexts(pipe), shape, seq_len, steps, 5.0, 4.5, 7, solver, z=z)
    assert len(spy.calls) == len(calls) == 2 * steps
    for got, (x, t, c) in zip(spy.calls, calls):
        assert got["seq_len"] == seq_len and torch.equal(got["x"], x) and torch.equal(got["context"], c)
        assert torch.equal(got["t"], t) and isinstance(got["raw_t"], TokenTimesteps)
    assert (calls[0][1][0, :6] == 0).all() and (calls[0][1][0, 6:] > 900).all()  # frame 0's 2 x 3 tokens: t = 0
    assert torch.equal(latent, want) and torch.equal(latent[:, :1], z)  # the first latent frame is z, exactly
    assert torch.equal(video, pipe.vae.decode([want])[0])
    assert latent[:, 1:].abs().mean() > 0.1 and z.abs().mean() > 0.1
    res = pipe.last_result
    assert res.expert_trace == ["model"] * steps and {"vae_encode", "dit_model", "vae_decode"} <= set(res.timings)
    assert res.backends["latent_constraint"].startswith("first latent frame")


def test_text_mode_matches_an_independent_loop(tiny_ti2v_pipe):
    """No image: t2v with one 48-channel model; the reference's per-token t (all equal) is t as [1]."""
    pipe = tiny_ti2v_pipe
    with Spy(pipe) as spy:
        video, latent = pipe.generate(PROMPT, size=(64, 96), frame_num=5, shift=3.0, sampling_steps=4,
                                      guide_scale=5.0, n_prompt=NEG, seed=8, return_latents=True)
    shape, seq_len = (48, 2, 6, 4), 2 * 3 * 2
    calls, want = ref_loop(pipe, _contexts(pipe), shape, seq_len, 4, 3.0, 5.0, 8)
    assert len(spy.calls) == 8
    for got, (x, t, c) in zip(spy.calls, calls):
        assert torch.equal(got["x"], x) and torch.equal(got["t"], t) and torch.equal(got["context"], c)
        assert got["raw_t"].shape == (1,)
    assert torch.equal(latent, want) and torch.equal(video, pipe.vae.decode([want])[0]) and video.shape[2:] == (96, 64)
    assert pipe.last_result.backends["latent_constraint"] == "none" and "vae_encode" not in pipe.last_result.timings


def test_fast_time_embedding_computes_two_rows_and_gathers_them():
    """The factored timesteps: the MLP runs on the 2 distinct values, the per-token rows are gathered; the same
    embeddings as the per-token reference within rounding, and the same forward."""
    from test_model import tiny_model

    model = tiny_model(seed=3, model_type="ti2v", in_dim=48, out_dim=48)
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(48, 3, 4, 6, generator=g)]
    ctx = [torch.randn(9, 4096, generator=g)]
    idx = torch.tensor([1] * 6 + [0] * 14)
    t = TokenTimesteps(torch.tensor([[937.0, 0.0]]), idx)
    seen = []
    hook = model.time_embedding.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    with torch.no_grad():
        ref = model.embed(x, t, ctx, 20)
        fast = model.configure(fast_time_embedding=True).embed(x, t, ctx, 20)
        out_fast = model(x, t, ctx, 20)[0]
        out_ref = model.configure()(x, t.dense(), ctx, 20)[0]
    hook.remove()
    assert seen[0] == (1, 20, model.freq_dim) and seen[1] == (1, 2, model.freq_dim)  # per token, then 2 rows
    for a, b in zip(ref[1:3], fast[1:3]):  # e [1, 20, d], e0 [1, 20, 6, d]
        assert a.shape == b.shape and (a - b).abs().max() < 1e-6
    assert not torch.equal(ref[2][0, 0], ref[2][0, 10])  # two distinct rows really
    assert rel(out_fast, out_ref) < 1e-5 and out_ref.abs().mean() > 0.05


@pytest.fixture(scope="module")
def original(tiny_ti2v_pipe):
    return generate(tiny_ti2v_pipe)


@pytest.mark.parametrize("flags", [{"batched_cfg": True}, {"fast_rope": True}, {"fast_time_embedding": True},
                                   {"tf32": True}, {"attn_backend": "math"}, CALL_FAST])
def test_each_switch_keeps_the_video(tiny_ti2v_pipe, original, flags):
    video, latent = generate(tiny_ti2v_pipe, RuntimeOptions(**flags))
    assert original[1].abs().mean() > 0.1 and torch.equal(latent[:, :1], original[1][:, :1])
    assert rel(latent, original[1]) < 1e-5, rel(latent, original[1])
    assert (video - original[0]).abs().max() < 1e-4


def test_text_mode_fast_switches_keep_the_video(tiny_ti2v_pipe):
    base = tiny_ti2v_pipe.generate(PROMPT, size=(96, 64), frame_num=5, sampling_steps=3, seed=4, return_latents=True)
    fast = tiny_ti2v_pipe.generate(PROMPT, size=(96, 64), frame_num=5, sampling_steps=3, seed=4, return_latents=True,
                                   options=RuntimeOptions(**CALL_FAST))
    assert rel(fast[1], base[1]) < 1e-5 and (fast[0] - base[0]).abs().max() < 1e-4


def test_ab_in_one_process_equals_fresh_pipelines(tiny_ti2v_ckpt):
    pipe = new_pipe(tiny_ti2v_ckpt)
    first = generate(pipe)
    middle = generate(pipe, RuntimeOptions(**CALL_FAST))
    last = generate(pipe, RuntimeOptions())
    fresh_orig, fresh_fast = generate(new_pipe(tiny_ti2v_ckpt)), generate(new_pipe(tiny_ti2v_ckpt, **CALL_FAST))
    for run in (first, last):
        assert torch.equal(run[0], fresh_orig[0]) and torch.equal(run[1], fresh_orig[1])
    assert torch.equal(middle[0], fresh_fast[0]) and torch.equal(middle[1], fresh_fast[1])
    assert not torch.equal(middle[1], first[1])  # the switches really ran
    with pytest.raises(LoadTimeOptionError, match="vae_dtype.*build a new WanTI2V"):
        pipe.generate(PROMPT, image(), options=RuntimeOptions(vae_dtype="bf16"), **GEN)


def test_block_streaming_and_banded_decode(tiny_ti2v_ckpt, original):
    streamed = generate(new_pipe(tiny_ti2v_ckpt, stream_blocks=2))
    assert torch.equal(streamed[1], original[1]) and torch.equal(streamed[0], original[0])
    banded = generate(new_pipe(tiny_ti2v_ckpt, vae_bands=2))
    assert torch.equal(banded[1], original[1]) and (banded[0] - original[0]).abs().max() <= 1e-5


def test_fp8_emulated_runs_close_to_the_original(tiny_ti2v_ckpt, original):
    pipe = new_pipe(tiny_ti2v_ckpt, fp8_kernel="emulated", fp8_linear="all")
    _, latent = generate(pipe)
    assert pipe.backends()["fp8_linear"]["model"].startswith("all (emulated)")
    assert torch.equal(latent[:, :1], original[1][:, :1]) and 0 < rel(latent, original[1]) < 0.1


def test_fast_preset_with_compile_keeps_the_video_and_never_recompiles(tiny_ti2v_ckpt, original):
    counters.clear()
    pipe = WanTI2V(WAN_CONFIGS["ti2v-tiny"], tiny_ti2v_ckpt, device="cpu", options=fast_options())
    video, latent = generate(pipe)
    assert pipe.options.compile and rel(latent, original[1]) < 1e-4, rel(latent, original[1])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):  # every step, another image of its size, another seed
        generate(pipe, img=image(seed=3), seed=12)
    assert counters["stats"]["unique_graphs"] == graphs


# ---- inputs, API, layout ------------------------------------------------------------------------------------------
def test_bad_inputs_are_refused_before_running(tiny_ti2v_pipe, tiny_ti2v_ckpt):
    pipe = tiny_ti2v_pipe
    with pytest.raises(ValueError, match="RGB"):
        pipe.generate(PROMPT, image().convert("RGBA"), **GEN)
    with pytest.raises(ValueError, match="crop the image"):
        pipe.generate(PROMPT, image(2000, 16), **GEN)
    with pytest.raises(ValueError, match="4n\\+1"):
        pipe.generate(PROMPT, image(), **{**GEN, "frame_num": 8})
    with pytest.raises(ValueError, match="prompt is empty"):
        pipe.generate(" ", image(), **GEN)
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe.generate(PROMPT, size=(1280, 720), frame_num=5, sampling_steps=1)
    with pytest.raises(ValueError, match="one DiT and no LoRA"):
        WanTI2V(WAN_CONFIGS["ti2v-tiny"], tiny_ti2v_ckpt, device="cpu", lora_high="x.safetensors")


def test_public_api_follows_the_reference():
    assert wan.WanTI2V is WanTI2V and "WanTI2V" in wan.__all__
    gen = {n: p.default for n, p in inspect.signature(WanTI2V.generate).parameters.items() if n != "self"}
    assert list(gen)[:12] == ["input_prompt", "img", "size", "max_area", "frame_num", "shift", "sample_solver",
                              "sampling_steps", "guide_scale", "n_prompt", "seed", "offload_model"]
    assert (gen["img"], gen["size"], gen["max_area"], gen["frame_num"], gen["shift"], gen["sample_solver"],
            gen["sampling_steps"], gen["guide_scale"], gen["n_prompt"], gen["seed"], gen["offload_model"]) == \
        (None, (1280, 704), 704 * 1280, 81, 5.0, "unipc", 50, 5.0, "", -1, None)
    cfg = WAN_CONFIGS["ti2v-5B"]
    assert (cfg.frame_num, cfg.sample_fps, cfg.sample_steps, cfg.sample_shift, cfg.sample_guide_scale,
            cfg.supported_sizes, cfg.default_size) == (121, 24, 50, 5.0, (5.0, 5.0), ("704*1280", "1280*704"),
                                                       "1280*704")
    assert (cfg.vae_checkpoint, cfg.vae_stride, cfg.boundary, cfg.experts) == ("Wan2.2_VAE.pth", (4, 16, 16), None,
                                                                                 {"model": ""})
    a = cfg.arch
    assert (a.model_type, a.dim, a.ffn_dim, a.num_heads, a.num_layers, a.in_dim, a.out_dim, a.freq_dim, a.text_len,
            a.eps) == ("ti2v", 3072, 14336, 24, 30, 48, 48, 256, 512, 1e-6)
    with torch.device("meta"):
        from wan.modules.model import WanModel

        assert sum(p.numel() for p in WanModel.from_config(a).parameters()) == 4_999_787_712  # facts §2
    assert cfg.takes_image and not cfg.needs_image and WAN_CONFIGS["i2v-A14B"].needs_image


def test_tiny_ti2v_checkpoint_layout(tiny_ti2v_ckpt):
    from wan.modules.model import WanModel
    from wan.testing.tiny import default_tiny_dir

    cfg = json.loads((tiny_ti2v_ckpt / "config.json").read_text())
    assert cfg["model_type"] == "ti2v" and cfg["in_dim"] == 48 and cfg["out_dim"] == 48
    assert (tiny_ti2v_ckpt / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (tiny_ti2v_ckpt / "Wan2.2_VAE.pth").is_file() and not (tiny_ti2v_ckpt / "high_noise_model").exists()
    assert default_tiny_dir("ti2v-tiny").name.startswith("ti2v-tiny-v")
    m = WanModel.from_pretrained(tiny_ti2v_ckpt)
    assert m.head.head.weight.abs().mean() > 0.01 and m.head.head.weight.shape[0] == 192
