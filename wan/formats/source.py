"""`WeightSource`: one component's files, planned from their headers, read one official-named tensor at a time.

Planning (`plan_source`, headers only) strips the wrapper prefix, sets the quantization side keys apart (ComfyUI's
`scaled_fp8` marker, per-tensor `scale_weight` / `weight_scale`, the activation scales `scale_input` /
`input_scale`, `comfy_quant`), maps every other key to its official name (wan.formats.keys) and refuses, naming the
file and the key, any key that maps to nothing, two keys that map to one name, or a mixed naming. `check_shapes` then
compares the planned shapes with the model's before a byte of weights is read.

Reading (`WeightSource.read`) opens each file once and yields (official name, tensor) in file order, one at a time:
the tensor as stored for plain floats (the caller casts it), dequantized for fp8 and GGUF (wan.formats.quant).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError
from .headers import FileHeader
from .keys import PREFIXES, naming_of, to_official
from .quant import FLOAT_TYPES, FP8_NAMES, FP8_TYPES, dequantize_fp8_scaled, dequantize_gguf, gguf_can_dequantize

log = logging.getLogger("wan")

__all__ = ["TensorPlan", "WeightSource", "plan_source", "check_shapes", "read_gguf_tensor"]

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's old and new names of the per-tensor weight scale
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")  # activation scales of ComfyUI's fp8 matmul: not used here
MARKER = "scaled_fp8"
_IGNORED_TOP = {"spiece_model": "a tokenizer embedded by ComfyUI (the tokenizer comes from its folder)"}


@dataclass(frozen=True)
class TensorPlan:
    name: str  # official
    key: str  # in the file
    file: int  # index into WeightSource.headers
    dtype: str  # stored type (F32, BF16, F8_E4M3, Q8_0, ...)
    shape: tuple[int, ...]
    scale: str | None = None  # fp8: the key of its per-tensor scale (same file)

    @property
    def conversion(self) -> str:
        if self.dtype in FP8_TYPES:
            return f"fp8_scaled {FP8_NAMES[self.dtype]}" if self.scale else f"fp8 {FP8_NAMES[self.dtype]} (no scale)"
        return "cast" if self.dtype in FLOAT_TYPES else f"gguf {self.dtype}"


@dataclass
class WeightSource:
    """One component (an expert, the T5, the VAE): its files and the plan that maps them to official names."""
    what: str  # "the high-noise DiT"
    layout: str  # official | diffusers | hf | gguf (+ " fp8_scaled")
    headers: tuple[FileHeader, ...]
    plans: dict[str, TensorPlan]  # official name -> plan, file order
    prefix: str = ""
    renamed: int = 0
    ignored: dict[str, str] = field(default_factory=dict)  # file key -> why
    config: object = None  # the DiT's WanConfig where a config.json gave it

    @property
    def where(self) -> Path:
        """The file, or the folder of a sharded checkpoint."""
        return self.headers[0].path if len(self.headers) == 1 else self.headers[0].path.parent

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: p.shape for n, p in self.plans.items()}

    def stored_bytes(self) -> int:
        return sum(h.nbytes for h in self.headers)

    def param_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of the loaded tensors when every one is held in `dtype`."""
        return sum(math.prod(p.shape) for p in self.plans.values()) * dtype.itemsize

    def counts(self) -> dict[str, int]:
        """{conversion: tensors}, e.g. {"cast": 695, "fp8_scaled e4m3fn": 400}."""
        out: dict[str, int] = {}
        for p in self.plans.values():
            kind = f"{p.dtype}" if p.conversion == "cast" else p.conversion
            out[kind] = out.get(kind, 0) + 1
        return out

    def quantized(self) -> bool:
        return any(p.conversion != "cast" for p in self.plans.values())

    def describe(self, dtype: torch.dtype | None = None) -> str:
        """One log line: layout, stored types or quantization, key count, what is converted."""
        kinds = ", ".join(f"{k} x{n}" for k, n in self.counts().items())
        done = [f"prefix {self.prefix!r} stripped"] if self.prefix else []
        if self.renamed:
            done.append(f"{self.renamed} keys renamed to the official names")
        if any(p.dtype in FP8_TYPES for p in self.plans.values()):
            dt = _name(dtype) if dtype else "the load dtype"
            done.append(f"fp8 dequantized as ComfyUI does, W.to({dt}) * scale.to({dt})")
        if self.headers[0].container == "gguf" and self.quantized():
            done.append("dequantized as the gguf package computes it (float32)")
        stored = {FLOAT_TYPES[p.dtype] for p in self.plans.values() if p.dtype in FLOAT_TYPES}
        if dtype is not None and (stored - {dtype} or self.headers[0].container == "gguf"):
            done.append(f"cast to {_name(dtype)}")
        if self.ignored:
            why: dict[str, int] = {}
            for reason in self.ignored.values():
                why[reason] = why.get(reason, 0) + 1
            done.append("not loaded: " + "; ".join(f"{n} {r}" for r, n in why.items()))
        files = f"{len(self.headers)} files" if len(self.headers) > 1 else self.headers[0].container
        return (f"{self.what}: {self.where} ({files}, {self.stored_bytes() / 1e9:.2f} GB): {self.layout} layout, "
                f"{len(self.plans)} keys ({kinds}); " + ("; ".join(done) or "loaded as stored"))

    def read(self, dequant_dtype: torch.dtype = torch.float32, device="cpu", keep_fp8=frozenset()
             ) -> Iterator[tuple[str, object]]:
        """(official name, tensor) one at a time, in file order. Plain floats come as stored (on `device`); fp8
        and GGUF dequantized (fp8 in `dequant_dtype`, ComfyUI's formula; GGUF in float32). Names in `keep_fp8`
        (e4m3fn fp8_scaled weights) come as (values, float32 scale) instead."""
        by_file: dict[int, list[TensorPlan]] = {}
        for p in self.plans.values():
            by_file.setdefault(p.file, []).append(p)
        for i, plans in by_file.items():
            header = self.headers[i]
            opener = {"safetensors": _safetensors, "gguf": _gguf, "torch": _torch}[header.container]
            with opener(header.path, device) as get:
                for p in plans:
                    scale = get(p.scale, None).to(torch.float32, copy=True) if p.scale else None  # read first: tiny
                    t = get(p.key, p)
                    if p.name in keep_fp8:
                        yield p.name, (t, scale)
                    elif p.dtype in FP8_TYPES:
                        yield p.name, dequantize_fp8_scaled(t, scale, dequant_dtype)
                    else:
                        yield p.name, t
                    del t, scale


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _safetensors:
    def __init__(self, path: Path, device):
        import safetensors  # looked up per call: tests wrap safetensors.safe_open to count live tensors

        self.handle = safetensors.safe_open(path, framework="pt", device=str(torch.device(device)))

    def __enter__(self):
        f = self.handle.__enter__()
        return lambda key, plan: f.get_tensor(key)

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


