"""Checkpoint preflight: read every file the pipeline will need, cheaply, before any model is built.

Each check reads only headers and metadata (safetensors headers, JSON files, a torch zip's pickle with the tensor
data memory-mapped, not read), so a truncated download or a foreign file fails in seconds, with one line that names
the file, instead of minutes into loading with a traceback.

Errors: `PathError` for a path given on the command line that is unusable (a usage error), `CheckpointError` for
a file whose content is wrong, `FileNotFoundError` for a missing file inside a checkpoint folder.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from pathlib import Path

from .configs.model_config import WanConfig
from .errors import CheckpointError
from .modules.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME

LORA_NAMES = {"high": "high_noise_model.safetensors", "low": "low_noise_model.safetensors"}  # Lightning layout
DOWNLOAD_HINT = ("download it with: huggingface-cli download Wan-AI/Wan2.2-T2V-A14B --local-dir ./Wan2.2-T2V-A14B "
                 "(Wan2.2-I2V-A14B for the i2v task, Wan2.2-TI2V-5B for ti2v)")
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
TINY_MARKER = ".wan_tiny_complete"  # wan.testing.tiny.MARKER (not imported: the library never imports testing)

__all__ = ["PathError", "check_tiny_dir", "lora_files", "check_lora_file",
           "read_safetensors_header", "check_torch_file", "check_tokenizer_dir", "check_expert_dir"]


class PathError(ValueError):
    """A path given on the command line cannot be used (exit code 2); the message names it and the fix."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _named(path: Path, fn, *args):
    """Run fn; any unexpected exception becomes one CheckpointError line that names `path`."""
    try:
        return fn(*args)
    except (CheckpointError, FileNotFoundError, PathError):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure must end as one line naming the file
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {_first_line(exc)}); "
                              "re-download it") from None


# ---- single files -----------------------------------------------------------------------------------------------
def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file, checked against the file size (truncation) and dtype x shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file ({size} bytes, too short for a header)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path} is not a safetensors file (its first 8 bytes give a header of {n} bytes "
                                  f"in a file of {size}); re-download it")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b
                  and all(isinstance(d, int) and d >= 0 for d in shape))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: malformed header entry for tensor {key!r}; re-download it")
        item = _DTYPE_BYTES.get(dtype)
        if item is not None and (b - a) != math.prod(shape) * item:
            raise CheckpointError(f"{path}: tensor {key!r} ({dtype} {shape}) has {b - a} bytes of data, expected "
                                  f"{math.prod(shape) * item}; re-download it")
        end = max(end, b)
    expected = 8 + n + end
    if size < expected:
        raise CheckpointError(f"{path} is truncated ({size} bytes, its header describes {expected}); re-download it")
    if size > expected:
        raise CheckpointError(f"{path} has {size - expected} bytes after its last tensor (a damaged file?); "
                              "re-download it")
    return header


def check_torch_file(path, what: str, download: str = "Wan2.2-T2V-A14B") -> None:
    """A torch.save file: exists, non-empty, a readable zip whose pickle loads with weights_only=True (tensor data
    memory-mapped, not read) and holds a dict of tensors. A legacy (pre-zip) file is checked by its magic only.
    `download`: the official checkpoint the file ships with (named when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} ({what}; part of the official {download} download); "
                                f"{DOWNLOAD_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} ({what}) is empty (0 bytes); re-download it")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic[:1] != b"\x80":  # legacy torch.save: a pickle (protocol >= 2) of torch's magic number
            raise CheckpointError(f"{path} ({what}) is not a torch checkpoint (neither a zip archive, possibly "
                                  "truncated, nor a legacy torch.save file); re-download it")
        return

    def load():
        import torch

        with zipfile.ZipFile(path) as z:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                raise CheckpointError(f"{path} ({what}) is a zip archive but not a torch checkpoint (no data.pkl)")
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
            raise CheckpointError(f"{path} ({what}) does not hold a state dict of tensors")
        return sd

    try:
        sd = load()
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, zipfile.BadZipFile, ...
        raise CheckpointError(f"{path} ({what}) cannot be read as a torch checkpoint ({_first_line(exc)}); "
                              "re-download it") from None
    del sd


def check_tokenizer_dir(path) -> None:
    """The tokenizer folder exists, holds a tokenizer, and its JSON files parse."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"missing tokenizer folder {path} (part of the official Wan2.2-T2V-A14B download); "
                                f"{DOWNLOAD_HINT}")
    present = [n for n in ("tokenizer.json", "spiece.model", "tokenizer_config.json") if (path / n).is_file()]
    if not present:
        raise FileNotFoundError(f"tokenizer folder {path} has no tokenizer.json, spiece.model or "
                                f"tokenizer_config.json; {DOWNLOAD_HINT}")
    for name in present:
        f = path / name
        if f.stat().st_size == 0:
            raise CheckpointError(f"{f} is empty (0 bytes); re-download it")
        if name.endswith(".json"):
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{f} is not valid JSON ({_first_line(exc)}); re-download it") from None


