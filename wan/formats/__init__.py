"""Weight layouts other than the official folders: detected per file from its header, mapped to official names,
dequantized as the tool that wrote them computes it, yielded one tensor at a time.

  headers.py   what a file holds (safetensors, GGUF, torch .pth), from its header only
  keys.py      one key map per component and naming (official, Diffusers, Hugging Face T5)
  quant.py     fp8_scaled (ComfyUI's formula) and GGUF (the gguf package's arithmetic; torch ports) dequantization
  source.py    WeightSource: one component's plan (prefix, renames, quantization, shapes) and its reader
  resolve.py   --ckpt_dir (official or Diffusers folder) + per-component paths -> every component's WeightSource

The loaders (wan.modules.checkpoint.load_dit, the T5 and VAE wrappers) take a WeightSource; `resolve_weights` runs
before anything loads and fails with one line naming the file and the key.
"""
from .resolve import ResolvedWeights, WeightPaths, dit_source, resolve_weights, t5_source, vae_source
from .source import WeightSource

__all__ = ["ResolvedWeights", "WeightPaths", "WeightSource", "dit_source", "resolve_weights", "t5_source",
           "vae_source"]
