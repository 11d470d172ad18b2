"""Checkpoint layouts (wan/formats): the tiny official checkpoint written again as a Diffusers folder (by diffusers'
own classes), ComfyUI / Kijai files (fp16, bf16, fp8_scaled) and GGUF (Q8_0, Q4_K) files, then loaded through the real
loaders: renames bit for bit, lossy formats equal to their tool's arithmetic, whole generations close to the official
one, and every bad file refused in one line before anything loads."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan.configs import WAN_CONFIGS
from wan.errors import CheckpointError
from wan.formats import WeightPaths, dit_source, resolve_weights, t5_source, vae_source
from wan.modules.checkpoint import load_dit
from wan.modules.model import WanModel
from wan.modules.t5 import load_umt5_encoder
from wan.modules.vae import Wan2_1_VAE
from wan.testing import layouts as L

gguf = pytest.importorskip("gguf")
CFG = WAN_CONFIGS["t2v-tiny"]
ARCH = CFG.arch
T5, VAE, TOK = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl"
GEN = dict(size=(64, 64), frame_num=5, sampling_steps=2, shift=5.0, guide_scale=(3.0, 4.0), seed=7)  # t 999 | 833
PROMPT = "a cat boxing"


@pytest.fixture(scope="module")
def files(tiny_ckpt, tmp_path_factory):
    """Every layout of the tiny checkpoint: {name: path}."""
    out = tmp_path_factory.mktemp("layouts")
    f = {"diffusers": L.write_diffusers_folder(tiny_ckpt, out / "diffusers", CFG)}
    for e in ("high", "low"):
        expert = tiny_ckpt / f"{e}_noise_model"
        f[f"fp16_{e}"] = L.write_comfy_dit(expert, out / f"{e}_fp16.safetensors", torch.float16)
        f[f"bf16_{e}"] = L.write_comfy_dit(expert, out / f"{e}_bf16.safetensors", torch.bfloat16, prefix="")
        f[f"fp8_{e}"] = L.write_fp8_scaled_dit(expert, out / f"{e}_fp8_scaled.safetensors", ARCH)
        f[f"q8_{e}"] = out / f"{e}_Q8_0.gguf"
        L.write_gguf_dit(expert, f[f"q8_{e}"], "Q8_0")
        f[f"q4k_{e}"] = out / f"{e}_Q4_K.gguf"
        L.write_gguf_dit(expert, f[f"q4k_{e}"], "Q4_K", prefix="model.diffusion_model.")
    expert = tiny_ckpt / "high_noise_model"
    f["fp8_new"] = L.write_fp8_scaled_dit(expert, out / "fp8_new.safetensors", ARCH, new_names=True, prefix="",
                                          rest_dtype=torch.bfloat16)
    f["fp8_e5m2"] = L.write_fp8_scaled_dit(expert, out / "e5m2.safetensors", ARCH, fp8=torch.float8_e5m2,
                                           scale_dtype=torch.bfloat16)
    f["t5_fp16"] = L.write_hf_t5(tiny_ckpt / T5, out / "umt5_fp16.safetensors")
    f["t5_fp8"] = L.write_hf_t5(tiny_ckpt / T5, out / "umt5_fp8_scaled.safetensors", torch.bfloat16, fp8=True)
    f["vae_bf16"] = L.write_official_vae_safetensors(tiny_ckpt / VAE, out / "vae_bf16.safetensors", prefix="model.")
    return f


def paths(files, tiny_ckpt, kind, **over) -> WeightPaths:
    return WeightPaths(dit_high=files[f"{kind}_high"], dit_low=files[f"{kind}_low"], **over)


def load(source, dtype=None) -> dict[str, torch.Tensor]:
    return load_dit(WanModel, source, dtype).state_dict()


def official(tiny_ckpt, expert="high", dtype=None):
    return load(dit_source(tiny_ckpt / f"{expert}_noise_model", "x", ARCH), dtype)


# ---- renames: bit for bit --------------------------------------------------------------------------------------
def test_diffusers_folder_equals_the_official_load_bit_for_bit(files, tiny_ckpt):
    off, diff = resolve_weights(CFG, tiny_ckpt), resolve_weights(CFG, files["diffusers"])
    assert diff.folder == "diffusers" and diff.high.layout == "diffusers" and diff.t5.layout == "hf"
    assert diff.high.renamed == 67 and len(diff.high.headers) > 1  # sharded by save_pretrained
    for e in ("high", "low"):  # transformer = high-noise, transformer_2 = low-noise
        a, b = load(getattr(off, e)), load(getattr(diff, e))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(v.abs().max() > 0 for v in a.values())
    t_a, t_b = load_umt5_encoder(off.t5).state_dict(), load_umt5_encoder(diff.t5).state_dict()
    assert all(torch.equal(t_a[k], t_b[k]) for k in t_a)
    v_a, v_b = Wan2_1_VAE(vae_pth=off.vae, device="cpu"), Wan2_1_VAE(vae_pth=diff.vae, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(v_a.model.state_dict().values(), v_b.model.state_dict().values()))
    assert diff.tokenizer == files["diffusers"] / "tokenizer"


@pytest.mark.parametrize("kind,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_16bit_files_equal_the_official_load_in_that_dtype(files, tiny_ckpt, kind, dtype):
    src = dit_source(files[f"{kind}_high"], "x", ARCH)
    assert src.prefix == ("model.diffusion_model." if kind == "fp16" else "") and src.renamed == 0
    ref, got = official(tiny_ckpt, dtype=dtype), load(src, dtype)
    assert all(got[k].dtype == dtype and torch.equal(got[k], ref[k]) for k in ref)
    up = load(src)  # no dtype: float32, the stored values exactly
    assert all(up[k].dtype == torch.float32 and torch.equal(up[k], ref[k].float()) for k in ref)


# ---- lossy formats: their tools' arithmetic ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fp8_high", "fp8_new", "fp8_e5m2"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_fp8_scaled_equals_comfyui_dequantization(files, kind, dt):
    raw = load_file(files[kind])
    src = dit_source(files[kind], "x", ARCH)
    got = load(src, dt)
    linears = set(L.linear_weight_names(ARCH))
    assert sum(p.scale is not None for p in src.plans.values()) == len(linears) == 26
    for k, v in got.items():
        stored = raw.get(src.prefix + k)
        if k in linears:
            base = src.prefix + k.removesuffix(".weight")
            scale = raw.get(base + ".scale_weight", raw.get(base + ".weight_scale"))
            want = stored.to(dt) * scale.to(dt)  # ComfyUI: W.to(dt) * scale.to(dt)
        else:
            want = stored.to(dt)
        assert torch.equal(v, want), k


@pytest.mark.parametrize("kind", ["q8_high", "q4k_high"])
def test_gguf_equals_the_gguf_package(files, kind):
    src = dit_source(files[kind], "x", ARCH)
    types = src.counts()
    assert ("gguf Q4_K" in types) == (kind == "q4k_high") and "gguf Q8_0" in types and types["F32"] > 0
    assert src.plans["patch_embedding.weight"].shape == (64, 16, 1, 2, 2)  # from comfy.gguf.orig_shape
    ref = {k.removeprefix(src.prefix): v for k, v in L.gguf_reference(files[kind]).items()}
    got32, got16 = load(src), load(src, torch.bfloat16)
    assert all(torch.equal(got32[k], ref[k]) for k in ref)
    assert all(torch.equal(got16[k], ref[k].to(torch.bfloat16)) for k in ref)


def test_q8_0_torch_port_equals_the_package():
    from wan.formats.quant import dequantize_q8_0

    x = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)).numpy() * 3
    x[0, :32] = 0  # an all-zero block: d = 0
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    want = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    got = dequantize_q8_0(torch.from_numpy(q.reshape(-1, 34).copy())).reshape(48, 256)
    assert torch.equal(got, torch.from_numpy(want))
    assert torch.equal(L.quantize_q8_0_torch(torch.from_numpy(x)), torch.from_numpy(q))  # the benchmark's writer


def test_t5_files(files, tiny_ckpt, caplog):
    off = load_umt5_encoder(t5_source(tiny_ckpt / T5), torch.float16).state_dict()
    with caplog.at_level(logging.INFO, logger="wan"):
        src = t5_source(files["t5_fp16"])
        got = load_umt5_encoder(src, torch.float16).state_dict()
    assert src.layout == "hf" and "spiece_model" in src.ignored and "1 a tokenizer embedded by" in caplog.text
    assert all(torch.equal(got[k], off[k]) for k in off)
    raw = load_file(files["t5_fp8"])
    src8 = t5_source(files["t5_fp8"])
    got8 = load_umt5_encoder(src8, torch.bfloat16).state_dict()
    assert src8.layout == "hf fp8_scaled" and sum(p.scale is not None for p in src8.plans.values()) == 2 * 7
    for k, v in got8.items():
        if k + "" in raw and raw[k].dtype == torch.float8_e4m3fn:
            scale = raw[k.removesuffix(".weight") + ".scale_weight"]
            assert torch.equal(v, raw[k].to(torch.bfloat16) * scale.to(torch.bfloat16)), k


def test_vae_bf16_file(files, tiny_ckpt):
    src = vae_source(files["vae_bf16"])
    assert src.prefix == "model."
    ref = Wan2_1_VAE(vae_pth=str(tiny_ckpt / VAE), dtype=torch.bfloat16, device="cpu").model.state_dict()
    got = Wan2_1_VAE(vae_pth=src, dtype=torch.bfloat16, device="cpu").model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ---- whole generations -------------------------------------------------------------------------------------------
# max |latent - official latent| / max |official latent| after 2 steps (one per expert; 64x64, 5 frames), random
# tiny weights. Measured on this CPU: diffusers 0 (exact), fp16 3.0e-4, bf16 2.2e-3, fp8_scaled e4m3 3.0e-2,
# GGUF Q8_0 6.0e-3, GGUF Q4_K (+ Q8_0 for rows 256 does not divide) 5.2e-2; bounds about 3x that.
GENERATION_TOL = {"diffusers": 0.0, "fp16": 1e-3, "bf16": 7e-3, "fp8": 0.1, "q8": 2e-2, "q4k": 0.15}


@pytest.fixture(scope="module")
def official_latent(tiny_ckpt):
    from wan.text2video import WanT2V

    pipe = WanT2V(CFG, tiny_ckpt, device="cpu")
    return pipe.generate(PROMPT, return_latents=True, **GEN)[1]


def generation_error(pipeline, cfg, ckpt, files, kind, reference, *inputs, **gen) -> float:
    """max |latent - reference| / max |reference| of a 2-step generation from layout `kind` (the Diffusers folder as
    checkpoint_dir, else the expert files as weights=), one step per expert."""
    if kind == "diffusers":
        pipe = pipeline(cfg, files["diffusers"], device="cpu")
    else:
        pipe = pipeline(cfg, ckpt, device="cpu", weights=paths(files, ckpt, kind))
    latent = pipe.generate(PROMPT, *inputs, return_latents=True, **gen)[1]
    assert pipe.last_result.expert_trace == ["high", "low"]
    err = ((latent - reference).abs().max() / reference.abs().max()).item()
    print(f"{cfg.name} {kind}: generation error {err:.3e}")
    return err


@pytest.mark.parametrize("kind", list(GENERATION_TOL))
def test_whole_generation_from_each_layout(files, tiny_ckpt, official_latent, kind):
    from wan.text2video import WanT2V

    err = generation_error(WanT2V, CFG, tiny_ckpt, files, kind, official_latent, **GEN)
    assert err <= GENERATION_TOL[kind], f"{kind}: {err:.3e}"
    assert kind == "diffusers" or err > 0  # the lossy layouts really were loaded


def test_every_component_from_files_without_ckpt_dir(files, tiny_ckpt, official_latent):
    """ComfyUI's split_files: DiTs, T5 (Hugging Face names, fp16), VAE (bf16), the tokenizer folder: no --ckpt_dir."""
    from wan.text2video import WanT2V

    weights = paths(files, tiny_ckpt, "bf16", t5=files["t5_fp16"], vae=files["vae_bf16"],
                    tokenizer=tiny_ckpt / TOK)
    pipe = WanT2V(CFG, None, device="cpu", weights=weights)
    latent = pipe.generate(PROMPT, return_latents=True, **GEN)[1]
    assert ((latent - official_latent).abs().max() / official_latent.abs().max()).item() <= GENERATION_TOL["bf16"]


