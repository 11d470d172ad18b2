"""Load time and error of each checkpoint layout against the official one (wan/formats).

    python -m benchmarks.layouts --size small --out benchmarks/results/cpu_layouts.json        # CPU, minutes
    python -m benchmarks.layouts --size a14b --device cuda --dir /local/disk --out gpu_layouts.json   # GPU, one expert

One random expert (seeded, drawn per tensor: wan.testing.random_init) is written in the official layout and again in
each other layout (wan.testing.layouts: Diffusers transformer/ folder, ComfyUI fp16 / bf16 single files, fp8_scaled,
GGUF Q8_0, Q4_K and Q6_K), then loaded with `load_dit` (headers planned, keys mapped, shapes checked, dequantized) into
`--dtype` on `--device`. Per layout: bytes on disk, load seconds (min and median of --repeat, the files in the page
cache: they were just written), the ratio to the official layout's load into the same dtype, and the weight error
(relative RMS over all weights and the largest per-tensor relative RMS) against the official fp32 weights, loaded in
--dtype and in fp32 (the format's own error). With
--forward (CPU sizes) also the relative error of one DiT forward (256 tokens) in fp32, and for fp8_scaled under
--fp8_linear all (emulated kernel): the file's e4m3 weights kept with their per-tensor scale, against dequantizing them
and quantizing again per output channel (what a LoRA-merged linear gets), and against fp8_linear on the original
weights.

Sizes: tiny (the t2v-tiny DiT), small (dim 512, 4 blocks: errors less dominated by 64-wide rows), a14b (one A14B
expert: built in bf16 on the GPU, the official layout written in bf16, 28.6 GB, not fp32: the disk holds one layout at
a time, each deleted after its row; leave out Q4_K / Q6_K there: wan.testing.gguf_quants writes K-quants at numpy
speed).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from wan.configs.model_config import A14B, TINY
from wan.formats import dit_source
from wan.modules.checkpoint import load_dit, save_wan_model
from wan.modules.model import WanModel
from wan.testing import layouts as L
from wan.testing.random_init import materialize_random_

SIZES = {"tiny": TINY, "small": replace(TINY, dim=512, ffn_dim=2048, num_heads=4, num_layers=4), "a14b": A14B}
LAYOUTS = ("official", "diffusers", "comfy_fp16", "comfy_bf16", "fp8_scaled", "gguf_q8_0", "gguf_q4_k", "gguf_q6_k")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def write_layout(layout: str, official: Path, out: Path, config) -> Path:
    """`official` (an expert folder) written again as `layout` under `out`; returns the path to load."""
    if layout == "official":
        return official
    if layout == "diffusers":
        return _diffusers_transformer(official, out / "transformer", config)
    if layout.startswith("comfy_"):
        dtype = {"comfy_fp16": torch.float16, "comfy_bf16": torch.bfloat16}[layout]
        return L.write_comfy_dit(official, out / f"{layout}.safetensors", dtype)
    if layout == "fp8_scaled":
        return L.write_fp8_scaled_dit(official, out / "fp8_scaled.safetensors", config, rest_dtype=torch.bfloat16)
    if layout == "gguf_q8_0":
        return _gguf_q8_0(official, out / "q8_0.gguf")
    if layout in ("gguf_q4_k", "gguf_q6_k"):
        path = out / f"{layout.removeprefix('gguf_')}.gguf"
        L.write_gguf_dit(official, path, layout.removeprefix("gguf_").upper())
        return path
    raise ValueError(layout)


def _diffusers_transformer(official: Path, folder: Path, config) -> Path:
    """diffusers' own renames (convert_wan_transformer_to_diffusers), written as save_pretrained writes a transformer:
    config.json and shards of at most 5 GB (no model object: a full-size expert is only renamed)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import save_file

    sd = convert_wan_transformer_to_diffusers(L.official_dit_state(official))
    folder.mkdir(parents=True)
    groups, size = [[]], 0
    for k, v in sd.items():
        if groups[-1] and size + v.numel() * v.element_size() > 5e9:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += v.numel() * v.element_size()
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in keys}, folder / name)
        weight_map.update({k: name for k in keys})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    c = config
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "num_attention_heads": c.num_heads, "attention_head_dim": c.head_dim,
        "in_channels": c.in_dim, "out_channels": c.out_dim, "text_dim": c.text_dim, "freq_dim": c.freq_dim,
        "ffn_dim": c.ffn_dim, "num_layers": c.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": c.eps, "patch_size": list(c.patch_size)}))
    return folder


