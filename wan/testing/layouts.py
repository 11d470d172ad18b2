"""Write an official-layout checkpoint again in the layouts users have, with the rename rules and quantizers of
those tools (shared/reference/checkpoint_layouts_facts.md), for tests and benchmarks:

  write_diffusers_folder   diffusers' own classes: convert_wan_transformer_to_diffusers + WanTransformer3DModel,
                           UMT5EncoderModel, AutoencoderKLWan, WanPipeline(...).save_pretrained (model_index.json);
                           TI2V-5B's one-transformer folder too
  write_diffusers_vae22    the Wan 2.2 VAE with diffusers' names (wan.modules.vae2_2_keys)
  write_comfy_dit          official names, optional model.diffusion_model. prefix, fp16 / bf16 / fp32
  write_fp8_scaled_dit     ComfyUI's scaled fp8: every nn.Linear weight as e4m3fn (or e5m2) W8 = W / s with one
                           scalar s = amax / 448 per tensor, `scale_weight` (old) or `weight_scale` + `comfy_quant`
                           (new), the `scaled_fp8` marker; everything else kept in `rest_dtype`
  write_hf_t5              the T5 with Hugging Face names (ComfyUI's umt5_xxl files), fp16 or fp8_scaled
  write_gguf_dit           city96's GGUF rules: 1-D, <= 1024-element and *.modulation tensors F32; the 5-D
                           patch_embedding F32 with its comfy.gguf.orig_shape; the rest in `qtype` (Q8_0, Q4_0, Q4_1,
                           Q5_0, Q5_1 through the gguf package, Q4_K, Q5_K, Q6_K through wan.testing.gguf_quants),
                           falling back to Q8_0 / F16 for rows the block size does not divide, as llama.cpp's
                           quantizer does; `override` mixes types per tensor (Q4_K_M: Q4_K + some Q6_K)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

COMFY_PREFIX = "model.diffusion_model."
E4M3_MAX = 448.0


def official_dit_state(expert_dir) -> dict[str, torch.Tensor]:
    """An official expert folder's tensors (all shards), in file order."""
    from safetensors.torch import load_file

    folder = Path(expert_dir)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    sd: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(index.values()):
        sd.update(load_file(folder / shard))
    return sd


def linear_weight_names(config) -> list[str]:
    """The `.weight` of every nn.Linear of the DiT (what ComfyUI's scaled fp8 quantizes)."""
    from ..modules.model import WanModel

    with torch.device("meta"):
        model = WanModel.from_config(config)
    return [f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear]


def write_comfy_dit(expert_dir, path, dtype=torch.float16, prefix: str = COMFY_PREFIX) -> Path:
    from safetensors.torch import save_file

    sd = {prefix + k: v.to(dtype).contiguous() for k, v in official_dit_state(expert_dir).items()}
    save_file(sd, path)
    return Path(path)