def _read_index(index: Path) -> dict[str, list[str]]:
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index} is not valid JSON ({_first_line(exc)}); re-download it") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file); re-download it")
    shards: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        if not isinstance(fname, str) or not fname or Path(fname).name != fname:
            raise CheckpointError(f"{index}: 'weight_map' entry {key!r} names {fname!r}, not a shard file name")
        shards.setdefault(fname, []).append(key)
    return shards


def check_expert_dir(folder, arch: WanConfig | None = None) -> None:
    """config.json (parsed with WanConfig.from_json, compared with `arch`), the index json, every shard header."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"missing expert folder {folder}; {DOWNLOAD_HINT}")
    config = _named(folder / CONFIG_NAME, WanConfig.from_json, folder / CONFIG_NAME)
    if arch is not None:
        bad = config.mismatches(arch)
        if bad:
            raise CheckpointError(f"{folder / CONFIG_NAME} has {', '.join(bad[:3])} (another model's checkpoint: "
                                  "T2V, I2V, 1.3B or 5B?)")
    index = folder / INDEX_NAME
    if index.is_file():
        shards = _named(index, _read_index, index)
    elif (folder / SINGLE_NAME).is_file():
        shards = {SINGLE_NAME: []}
    else:
        raise FileNotFoundError(f"missing {index} (and no single {SINGLE_NAME}); the download is incomplete")
    for fname, keys in shards.items():
        shard = folder / fname
        if not shard.is_file():
            raise FileNotFoundError(f"missing shard {shard} (listed in {INDEX_NAME}); the download is incomplete")
        header = _named(shard, read_safetensors_header, shard)
        missing = [k for k in keys if k not in header]
        if missing:
            raise CheckpointError(f"{shard} lacks tensor {missing[0]!r} that {INDEX_NAME} places there"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


# ---- folders ----------------------------------------------------------------------------------------------------
def check_tiny_dir(folder) -> None:
    """The tiny task's --ckpt_dir: a complete tiny checkpoint, or a place where one can be written (an empty or new
    folder whose parent accepts new entries)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PathError(f"--ckpt_dir {folder} is a file; a tiny task needs a folder (it writes its random checkpoint "
                        "there)")
    if folder.is_dir():
        if (folder / TINY_MARKER).is_file() or (folder / "model_index.json").is_file():  # written, or Diffusers
            return
        try:
            foreign = any(folder.iterdir())
        except OSError as exc:
            raise PathError(f"--ckpt_dir {folder} cannot be listed ({exc.strerror}); choose another folder") from None
        if foreign:
            raise PathError(f"--ckpt_dir {folder} holds other files but no complete tiny checkpoint; pass an empty or "
                            "new folder for the tiny task")
    # ensure_tiny_checkpoint writes a temporary folder next to `folder` and renames it into place
    anchor = folder.absolute().parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise PathError(f"--ckpt_dir {folder} cannot be created: {anchor} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=f".{folder.name}.probe.", dir=anchor)
        os.rmdir(probe)
    except OSError as exc:
        raise PathError(f"--ckpt_dir {folder} cannot be written ({exc.strerror or type(exc).__name__} in {anchor}); "
                        "choose a writable folder") from None


# ---- LoRA -------------------------------------------------------------------------------------------------------
def lora_files(lora_dir=None, lora_high=None, lora_low=None) -> dict[str, Path | None]:
    """{"high": path or None, "low": ...}: explicit files win over the Lightning folder's. Names a missing file."""
    out: dict[str, Path | None] = {"high": None, "low": None}
    if lora_dir is not None:
        d = Path(lora_dir)
        if not d.is_dir():
            raise PathError(f"--lora_dir {d} is not a directory (it should hold {LORA_NAMES['high']} and "
                            f"{LORA_NAMES['low']})")
    for expert, explicit in (("high", lora_high), ("low", lora_low)):
        if explicit is not None:
            path = Path(explicit)
            if not path.is_file():
                raise PathError(f"--lora_{expert} {path} does not exist" if not path.exists()
                                else f"--lora_{expert} {path} is not a file")
            out[expert] = path
        elif lora_dir is not None:
            path = Path(lora_dir) / LORA_NAMES[expert]
            if not path.is_file():
                raise PathError(f"--lora_dir {lora_dir} lacks {LORA_NAMES[expert]} (the {expert}-noise expert's "
                                f"LoRA); pass --lora_{expert} FILE or complete the folder")
            out[expert] = path
    return out


def check_lora_file(path) -> None:
    """A LoRA file's safetensors header is readable and consistent with its size."""
    path = Path(path)
    _named(path, read_safetensors_header, path)