# ---- fp8_scaled with --fp8_linear: kept as stored -----------------------------------------------------------------
def test_fp8_scaled_weights_stay_fp8_under_fp8_linear(files, tiny_ckpt):
    from wan.modules.fp8 import Fp8Linear
    from wan.options import RuntimeOptions
    from wan.text2video import WanT2V

    opts = RuntimeOptions(fp8_linear="all")
    pipe = WanT2V(CFG, tiny_ckpt, device="cpu", options=opts, fp8_kernel="emulated",
                  weights=paths(files, tiny_ckpt, "fp8"))
    raw = load_file(files["fp8_high"])
    lin = pipe.high_noise_model.blocks[1].ffn[0]
    assert isinstance(lin, Fp8Linear) and lin.bias.dtype == torch.bfloat16
    assert torch.equal(lin.weight, raw["model.diffusion_model.blocks.1.ffn.0.weight"])  # the file's e4m3 bytes
    assert torch.equal(lin.weight_scale, raw["model.diffusion_model.blocks.1.ffn.0.scale_weight"].expand(128))
    assert pipe.fp8["high"].from_file == 16 and pipe.fp8["high"].linears == 0  # 8 targets x 2 blocks
    assert "16 more kept as stored" in pipe.backends()["fp8_linear"]["high"]
    ref = pipe.high_noise_model.blocks[0].cross_attn.k  # not an --fp8_linear target: dequantized
    assert type(ref) is torch.nn.Linear and ref.weight.dtype == torch.float32
    assert torch.isfinite(pipe.generate(PROMPT, **GEN)).all()