def scaled_fp8(w: torch.Tensor, fp8=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8, s): s = amax|W| / fp8 max (fp32 scalar), W8 = fp8(W / s), clamped to the fp8 range."""
    top = torch.finfo(fp8).max
    s = (w.float().abs().amax() / top).clamp(min=torch.finfo(torch.float32).tiny)
    return (w.float() / s).clamp(-top, top).to(fp8), s.reshape(())


def write_fp8_scaled_dit(expert_dir, path, config, fp8=torch.float8_e4m3fn, new_names: bool = False,
                         prefix: str = COMFY_PREFIX, rest_dtype=torch.float32, scale_dtype=torch.float32,
                         input_scales: bool = True) -> Path:
    """ComfyUI's scaled fp8 DiT (see the module docstring). new_names: `weight_scale` + `comfy_quant` (Dec 2025+),
    else `scale_weight` (+ `scale_input` 1.0 with input_scales) and the `scaled_fp8` marker."""
    from safetensors.torch import save_file

    linears = set(linear_weight_names(config))
    out: dict[str, torch.Tensor] = {}
    if not new_names:
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)  # ComfyUI: torch.tensor([], dtype=fp8)
    for k, v in official_dit_state(expert_dir).items():
        if k in linears:
            w8, s = scaled_fp8(v, fp8)
            base = prefix + k.removesuffix(".weight")
            out[prefix + k] = w8
            out[base + (".weight_scale" if new_names else ".scale_weight")] = s.to(scale_dtype)
            if new_names:
                fmt = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}[fp8]
                out[base + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
            elif input_scales:
                out[base + ".scale_input"] = torch.tensor(1.0)
        else:
            out[prefix + k] = v.to(rest_dtype)
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return Path(path)


def write_hf_t5(t5_pth, path, dtype=torch.float16, fp8: bool = False, embedded_tokenizer: bool = True) -> Path:
    """The official T5 .pth with Hugging Face names (ComfyUI's umt5_xxl_fp16 / _fp8_e4m3fn_scaled)."""
    from safetensors.torch import save_file

    from ..modules.t5 import map_wan_t5_key

    out: dict[str, torch.Tensor] = {}
    if fp8:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    for k, v in torch.load(t5_pth, weights_only=True).items():
        name = map_wan_t5_key(k)
        if fp8 and v.ndim == 2 and ".layer." in name and "relative_attention_bias" not in name:
            w8, s = scaled_fp8(v)
            out[name], out[name.removesuffix(".weight") + ".scale_weight"] = w8, s
        else:
            out[name] = v.to(dtype)
    if embedded_tokenizer:  # ComfyUI stores the serialized sentencepiece model in the file
        out["spiece_model"] = torch.tensor(list(b"sentencepiece bytes"), dtype=torch.uint8)
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return Path(path)


def write_official_vae_safetensors(vae_pth, path, dtype=torch.bfloat16, prefix: str = "") -> Path:
    """The official VAE .pth as a 16-bit safetensors file (ComfyUI's wan_2.1_vae, Kijai's Wan2_1_VAE_bf16)."""
    from safetensors.torch import save_file

    sd = torch.load(vae_pth, weights_only=True)
    save_file({prefix + k: v.to(dtype).contiguous() for k, v in sd.items()}, path)
    return Path(path)


def write_diffusers_folder(official_dir, out_dir, config, max_shard_size: str = "200KB") -> Path:
    """The whole official tiny checkpoint as a Diffusers folder, written by diffusers' and transformers' own classes
    (transformer = high-noise, transformer_2 = low-noise, the T5 in bf16, the VAE and tokenizer); an I2V task's as
    Wan-AI/Wan2.2-I2V-A14B-Diffusers is, a WanImageToVideoPipeline without image encoder (in_channels 36); a
    one-model task's (TI2V-5B) as Wan-AI/Wan2.2-TI2V-5B-Diffusers is: a WanPipeline with transformer/ alone,
    expand_timesteps, and the Wan 2.2 VAE (AutoencoderKLWan with is_residual) in vae/."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from transformers import AutoTokenizer

    from ..modules.t5 import load_umt5_encoder
    from ..modules.vae2_2 import VAE_CLASSES

    official_dir, out_dir = Path(official_dir), Path(out_dir)
    arch = config.arch
    experts = []
    for sub in config.experts.values():
        model = WanTransformer3DModel(num_attention_heads=arch.num_heads, attention_head_dim=arch.head_dim,
                                      in_channels=arch.in_dim, out_channels=arch.out_dim, text_dim=arch.text_dim,
                                      freq_dim=arch.freq_dim, ffn_dim=arch.ffn_dim, num_layers=arch.num_layers,
                                      eps=arch.eps)
        model.load_state_dict(convert_wan_transformer_to_diffusers(official_dit_state(official_dir / sub)),
                              strict=True)
        experts.append(model.eval())
    text_encoder = load_umt5_encoder(str(official_dir / config.t5_checkpoint), torch.bfloat16)
    vae = VAE_CLASSES[config.vae_version](vae_pth=str(official_dir / config.vae_checkpoint), device="cpu").model
    tokenizer = AutoTokenizer.from_pretrained(official_dir / config.t5_tokenizer, local_files_only=True)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
    if config.boundary is None:  # TI2V-5B: one transformer, the timestep expanded per token
        pipe = WanPipeline(**parts, transformer=experts[0], transformer_2=None, boundary_ratio=None,
                           expand_timesteps=True)
    else:
        pipeline = WanImageToVideoPipeline if config.takes_image else WanPipeline
        pipe = pipeline(**parts, transformer=experts[0], transformer_2=experts[1], boundary_ratio=config.boundary)
    pipe.save_pretrained(out_dir, max_shard_size=max_shard_size)
    shutil.copytree(official_dir / config.t5_tokenizer, out_dir / "tokenizer", dirs_exist_ok=True)
    return out_dir


def write_diffusers_vae22(vae_pth, path) -> Path:
    """An official-layout Wan 2.2 VAE (Wan2.2_VAE.pth) as one safetensors file with diffusers' key names (what the
    vae/ folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers holds)."""
    from safetensors.torch import save_file

    from ..modules.vae2_2_keys import convert_wan22_vae_to_diffusers

    sd = convert_wan22_vae_to_diffusers(torch.load(vae_pth, weights_only=True))
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return Path(path)


# ---- GGUF -------------------------------------------------------------------------------------------------------
GGUF_F32_NAMES = ("modulation",)  # city96's convert.py keeps these (and 1-D / small tensors) in F32


def _gguf_type_for(name: str, shape: tuple[int, ...], qtype: str) -> str:
    import gguf

    if len(shape) <= 1 or int(np.prod(shape)) <= 1024 or any(n in name for n in GGUF_F32_NAMES) or len(shape) > 4:
        return "F32"
    for candidate in (qtype, "Q8_0"):
        block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, candidate)][0]
        if shape[-1] % block == 0:
            return candidate
    return "F16"


def quantize_q8_0_torch(x: torch.Tensor) -> torch.Tensor:
    """The gguf package's Q8_0 quantizer in torch (same arithmetic, any device; for writing full-size files fast):
    float32 [..., n] -> uint8 [..., n / 32 * 34]."""
    blocks = x.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = blocks * inv
    a = v.abs()
    fl = a.floor()
    q = (torch.sign(v) * (fl + (2 * (a - fl)).floor())).to(torch.int8)  # round half away from zero (np_roundf)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // 32 * 34)


GGUF_WRITABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")  # the quantized types written


def gguf_quantize(data: np.ndarray, type_name: str) -> np.ndarray:
    """float32 [.., n] -> the stored array (uint8 blocks, or F32 / F16 values): K-quants by wan.testing.gguf_quants,
    the rest by the gguf package's quantizer."""
    import gguf

    from .gguf_quants import quantize_q4_k, quantize_q5_k, quantize_q6_k

    k_quant = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}.get(type_name)
    if k_quant is not None:
        return k_quant(data)
    return gguf.quants.quantize(data, getattr(gguf.GGMLQuantizationType, type_name))


