"""What a weight file holds, read from its header only: container, tensor names, stored types and shapes.

Three containers: safetensors (the JSON header, checked against the file size by `wan.preflight`), GGUF (magic
`GGUF`; the tensor table through the `gguf` package's reader, which memory-maps the data and reads none of it) and
torch `.pth` (a zip whose pickle is loaded with `weights_only=True` and the tensor data memory-mapped, not read).
Every failure is one `CheckpointError` line that names the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..preflight import check_torch_file, read_safetensors_header

__all__ = ["FileHeader", "TensorInfo", "read_header", "GGUF_ORIG_SHAPE", "gguf_module"]

GGUF_MAGIC = b"GGUF"
GGUF_ORIG_SHAPE = "comfy.gguf.orig_shape."  # city96's metadata for tensors whose ggml shape was reshaped (5-D)
GGUF_INSTALL = "pip install gguf (or pip install -e '.[gguf]')"
# torch dtype -> the safetensors name, so every container reports types alike
_TORCH_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "float8_e4m3fn": "F8_E4M3",
                "float8_e5m2": "F8_E5M2", "uint8": "U8", "int8": "I8", "int32": "I32", "int64": "I64", "bool": "BOOL"}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name (F32, BF16, F8_E4M3, ...) or, in a GGUF, the ggml type (Q8_0, Q4_K, F16, ...)
    shape: tuple[int, ...]  # row-major, as the tensor is used (a GGUF's reversed ggml order undone)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class FileHeader:
    path: Path
    container: str  # "safetensors" | "gguf" | "torch"
    tensors: dict[str, TensorInfo]  # file order
    metadata: dict = field(default_factory=dict)
    nbytes: int = 0  # the file's size

    def types(self) -> dict[str, int]:
        """{stored type: tensor count}, for the log."""
        out: dict[str, int] = {}
        for info in self.tensors.values():
            out[info.dtype] = out.get(info.dtype, 0) + 1
        return out


def gguf_module():
    """The `gguf` package, or a one-line error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"reading GGUF files needs the gguf package: {GGUF_INSTALL}") from None
    return gguf


def read_header(path, what: str) -> FileHeader:
    """The header of one weight file; `what` names its role in messages ("the high-noise DiT", "the T5")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} ({what})")
    with open(path, "rb") as f:
        magic = f.read(4)
    size = path.stat().st_size
    if magic == GGUF_MAGIC:
        return _gguf_header(path, what, size)
    if magic[:2] == b"PK" or path.suffix.lower() in (".pth", ".pt", ".bin", ".ckpt"):  # a torch zip (or pickle)
        return _torch_header(path, what, size)
    header = read_safetensors_header(path)
    tensors = {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    return FileHeader(path, "safetensors", tensors, header.get("__metadata__") or {}, size)


def _torch_header(path: Path, what: str, size: int) -> FileHeader:
    import torch

    check_torch_file(path, what)  # the one-line errors for empty, truncated, foreign and unpicklable files
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    tensors = {k: TensorInfo(_TORCH_NAMES.get(str(v.dtype).removeprefix("torch."), str(v.dtype)), tuple(v.shape))
               for k, v in sd.items()}
    return FileHeader(path, "torch", tensors, {}, size)


def _gguf_header(path: Path, what: str, size: int) -> FileHeader:
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - an unknown type id, a truncated table, ...: one line naming the file
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} ({what}) cannot be read as a GGUF file ({text}); an unknown tensor type or a "
                              "damaged download") from None
    metadata = {}
    for key, fld in reader.fields.items():
        if key.startswith(GGUF_ORIG_SHAPE) or key == "general.architecture":
            metadata[key] = fld.contents()
    tensors = {}
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise CheckpointError(f"{path} ({what}) is truncated: tensor {t.name!r} ends at byte {end}, the file has "
                                  f"{size}; re-download it")
        orig = metadata.get(GGUF_ORIG_SHAPE + t.name)
        shape = tuple(int(d) for d in orig) if orig else tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = TensorInfo(t.tensor_type.name, shape)
    return FileHeader(path, "gguf", tensors, metadata, size)