def test_fp8_scaled_with_a_lora_is_dequantized_merged_and_requantized(files, tiny_ckpt, tmp_path):
    from wan.options import RuntimeOptions
    from wan.testing.random_lora import write_random_lora_dir
    from wan.text2video import WanT2V

    lora = write_random_lora_dir(tmp_path / "lora", ARCH, rank=4)
    pipe = WanT2V(CFG, tiny_ckpt, device="cpu", options=RuntimeOptions(fp8_linear="all"), fp8_kernel="emulated",
                  weights=paths(files, tiny_ckpt, "fp8"), lora_dir=lora)
    s = pipe.fp8["high"]
    assert s.from_file == 0 and s.linears == 16  # every target is LoRA-merged in fp32, then quantized per channel


def test_fp8_file_on_the_cpu_is_dequantized_and_said(files, tiny_ckpt, caplog):
    from wan.text2video import WanT2V

    with caplog.at_level(logging.INFO, logger="wan"):
        WanT2V(CFG, tiny_ckpt, device="cpu", weights=paths(files, tiny_ckpt, "fp8"))
    assert "fp8 dequantized as ComfyUI does, W.to(float32) * scale.to(float32)" in caplog.text


def test_memory_plan_counts_fp8_linears_stored_in_one_byte(files, tiny_ckpt):
    """The plan's expert bytes for --fp8_linear all equal the bytes the loaded (fp8-kept) expert holds."""
    from wan.memory_plan import dit_bytes
    from wan.options import RuntimeOptions
    from wan.text2video import WanT2V

    pipe = WanT2V(CFG, tiny_ckpt, device="cpu", options=RuntimeOptions(fp8_linear="all"), fp8_kernel="emulated",
                  weights=paths(files, tiny_ckpt, "fp8"))
    block = pipe.high_noise_model.blocks[0]
    held = sum(p.numel() * p.element_size() for p in block.parameters())
    planned, _ = dit_bytes(ARCH, 4, "all")  # fp32 on the CPU; Fp8Linear biases are bf16
    bias_saving = sum(m.bias.numel() * 2 for m in block.modules() if hasattr(m, "weight_scale"))
    assert held == planned - bias_saving