def write_gguf_dit(expert_dir, path, qtype: str = "Q8_0", prefix: str = "", override: dict | None = None) -> dict:
    """A GGUF expert by city96's rules (module docstring); returns {official name: ggml type written}.
    `override` {name: type} forces a tensor's type (another of GGUF_WRITABLE, as Q4_K_M files mix Q4_K and Q6_K;
    or one nobody writes here, e.g. one the gguf package cannot dequantize: random raw bytes)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="wan")
    types = {}
    for k, v in official_dit_state(expert_dir).items():
        arr = v.float().numpy()
        t = (override or {}).get(k) or _gguf_type_for(k, tuple(arr.shape), qtype)
        if arr.ndim == 5:  # patch_embedding: ggml has 4 dims; F32 as 2-D, the real shape in the metadata
            writer.add_array(f"comfy.gguf.orig_shape.{prefix}{k}", list(arr.shape))
            arr = arr.reshape(arr.shape[0], -1)
        types[k] = t
        if t in ("F32", "F16"):
            writer.add_tensor(prefix + k, gguf_quantize(arr, t))
        elif k in (override or {}) and t not in GGUF_WRITABLE:  # a type nobody writes here (or decodes): random bytes
            block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, t)]
            raw = np.random.default_rng(0).integers(0, 255, (arr.shape[0], arr.shape[1] // block * size), np.uint8)
            writer.add_tensor(prefix + k, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, t))
        else:
            writer.add_tensor(prefix + k, gguf_quantize(arr, t), raw_dtype=getattr(gguf.GGMLQuantizationType, t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def gguf_reference(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file dequantized by the gguf package alone (the reference the loader must equal):
    float32, in the shape its orig_shape metadata gives (else the reversed ggml shape)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        field = reader.fields.get(f"comfy.gguf.orig_shape.{t.name}")
        shape = tuple(field.contents()) if field is not None else tuple(reversed(t.shape.tolist()))
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
    return out
