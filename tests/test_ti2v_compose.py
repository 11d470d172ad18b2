"""TI2V-5B (the tiny TI2V checkpoint) with the features built beside it: the checkpoint layouts (wan/formats: --dit,
the Wan 2.2 VAE in its official and Diffusers namings, a Diffusers TI2V folder, the refusals) and step caching
(wan/step_cache.py on a one-model task: off and never-reusing runs bit for bit, EasyCache's per-step record,
MagCache only with a calibrated ratio file)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from wan.configs import WAN_CONFIGS
from wan.errors import CheckpointError
from wan.formats import WeightPaths, dit_source, resolve_weights, vae_source
from wan.modules.checkpoint import load_dit
from wan.modules.model import WanModel
from wan.modules.vae2_2 import Wan2_2_VAE
from wan.preflight import PathError
from wan.step_cache import load_ratios
from wan.testing import layouts as L
from wan.textimage2video import WanTI2V

CFG = WAN_CONFIGS["ti2v-tiny"]
T5, VAE22, TOK = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.2_VAE.pth", "google/umt5-xxl"
PROMPT = "a cat boxing"
GEN = dict(max_area=64 * 64, frame_num=5, shift=5.0, sampling_steps=2, guide_scale=5.0, seed=7)


def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))


def latent_of(pipe, options=None, **kw):
    return pipe.generate(PROMPT, image(), options=options, return_latents=True, **{**GEN, **kw})[1]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- checkpoint layouts -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tiny_ti2v_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti2v_layouts")
    return {"dit_fp32": L.write_comfy_dit(tiny_ti2v_ckpt, out / "ti2v_fp32.safetensors", torch.float32),
            "dit_fp16": L.write_comfy_dit(tiny_ti2v_ckpt, out / "ti2v_fp16.safetensors", torch.float16, prefix=""),
            "vae_diffusers": L.write_diffusers_vae22(tiny_ti2v_ckpt / VAE22, out / "vae22_diffusers.safetensors"),
            "vae_bf16": L.write_official_vae_safetensors(tiny_ti2v_ckpt / VAE22, out / "vae22_bf16.safetensors",
                                                         prefix="model."),
            "out": out}


def test_dit_and_wan22_vae_files_load_what_the_folder_loads(files, tiny_ti2v_ckpt):
    """--dit (a ComfyUI-style file of the one DiT) and --vae (the Wan 2.2 VAE as a Diffusers-named or a bf16 file)
    load the official folder's tensors: renames bit for bit, the 16-bit copies as their cast."""
    official = load_dit(WanModel, dit_source(tiny_ti2v_ckpt, "x", CFG.arch), None).state_dict()
    fp32 = dit_source(files["dit_fp32"], "the DiT", CFG.arch)
    assert fp32.prefix == "model.diffusion_model." and fp32.config.model_type == "ti2v"
    sd = load_dit(WanModel, fp32, None).state_dict()
    assert sd.keys() == official.keys() and all(torch.equal(sd[k], official[k]) for k in sd)
    sd16 = load_dit(WanModel, dit_source(files["dit_fp16"], "the DiT", CFG.arch), None).state_dict()
    assert all(torch.equal(sd16[k], official[k].half().float()) for k in sd16)

    ref = Wan2_2_VAE(vae_pth=str(tiny_ti2v_ckpt / VAE22), device="cpu").model.state_dict()
    for kind in ("vae_diffusers", "vae_bf16"):
        source = vae_source(files[kind], "the VAE", "2.2")
        assert source.layout == ("diffusers" if kind == "vae_diffusers" else "official"), source.layout
        got = Wan2_2_VAE(vae_pth=source, device="cpu").model.state_dict()
        cast = (lambda t: t) if kind == "vae_diffusers" else (lambda t: t.bfloat16().float())
        assert got.keys() == ref.keys() and all(torch.equal(got[k], cast(ref[k])) for k in got), kind