# ---- one-line refusals, before anything loads ----------------------------------------------------------------------
def _wrong_task_file(tmp_path, **changes) -> Path:
    from safetensors.torch import save_file

    from wan.testing.random_init import randomize_weights_

    model = randomize_weights_(WanModel.from_config(replace(ARCH, **changes)), seed=0)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("make,needle", [
    (lambda f, t, tmp: _wrong_task_file(tmp, in_dim=36), "in_dim 36"),  # an I2V expert
    (lambda f, t, tmp: _wrong_task_file(tmp, dim=96, num_heads=6, ffn_dim=256), "dim 96"),
    (lambda f, t, tmp: _wrong_task_file(tmp, num_layers=3), "3 blocks, the t2v-tiny DiT has 2"),
])
def test_a_file_of_another_task_is_refused_from_its_header(files, tiny_ckpt, tmp_path, make, needle):
    path = make(files, tiny_ckpt, tmp_path)
    with pytest.raises(CheckpointError) as e:
        resolve_weights(CFG, tiny_ckpt, WeightPaths(dit_high=path))
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and str(path) in msg and "does not fit the t2v-tiny DiT" in msg


def test_unmapped_and_mixed_keys_are_refused(files, tmp_path):
    from safetensors.torch import save_file

    sd = load_file(files["bf16_high"])
    save_file({**sd, "blocks.0.lora_A.weight": torch.ones(2, 2)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="'blocks.0.lora_A.weight' .* is not a parameter"):
        dit_source(tmp_path / "extra.safetensors", "x", ARCH, "the tiny DiT")
    save_file({**sd, "condition_embedder.time_proj.weight": torch.ones(2, 2)}, tmp_path / "mixed.safetensors")
    with pytest.raises(CheckpointError, match="mixes two key namings"):
        dit_source(tmp_path / "mixed.safetensors", "x", ARCH)
    del sd["head.head.weight"]
    save_file(sd, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match="lacks 'head.head.weight'"):
        dit_source(tmp_path / "short.safetensors", "x", ARCH)


def test_gguf_of_an_unknown_type_is_refused(tiny_ckpt, tmp_path):
    path = tmp_path / "q8_1.gguf"
    L.write_gguf_dit(tiny_ckpt / "high_noise_model", path, "Q8_0", override={"blocks.0.ffn.0.weight": "Q8_1"})
    with pytest.raises(CheckpointError) as e:
        dit_source(path, "x", ARCH)
    assert "'blocks.0.ffn.0.weight' has GGUF type Q8_1, which the installed gguf package cannot" in str(e.value)


# ---- everything else composes: LoRA after dequantization, block streaming, the fast switches, batch mode ----------
def test_gguf_with_a_lora_and_block_streaming(files, tiny_ckpt, tmp_path):
    from wan.lora import LoraMerge
    from wan.options import RuntimeOptions
    from wan.testing.random_lora import write_random_lora_dir
    from wan.text2video import WanT2V

    lora = write_random_lora_dir(tmp_path / "lora", ARCH, rank=4)
    fast = dict(batched_cfg=True, fast_rope=True, fast_time_embedding=True)
    kw = dict(device="cpu", weights=paths(files, tiny_ckpt, "q4k"), lora_dir=lora)
    resident = WanT2V(CFG, tiny_ckpt, options=RuntimeOptions(**fast), **kw)
    name = "blocks.0.ffn.0.weight"  # a Q4_K... or Q8_0 tensor: the LoRA is merged into its fp32 dequantization
    ref = L.gguf_reference(files["q4k_high"])["model.diffusion_model." + name]
    merged = LoraMerge(lora / "high_noise_model.safetensors").apply(name, ref)
    assert torch.equal(resident.high_noise_model.state_dict()[name], merged)
    streamed = WanT2V(CFG, tiny_ckpt, options=RuntimeOptions(stream_blocks=2, **fast), **kw)
    a = resident.generate(PROMPT, return_latents=True, **GEN)[1]
    b = streamed.generate(PROMPT, return_latents=True, **GEN)[1]
    assert streamed.placement.name == "block-streamed" and torch.equal(a, b)


def test_cli_batch_from_comfyui_files(files, tiny_ckpt, tmp_path, capsys, caplog):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat boxing\ntwo dogs dancing\n")
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level(logging.INFO, logger="wan")
    code = generate.main(["--task", "t2v-tiny", "--device", "cpu", "--size", "64*64", "--frame_num", "5",
                          "--sample_steps", "2", "--dit_high", str(files["fp8_high"]), "--dit_low",
                          str(files["q8_low"]), "--t5", str(files["t5_fp8"]), "--vae", str(files["vae_bf16"]),
                          "--tokenizer", str(tiny_ckpt / TOK), "--fast", "--compile", "false",
                          "--prompt_file", str(prompts), "--save_dir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert len(list(out.glob("*.mp4"))) == 2 and caplog.text.count("loaded in") == 1  # loaded once
    for needle in ("high-noise DiT", "official fp8_scaled layout", "low-noise DiT", "gguf layout", "hf fp8_scaled"):
        assert needle in caplog.text, needle


# ---- image-to-video: the same layouts, the I2V architecture (in_dim 36) -------------------------------------------
I2V = WAN_CONFIGS["i2v-tiny"]
I2V_GEN = dict(max_area=64 * 64, frame_num=5, sampling_steps=2, shift=5.0, guide_scale=(3.0, 4.0), seed=7)
I2V_TOL = {"diffusers": 0.0, "fp32": 0.0, "fp8": 0.1, "q8": 2e-2}  # as GENERATION_TOL (fp32: the stored values)


def _picture():
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(3)
    return Image.fromarray(g.integers(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def i2v_files(tiny_i2v_ckpt, tmp_path_factory):
    """The tiny I2V checkpoint as a Diffusers folder (WanImageToVideoPipeline, no image encoder) and ComfyUI / GGUF
    expert files."""
    out = tmp_path_factory.mktemp("i2v_layouts")
    f = {"diffusers": L.write_diffusers_folder(tiny_i2v_ckpt, out / "diffusers", I2V)}
    for e in ("high", "low"):
        expert = tiny_i2v_ckpt / f"{e}_noise_model"
        f[f"fp32_{e}"] = L.write_comfy_dit(expert, out / f"i2v_{e}_fp32.safetensors", torch.float32)
        f[f"fp8_{e}"] = L.write_fp8_scaled_dit(expert, out / f"i2v_{e}_fp8_scaled.safetensors", I2V.arch)
        f[f"q8_{e}"] = out / f"i2v_{e}_Q8_0.gguf"
        L.write_gguf_dit(expert, f[f"q8_{e}"], "Q8_0")
    return f


@pytest.fixture(scope="module")
def i2v_official_latent(tiny_i2v_ckpt):
    from wan.image2video import WanI2V

    pipe = WanI2V(I2V, tiny_i2v_ckpt, device="cpu")
    return pipe.generate(PROMPT, _picture(), return_latents=True, **I2V_GEN)[1]


def test_i2v_diffusers_folder_and_comfy_files_equal_the_official_load_bit_for_bit(i2v_files, tiny_i2v_ckpt):
    off = resolve_weights(I2V, tiny_i2v_ckpt)
    diff = resolve_weights(I2V, i2v_files["diffusers"])
    comfy = resolve_weights(I2V, tiny_i2v_ckpt, WeightPaths(dit_high=i2v_files["fp32_high"],
                                                            dit_low=i2v_files["fp32_low"]))
    assert diff.folder == "diffusers" and diff.high.layout == "diffusers" and comfy.high.prefix == L.COMFY_PREFIX
    assert diff.high.config == I2V.arch and diff.high.config.model_type == "i2v"  # in_channels 36 != out_channels 16
    for e in ("high", "low"):
        a = load(getattr(off, e))
        assert a["patch_embedding.weight"].shape == (64, 36, 1, 2, 2) and all(v.abs().max() > 0 for v in a.values())
        for other in (diff, comfy):
            b = load(getattr(other, e))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", list(I2V_TOL))
def test_i2v_whole_generation_from_each_layout(i2v_files, tiny_i2v_ckpt, i2v_official_latent, kind):
    from wan.image2video import WanI2V

    err = generation_error(WanI2V, I2V, tiny_i2v_ckpt, i2v_files, kind, i2v_official_latent, _picture(), **I2V_GEN)
    assert err <= I2V_TOL[kind], f"{kind}: {err:.3e}"
    assert (err == 0) == (kind in ("diffusers", "fp32"))  # the lossy layouts really were loaded


def test_i2v_fp8_scaled_weights_stay_fp8_under_fp8_linear(i2v_files, tiny_i2v_ckpt):
    from wan.image2video import WanI2V
    from wan.modules.fp8 import Fp8Linear
    from wan.options import RuntimeOptions

    pipe = WanI2V(I2V, tiny_i2v_ckpt, device="cpu", options=RuntimeOptions(fp8_linear="all"), fp8_kernel="emulated",
                  weights=paths(i2v_files, tiny_i2v_ckpt, "fp8"))
    raw = load_file(i2v_files["fp8_low"])
    lin = pipe.low_noise_model.blocks[0].self_attn.q
    assert isinstance(lin, Fp8Linear)
    assert torch.equal(lin.weight, raw["model.diffusion_model.blocks.0.self_attn.q.weight"])  # the file's e4m3 bytes
    assert pipe.fp8["low"].from_file == 16 and pipe.fp8["low"].linears == 0
    assert torch.isfinite(pipe.generate(PROMPT, _picture(), **I2V_GEN)).all()


@pytest.mark.parametrize("task,make,needle", [
    ("i2v-tiny", lambda f, t2v, i2v: f["fp16_high"], "its dim 64 and in_dim 16 are not the i2v-tiny DiT's 64 and 36"),
    ("i2v-tiny", lambda f, t2v, i2v: f["q8_low"], "its dim 64 and in_dim 16 are not the i2v-tiny DiT's 64 and 36"),
    ("t2v-tiny", lambda f, t2v, i2v: i2v["fp32_high"], "its dim 64 and in_dim 36 are not the t2v-tiny DiT's 64 and 16"),
])
def test_a_dit_file_of_the_other_task_is_refused(files, i2v_files, tiny_ckpt, tiny_i2v_ckpt, task, make, needle):
    """A T2V expert file given to an I2V task, and the reverse: one line from the header, before anything loads."""
    path = make(files, tiny_ckpt, i2v_files)
    ckpt = tiny_i2v_ckpt if task == "i2v-tiny" else tiny_ckpt
    with pytest.raises(CheckpointError) as e:
        resolve_weights(WAN_CONFIGS[task], ckpt, WeightPaths(dit_low=path))
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and str(path) in msg and f"does not fit the {task} DiT" in msg


@pytest.mark.parametrize("task,folder,needle", [
    ("t2v-tiny", "i2v", "model_type='i2v' (expected 't2v'), in_dim=36 (expected 16)"),
    ("i2v-tiny", "t2v", "model_type='t2v' (expected 'i2v'), in_dim=16 (expected 36)"),
])
def test_a_diffusers_folder_of_the_other_task_is_refused(files, i2v_files, task, folder, needle):
    where = (i2v_files if folder == "i2v" else files)["diffusers"]
    with pytest.raises(CheckpointError) as e:
        resolve_weights(WAN_CONFIGS[task], where)
    assert "\n" not in str(e.value) and needle in str(e.value) and "transformer/config.json" in str(e.value)


def test_a_wan21_clip_i2v_diffusers_config_is_refused(tmp_path):
    import json

    from wan.formats.resolve import dit_config_from_diffusers

    raw = {"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 36, "out_channels": 16,
           "ffn_dim": 128, "freq_dim": 256, "text_dim": 4096, "num_layers": 2, "image_dim": 1280}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="Wan 2.1 I2V or FLF2V transformer with CLIP"):
        dit_config_from_diffusers(raw, tmp_path / "config.json")


def test_cli_i2v_from_a_diffusers_folder_with_a_gguf_expert(i2v_files, tmp_path, capsys, caplog):
    """--task i2v-tiny --ckpt_dir <Diffusers folder> --dit_low <GGUF>: the per-component flag wins over the folder."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import generate

    _picture().save(tmp_path / "f.png")
    caplog.set_level(logging.INFO, logger="wan")
    code = generate.main(["--task", "i2v-tiny", "--device", "cpu", "--size", "64*64", "--frame_num", "5",
                          "--sample_steps", "2", "--ckpt_dir", str(i2v_files["diffusers"]), "--dit_low",
                          str(i2v_files["q8_low"]), "--image", str(tmp_path / "f.png"), "--save_file",
                          str(tmp_path / "v.mp4")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "v.mp4").is_file()
    for needle in ("high-noise DiT", "diffusers layout", "low-noise DiT", "gguf layout", "hf layout"):
        assert needle in caplog.text, needle