class _gguf:
    def __init__(self, path: Path, device):
        from .headers import gguf_module

        self.reader, self.device = gguf_module().GGUFReader(path), torch.device(device)

    def __enter__(self):
        tensors = {t.name: t for t in self.reader.tensors}
        return lambda key, plan: read_gguf_tensor(tensors[key], plan.dtype, plan.shape, self.device).to(self.device)

    def __exit__(self, *exc):
        self.reader = None


def read_gguf_tensor(tensor, type_name: str, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """One GGUF tensor, dequantized to float32 (on `device` for the types with a torch port: Q8_0, Q4_K, Q6_K, ...;
    else on the CPU); the only place GGUF data is read (tests wrap it)."""
    return dequantize_gguf(tensor.data, type_name, shape, device)


class _torch:
    def __init__(self, path: Path, device):
        self.sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # data paged in on use
        self.device = torch.device(device)

    def __enter__(self):
        return lambda key, plan: self.sd[key].to(self.device)

    def __exit__(self, *exc):
        self.sd = None


# ---- planning ---------------------------------------------------------------------------------------------------
def _fail(where, text: str):
    raise CheckpointError(f"{where}: {text}")


def _strip_prefix(component: str, headers, keys: list[tuple[int, str]]) -> str:
    """The wrapper prefix every key carries (markers aside), "" if none; keys mixing prefixed and bare names fail."""
    for prefix in PREFIXES[component]:
        has = [k for _, k in keys if k.startswith(prefix)]
        if has:
            bare = [k for _, k in keys if not k.startswith(prefix) and k != MARKER]
            if bare:
                _fail(headers[0].path, f"mixes {prefix!r}-prefixed keys ({has[0]}) with bare ones ({bare[0]}); "
                                       "is it two checkpoints merged into one file?")
            return prefix
    return ""


def plan_source(component: str, what: str, headers: tuple[FileHeader, ...]) -> WeightSource:
    """Plan `headers` (one file, or the shards of one checkpoint) as `component` ("dit", "t5", "vae")."""
    keys, owner = [], {}
    for i, h in enumerate(headers):
        for k in h.tensors:
            if k in owner:
                _fail(h.path, f"tensor {k!r} is also in {headers[owner[k]].path.name}; mixed shards of two "
                              "checkpoints?")
            owner[k] = i
            keys.append((i, k))
    if not keys:
        _fail(headers[0].path, f"holds no tensors ({what})")
    prefix = _strip_prefix(component, headers, keys)
    ignored: dict[str, str] = {}
    scales: dict[str, str] = {}  # official-side weight key (prefix stripped) -> scale file key
    plain: list[tuple[int, str, str]] = []  # (file, file key, stripped key)
    for i, k in keys:
        s = k[len(prefix):] if prefix and k.startswith(prefix) else k
        info = headers[i].tensors[k]
        if s == MARKER:
            ignored[k] = "scaled_fp8 marker"
        elif s in _IGNORED_TOP:
            ignored[k] = _IGNORED_TOP[s]
        elif s.endswith(INPUT_SCALE_SUFFIXES):
            ignored[k] = "activation scales of ComfyUI's fp8 matmul (weights are dequantized)"
        elif s.endswith(".comfy_quant"):
            ignored[k] = "comfy_quant format records (the format is read from the stored types)"
        elif s.endswith(".weight_scale_2"):
            _fail(headers[i].path, f"tensor {k!r}: a second-level block scale (nvfp4); only per-tensor fp8 scales "
                                   "are supported")
        elif s.endswith(SCALE_SUFFIXES):
            if info.numel != 1:
                _fail(headers[i].path, f"tensor {k!r} has shape {list(info.shape)}: block or per-channel scales are "
                                       "not supported, only ComfyUI's per-tensor fp8 scale")
            scales[s.rsplit(".", 1)[0] + ".weight"] = k
        else:
            plain.append((i, k, s))
    if component == "t5" and any(s == "shared.weight" for _, _, s in plain):
        for i, k, s in [x for x in plain if x[2] == "encoder.embed_tokens.weight"]:
            ignored[k] = "tied copy of shared.weight"
            plain.remove((i, k, s))
    naming, mixed = naming_of(component, [s for _, _, s in plain])
    if mixed:
        _fail(headers[0].path if len(headers) == 1 else headers[0].path.parent,
              f"mixes two key namings ({mixed[0]!r} and {mixed[1]!r}); pass one checkpoint per component")
    plans: dict[str, TensorPlan] = {}
    renamed = 0
    for i, k, s in plain:
        h, info = headers[i], headers[i].tensors[k]
        name = to_official(component, naming, s)
        if name is None:
            _fail(h.path, f"tensor {k!r} has no official {_COMPONENT_NAMES[component]} name ({naming} naming); "
                          "nothing is loaded partially")
        if name in plans:
            _fail(h.path, f"tensors {plans[name].key!r} and {k!r} both map to {name!r}")
        scale = scales.pop(s, None)
        _check_type(h, k, info.dtype, scale)
        plans[name] = TensorPlan(name, k, i, info.dtype, info.shape, scale)
        renamed += name != s
    if scales:
        s, k = next(iter(scales.items()))
        _fail(headers[owner[k]].path, f"scale {k!r} belongs to no fp8 weight ({s!r} is not in the file)")
    layout = naming if headers[0].container != "gguf" else "gguf"
    if any(p.scale for p in plans.values()):
        layout += " fp8_scaled"
    elif any(p.dtype in FP8_TYPES for p in plans.values()):
        layout += " fp8"
    return WeightSource(what, layout, headers, plans, prefix, renamed, ignored)


_COMPONENT_NAMES = {"dit": "Wan DiT", "t5": "umt5 encoder", "vae": "Wan 2.1 VAE", "vae22": "Wan 2.2 VAE"}


def _check_type(h: FileHeader, key: str, dtype: str, scale: str | None) -> None:
    if scale is not None and dtype not in FP8_TYPES:
        _fail(h.path, f"tensor {key!r} has a per-tensor scale but is stored as {dtype}, not fp8")
    if dtype in FLOAT_TYPES or dtype in FP8_TYPES:
        return
    if h.container == "gguf":
        if not gguf_can_dequantize(dtype):
            _fail(h.path, f"tensor {key!r} has GGUF type {dtype}, which the installed gguf package cannot "
                          "dequantize; use a file of another quantization (Q8_0, Q4_K_M, ...)")
        return
    _fail(h.path, f"tensor {key!r} is stored as {dtype}, not a float or fp8 type")


def check_shapes(source: WeightSource, expected: dict[str, tuple[int, ...]], target: str, verb: str = "fit") -> None:
    """Every expected key present with its shape, nothing else; one line naming the file, the key and `target`
    ("... does not fit the t2v-tiny DiT"; verb "match" for a folder checked against its own config.json)."""
    problems, hint = [], ""
    for name, shape in expected.items():
        plan = source.plans.get(name)
        if plan is None:
            problems.append(f"lacks {name!r}")
        elif tuple(plan.shape) != tuple(shape):
            problems.append(f"{plan.key!r} has shape {list(plan.shape)}, {target} needs {list(shape)}")
    problems += [f"{p.key!r} ({name}) is not a parameter of {target}" for name, p in source.plans.items()
                 if name not in expected]
    if not problems:
        return
    blocks = [len({n.split(".")[1] for n in names if n.startswith("blocks.")}) for names in (source.plans, expected)]
    if blocks[1] and blocks[0] != blocks[1]:
        problems.insert(0, f"{blocks[0]} blocks, {target} has {blocks[1]}")
    got = source.plans.get("patch_embedding.weight")
    want = expected.get("patch_embedding.weight")
    if got is not None and want is not None and tuple(got.shape) != tuple(want):
        hint = (f" (its dim {got.shape[0]} and in_dim {got.shape[1]} are not {target}'s {want[0]} and {want[1]}: "
                "a file of another task: T2V, I2V, 5B, 1.3B?)")
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    raise CheckpointError(f"{source.where} ({source.what}) does not {verb} {target}: {'; '.join(problems[:3])}{more}"
                          f"{hint}; nothing was loaded")