def _gguf_q8_0(official: Path, path: Path) -> Path:
    """City96's rules with Q8_0, quantized by the torch port of the package's quantizer (full size in seconds)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="wan")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for k, v in L.official_dit_state(official).items():
        t = L._gguf_type_for(k, tuple(v.shape), "Q8_0")
        if v.ndim == 5:
            writer.add_array(f"comfy.gguf.orig_shape.{k}", list(v.shape))
            v = v.reshape(v.shape[0], -1)
        if t == "Q8_0":
            q = L.quantize_q8_0_torch(v.to(dev)).cpu().numpy()
            writer.add_tensor(k, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(k, L.gguf_quantize(v.float().numpy(), t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_load(path: Path, config, dtype, device, repeat: int) -> tuple[list[float], WanModel]:
    times, model = [], None
    for _ in range(repeat):
        del model
        _sync(device)
        t0 = time.perf_counter()
        model = load_dit(WanModel, dit_source(path, "x", config), dtype, device)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, model


@torch.no_grad()
def weight_error(model: WanModel, reference: dict) -> dict:
    num = den = 0.0
    worst = 0.0
    for k, v in model.state_dict().items():
        ref = reference[k].to(v.device, torch.float32)
        d = (v.float() - ref).pow(2).sum().item()
        r = ref.pow(2).sum().item()
        num, den = num + d, den + r
        worst = max(worst, math.sqrt(d / r) if r else 0.0)
    return {"rel_rms": math.sqrt(num / den), "worst_tensor_rel_rms": worst}


@torch.no_grad()
def forward(model: WanModel, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(model.in_dim, 4, 16, 16, generator=g)  # 4 x 8 x 8 = 256 tokens
    ctx = torch.randn(64, model.text_dim, generator=g)
    return model([x], t=torch.tensor([500.0]), context=[ctx], seq_len=256)[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_kept_rows(official: Path, fp8_file: Path, config, out_ref: torch.Tensor) -> dict:
    """--fp8_linear all (emulated kernel) three ways, each against the official fp32 forward."""
    from wan.modules.fp8 import convert_linears_to_fp8_

    def run(path, keep):
        model = load_dit(WanModel, dit_source(path, "x", config), torch.float32, "cpu",
                         fp8=("all", "emulated") if keep else None)
        convert_linears_to_fp8_(model, "all", "emulated")
        return rel(forward(model), out_ref)

    return {"fp8_scaled kept (file e4m3 + per-tensor scale)": run(fp8_file, True),
            "fp8_scaled dequantized, then per-channel e4m3 again": run(fp8_file, False),
            "official weights, per-channel e4m3 (--fp8_linear all)": run(official, False)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--forward", action="store_true", help="also the forward errors (CPU sizes)")
    p.add_argument("--dir", default=None, help="where the files are written (default: a temporary folder)")
    p.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config, device, dtype = SIZES[args.size], torch.device(args.device), DTYPES[args.dtype]
    layouts = args.layouts.split(",")
    root = Path(tempfile.mkdtemp(prefix="wan_layouts_", dir=args.dir))
    rows, result = {}, {"size": args.size, "device": str(device), "dtype": args.dtype, "repeat": args.repeat,
                        "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        with torch.device("meta"):
            model = WanModel.from_config(config)
        build = device if device.type == "cuda" else "cpu"
        model = materialize_random_(model, build, torch.bfloat16 if args.size == "a14b" else torch.float32, seed=0)
        official = root / "official"
        save_wan_model(model.cpu(), official, max_shard_bytes=int(5e9) if args.size == "a14b" else 2**20)
        reference = {k: v.float() if args.size != "a14b" else v for k, v in model.state_dict().items()}
        del model
        out_ref = forward(load_dit(WanModel, dit_source(official, "x", config), torch.float32)) if args.forward \
            else None
        for layout in layouts:
            folder = root / f"as_{layout}"
            folder.mkdir()
            path = write_layout(layout, official, folder, config)
            time_load(path, config, dtype, device, 1)  # warm-up: imports, first-call costs
            times, loaded = time_load(path, config, dtype, device, args.repeat)
            row = {"disk_bytes": _disk_bytes(path), "load_s_min": min(times), "load_s_median": statistics.median(times),
                   "describe": dit_source(path, "x", config).describe(dtype),
                   **{f"{k}_{args.dtype}": v for k, v in weight_error(loaded, reference).items()}}
            del loaded
            if args.size != "a14b":  # a 57 GB fp32 expert: only the --dtype load full size
                loaded = load_dit(WanModel, dit_source(path, "x", config), torch.float32, device)  # the format's own
                row.update({f"{k}_fp32": v for k, v in weight_error(loaded, reference).items()})
                loaded = None
            if args.forward:
                loaded32 = load_dit(WanModel, dit_source(path, "x", config), torch.float32)
                row["forward_rel_error_fp32"] = rel(forward(loaded32), out_ref)
                if layout == "fp8_scaled":
                    row["fp8_linear_all_emulated"] = fp8_kept_rows(official, path, config, out_ref)
            rows[layout] = row
            print(f"{layout:12s} {row['disk_bytes'] / 1e6:10.1f} MB  load {row['load_s_min']:.3f} s (min of "
                  f"{args.repeat})  weight rel rms {row[f'rel_rms_{args.dtype}']:.2e}"
                  + (f"  forward {row['forward_rel_error_fp32']:.2e}" if args.forward else ""), flush=True)
            shutil.rmtree(folder)
        base = rows.get("official", {}).get("load_s_min")
        for row in rows.values():
            row["load_vs_official"] = row["load_s_min"] / base if base else None
        result["rows"] = rows
        text = json.dumps(result, indent=1)
        if args.out:
            Path(args.out).write_text(text + "\n")
        print(text)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