def test_whole_generation_from_files_and_from_a_diffusers_folder(files, tiny_ti2v_ckpt, tiny_ti2v_pipe):
    """Image mode from per-component files only (--dit, --t5, --vae in Diffusers names, --tokenizer) and from a
    Diffusers TI2V folder (transformer/ alone, expand_timesteps, the is_residual VAE): the official latent, bit for
    bit (the renames are exact; the T5 is bf16 in every layout)."""
    reference = latent_of(tiny_ti2v_pipe)
    weights = WeightPaths(dit=str(files["dit_fp32"]), t5=str(tiny_ti2v_ckpt / T5),
                          vae=str(files["vae_diffusers"]), tokenizer=str(tiny_ti2v_ckpt / TOK))
    assert weights.complete(CFG) and not weights.complete()
    from_files = WanTI2V(CFG, None, device="cpu", weights=weights)
    assert from_files.weights.folder == "none" and from_files.weights.high is None
    assert torch.equal(latent_of(from_files), reference)

    folder = L.write_diffusers_folder(tiny_ti2v_ckpt, files["out"] / "diffusers", CFG)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer_2"] == [None, None] and index["expand_timesteps"] is True
    resolved = resolve_weights(CFG, folder)
    assert resolved.folder == "diffusers" and list(resolved.dits) == ["model"]
    assert resolved.model.layout == "diffusers" and resolved.vae.layout == "diffusers"
    assert torch.equal(latent_of(WanTI2V(CFG, folder, device="cpu")), reference)


def test_layout_refusals_name_the_problem(files, tiny_ti2v_ckpt, tiny_ckpt, tmp_path):
    """One line each, before anything loads: the A14B experts' flags for a one-model task (and --dit for a two-expert
    one), a two-expert Diffusers folder for TI2V, a Wan 2.1 VAE for TI2V and the Wan 2.2 VAE for T2V."""
    with pytest.raises(PathError, match="ti2v-tiny has one DiT; pass it with --dit FILE"):
        resolve_weights(CFG, tiny_ti2v_ckpt, WeightPaths(dit_low=str(files["dit_fp32"])))
    with pytest.raises(PathError, match="t2v-tiny has two experts"):
        resolve_weights(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, WeightPaths(dit=str(files["dit_fp32"])))
    two = tmp_path / "a14b_diffusers"
    for d in ("transformer", "transformer_2", "text_encoder", "vae", "tokenizer"):
        (two / d).mkdir(parents=True)
    (two / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="two-expert Diffusers folder .transformer_2/"):
        resolve_weights(CFG, two)
    with pytest.raises(CheckpointError, match="is a Wan 2.1 VAE .* needs the Wan 2.2 VAE"):
        resolve_weights(CFG, tiny_ti2v_ckpt, WeightPaths(vae=str(tiny_ckpt / "Wan2.1_VAE.pth")))
    with pytest.raises(CheckpointError, match="is a Wan 2.2 VAE .* needs the Wan 2.1 VAE"):
        resolve_weights(WAN_CONFIGS["t2v-tiny"], tiny_ckpt, WeightPaths(vae=str(files["vae_bf16"])))
    with pytest.raises(CheckpointError, match="no official Wan 2.1 VAE name"):  # 2.2 Diffusers names, 2.1 map
        vae_source(files["vae_diffusers"], "the VAE", "2.1")


def test_cli_from_per_component_files(files, tiny_ti2v_ckpt, tmp_path, capsys, caplog):
    import logging

    import generate

    caplog.set_level(logging.INFO, logger="wan")
    out = tmp_path / "v.mp4"
    argv = ["--task", "ti2v-tiny", "--device", "cpu", "--size", "64*64", "--frame_num", "5", "--sample_steps", "2",
            "--prompt", PROMPT, "--save_file", str(out), "--dit", str(files["dit_fp16"]), "--t5",
            str(tiny_ti2v_ckpt / T5), "--vae", str(files["vae_bf16"]), "--tokenizer", str(tiny_ti2v_ckpt / TOK)]
    assert generate.main(argv) == 0, capsys.readouterr().err
    assert out.stat().st_size > 0 and "weights: the DiT:" in caplog.text and "official layout" in caplog.text


# ---- step caching on the one-model task ------------------------------------------------------------------------------
STEPS12 = dict(sampling_steps=12)


@pytest.fixture(scope="module")
def uncached(tiny_ti2v_pipe):
    return latent_of(tiny_ti2v_pipe, **STEPS12)


def _with(pipe, **cache):
    return replace(pipe.options, **cache)


