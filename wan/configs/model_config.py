"""The DiT architecture as one frozen dataclass, read from and checked against each expert's `config.json`.

Field names and defaults are `WanModel.__init__`'s (the reference signature). `config.json` holds only some of them:
the reference drops `IGNORED` keys before building the model, so those always keep their defaults.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

from ..errors import CheckpointError


@dataclass(frozen=True)
class WanConfig:
    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    # config.json keys the reference ignores (diffusers' ignore_for_config): they always take the defaults above
    IGNORED: ClassVar[tuple[str, ...]] = ("patch_size", "cross_attn_norm", "qk_norm", "text_dim", "window_size")

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of an even size")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def json_dict(self) -> dict:
        """What config.json holds (the keys the reference reads)."""
        return {k: v for k, v in asdict(self).items() if k not in self.IGNORED}

    @classmethod
    def from_json(cls, path) -> "WanConfig":
        """Parse `config.json` with the reference's semantics; every problem names the file and the key."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"missing {path} (each expert folder of the official Wan2.2-T2V-A14B download "
                                    "has one)")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); re-download it") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} must hold a JSON object, not {type(raw).__name__}")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key.startswith("_") or key in cls.IGNORED:
                continue
            if key not in known:
                raise CheckpointError(f"{path} has key {key!r}, which WanModel does not take; is this a Wan DiT "
                                      "config.json?")
            want = type(getattr(cls(), key))
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool)) or (
                want is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise CheckpointError(f"{path}: key {key!r} must be a {want.__name__}, got {value!r}")
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    def mismatches(self, expected: "WanConfig") -> list[str]:
        """'key=found (expected X)' for each field that differs from `expected`."""
        return [f"{f.name}={getattr(self, f.name)!r} (expected {getattr(expected, f.name)!r})"
                for f in fields(self) if getattr(self, f.name) != getattr(expected, f.name)]


# The T2V-A14B expert (both experts have this config.json) and the built-in tiny model.
A14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
TINY = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2)
# I2V: the same DiT with 36 input channels (16 noise + 4 first-frame mask + 16 image latent); Wan 2.2 has no CLIP.
A14B_I2V = replace(A14B, model_type="i2v", in_dim=36)
TINY_I2V = replace(TINY, model_type="i2v", in_dim=36)
# TI2V-5B: one dense DiT on the Wan 2.2 VAE's 48 latent channels, in and out (its config.json: model_type ti2v).
TI2V_5B = WanConfig(model_type="ti2v", in_dim=48, dim=3072, ffn_dim=14336, out_dim=48, num_heads=24, num_layers=30)
TINY_TI2V = replace(TINY, model_type="ti2v", in_dim=48, out_dim=48)