def test_ti2v_cache_off_calibration_and_never_reusing_magcache_are_bit_for_bit(tiny_ti2v_pipe, uncached, tmp_path):
    """Image mode (per-token timesteps through forward_residual): the calibration run (every call computed) and
    MagCache on its ratios with --cache_max_skip 0 give the uncached latent bit for bit; at a loose threshold MagCache
    reuses steps of the one model and keeps the image's first latent frame."""
    pipe, ratios = tiny_ti2v_pipe, tmp_path / "ti2v_ratios.json"
    calibrated = latent_of(pipe, _with(pipe, cache_calibrate=str(ratios)), **STEPS12)
    assert torch.equal(calibrated, uncached) and pipe.last_result.cache["method"] == "calibrate"
    curve = load_ratios(ratios)
    assert curve.branches == ("cond", "uncond") and len(curve.per_step) == 12
    assert json.loads(ratios.read_text())["measured"]["task"] == "ti2v-tiny"
    never = latent_of(pipe, _with(pipe, cache="magcache", cache_ratios=str(ratios), cache_max_skip=0), **STEPS12)
    assert torch.equal(never, uncached) and pipe.last_result.cache["reused_steps"] == []
    loose = latent_of(pipe, _with(pipe, cache="magcache", cache_ratios=str(ratios), cache_thresh=10.0,
                                  cache_retention=0.1), **STEPS12)
    rec = pipe.last_result.cache
    assert rec["reused_steps"] and {s["expert"] for s in rec["steps"]} == {"model"}
    assert rec["computed_calls"] < rec["calls"] == 24 and 0 < rel(loose, uncached) < 0.5
    assert torch.equal(loose[:, :1], uncached[:, :1])  # the image's latent stays frame 0


def test_ti2v_easycache_records_each_step(tiny_ti2v_pipe, uncached):
    """EasyCache on the one model: threshold 0 never reuses (bit for bit); a loose one reuses after the warm-up and
    records each step's decision per CFG branch (state per model: one segment)."""
    pipe = tiny_ti2v_pipe
    assert torch.equal(latent_of(pipe, _with(pipe, cache="easycache", cache_thresh=0.0), **STEPS12), uncached)
    loose = latent_of(pipe, _with(pipe, cache="easycache", cache_thresh=5.0, cache_warmup=2), **STEPS12)
    rec = pipe.last_result.cache
    assert rec["method"] == "easycache" and [s["step"] for s in rec["steps"]] == list(range(12))
    assert all(s["expert"] == "model" and s["cond"] == s["uncond"] for s in rec["steps"])
    assert rec["reused_steps"] and min(rec["reused_steps"]) >= 2 and 11 not in rec["reused_steps"]
    assert 0 < rel(loose, uncached) < 0.5 and torch.equal(loose[:, :1], uncached[:, :1])
    assert pipe.last_result.backends["step_cache"].startswith("easycache (thresh 5")


def test_ti2v_magcache_without_ratios_is_refused(tiny_ti2v_pipe):
    """No published curve for TI2V-5B: --cache magcache needs --cache_ratios, refused before T5 runs."""
    with pytest.raises(ValueError, match=r"needs --cache_ratios FILE for ti2v.*--cache_calibrate FILE"):
        latent_of(tiny_ti2v_pipe, _with(tiny_ti2v_pipe, cache="magcache"), **STEPS12)


# ---- the memory plan and the H100 refusals on TI2V ---------------------------------------------------------------
def test_ti2v_plan_counts_the_step_cache_and_keeps_the_margin():
    """TI2V-5B's plan holds the step cache's tensors through the denoising (MagCache: two [tokens, 3072] residuals
    with their bf16 inputs), and a chosen plan leaves max(1 GB, 5%) of the budget free, as for the A14B tasks."""
    from wan.memory_plan import choose, estimate, margin_gb, plan_inputs
    from wan.options import fast_options

    cfg = WAN_CONFIGS["ti2v-5B"]
    plain = plan_inputs(cfg, fast_options(), (1280, 704, 121), 11.4e9)
    cached = plan_inputs(cfg, replace(fast_options(), cache="magcache", cache_ratios="r.json"), (1280, 704, 121),
                         11.4e9)
    assert cached["step_cache"] == 2 * 27280 * 3072 * 6 and plain["step_cache"] == 0.0
    grow = estimate("resident", **cached).phases["denoise"] - estimate("resident", **plain).phases["denoise"]
    assert grow == pytest.approx(cached["step_cache"] * 1.05 / 1e9)
    for budget in (16, 24, 48):
        plan = choose(budget, **cached)
        assert plan.peak_gb + margin_gb(budget) <= budget


def test_ti2v_refuses_the_fused_qk_rope_with_compile(tiny_ti2v_ckpt):
    """The H100 finding holds for every task: --fused_qk_rope with torch.compile is refused before anything loads."""
    from wan.options import RuntimeOptions

    with pytest.raises(ValueError, match="add --compile false"):
        WanTI2V(CFG, tiny_ti2v_ckpt, device="cpu",
                options=RuntimeOptions(fused_qk_rope=True, fast_rope=True, compile=True))
