"""LoRA merging as a load-time weight transform (how the Wan2.2-Lightning fork applies its 4-step LoRAs).

    lora = LoraMerge("high_noise_model.safetensors", strength=1.0)
    lora.check({name: tuple(p.shape) for name, p in meta_model.state_dict().items()})
    w = lora.apply(name, w.float()).to(dtype)   # per tensor, while loading; untargeted tensors come back untouched
    log.info(lora.summary())

or, for a model that is already built: `merge_lora_(model, path, strength)`.

The merge is W + strength * (alpha / rank) * (up @ down) (alpha missing: scale 1), plus strength * diff for the
distill extras (.diff, .diff_b, .diff_m), computed in float32 on the weight's device with LoRA tensors upcast from
fp16/bf16 (the fork merges into fp32 weights; LightX2V's bf16 merge is not reproduced). Strength 0 changes nothing.
Key formats and name mapping: wan/lora_keys.py.
"""
from __future__ import annotations

import logging
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .lora_keys import LoraKey, parse_keys

log = logging.getLogger("wan")

__all__ = ["LoraError", "LoraMerge", "merge_lora_"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class LoraError(CheckpointError):
    """A LoRA file is missing, unreadable, of no known format, or does not fit the model (one-line message)."""


@dataclass(frozen=True)
class _Term:
    """One addition to a target: a LoRA pair (up, down, coef = alpha / rank) or a diff tensor (coef 1)."""
    keys: tuple[str, ...]  # every file key behind this term (for counting and messages)
    up: str | None = None
    down: str | None = None
    diff: str | None = None
    coef: float = 1.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _more(items: list, shown: int) -> str:
    return f" and {len(items) - shown} more" if len(items) > shown else ""


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise LoraError(f"LoRA file {path} does not exist")
    if path.is_dir():
        raise LoraError(f"LoRA path {path} is a folder; pass one file (a Lightning LoRA folder holds "
                        "high_noise_model.safetensors and low_noise_model.safetensors)")
    try:
        if path.suffix.lower() in TORCH_SUFFIXES:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
    except Exception as exc:  # safetensors, pickle, zip and OS errors all mean: not a readable file
        raise LoraError(f"cannot read LoRA file {path}: {_first_line(exc)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise LoraError(f"LoRA file {path} does not hold a flat {{name: tensor}} dict; is it a LoRA?")
    if not sd:
        raise LoraError(f"LoRA file {path} holds no tensors")
    return sd


@contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """TF32 (if the pipeline enabled it) would round the merge product to ~10 mantissa bits; keep it exact fp32."""
    prev = torch.get_float32_matmul_precision()
    if device.type != "cuda" or prev == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


class LoraMerge:
    """One LoRA file, read once, ready to be merged into official-named WanModel weights one tensor at a time."""

    def __init__(self, path, strength: float = 1.0):
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
            raise ValueError(f"LoRA strength must be a finite number, got {strength!r}")
        self.path = Path(path)
        self.name = self.path.name
        self.strength = float(strength)
        self._tensors = _read_tensors(self.path)
        self.format, parsed, problems = parse_keys(self._tensors)
        if problems:
            raise LoraError(f"LoRA file {self.path}: {'; '.join(problems)}")
        self._plan = self._build_plan(parsed)
        self.num_keys = len(self._tensors)
        self._applied: set[str] = set()
        if not any(k.role == "alpha" for k in parsed) and any(k.style == "A_B" for k in parsed) \
                and (self.path.parent / "adapter_config.json").is_file():
            log.warning("%s has no alpha keys: merging at scale 1; the lora_alpha in adapter_config.json beside it "
                        "is not read", self.name)
        log.debug("read LoRA %s: %s format, %d keys, %d targets", self.path, self.format, self.num_keys,
                  len(self._plan))

    # ------------------------------------------------------------------ parsing

    def _build_plan(self, parsed: list[LoraKey]) -> dict[str, list[_Term]]:
        problems: list[str] = []
        pairs: dict[str, dict[str, str]] = {}  # target -> {down|up|alpha: key}
        plan: dict[str, list[_Term]] = {}
        diff_roles: dict[tuple[str, str], str] = {}
        for k in parsed:
            t = self._tensors[k.key]
            if k.role != "alpha" and not t.is_floating_point():
                problems.append(f"{k.key} is {t.dtype}, not a float tensor")
                continue
            if k.role in ("down", "up", "alpha"):
                slot = pairs.setdefault(k.target, {})
                if k.role in slot:
                    problems.append(f"{slot[k.role]} and {k.key} are the same {k.role} of {k.target}")
                slot[k.role] = k.key
            else:
                if (k.target, k.role) in diff_roles:
                    problems.append(f"{diff_roles[k.target, k.role]} and {k.key} both are {k.role} of {k.target}")
                diff_roles[k.target, k.role] = k.key
                plan.setdefault(k.target, []).append(_Term(keys=(k.key,), diff=k.key))
        for target, slot in pairs.items():
            down, up, alpha = slot.get("down"), slot.get("up"), slot.get("alpha")
            if down is None or up is None:
                have = down or up or alpha
                problems.append(f"{have} has no matching {'lora_down/lora_A' if down is None else 'lora_up/lora_B'}")
                continue
            d, u = self._tensors[down], self._tensors[up]
            if d.ndim < 2 or u.ndim < 2:
                problems.append(f"{down} {list(d.shape)} / {up} {list(u.shape)} are not matrices")
                continue
            rank = d.shape[0]
            if u.numel() != u.shape[0] * rank:
                problems.append(f"rank mismatch: {down} {list(d.shape)} vs {up} {list(u.shape)}")
                continue
            coef = 1.0
            if alpha is not None:
                a = self._tensors[alpha]
                if a.numel() != 1:
                    problems.append(f"{alpha} has shape {list(a.shape)}; alpha must be one number")
                    continue
                coef = float(a.double().item()) / rank
            keys = tuple(k for k in (down, up, alpha) if k is not None)
            plan.setdefault(target, []).insert(0, _Term(keys=keys, up=up, down=down, coef=coef))
        if problems:
            raise LoraError(f"LoRA file {self.path} is inconsistent: {'; '.join(problems[:3])}{_more(problems, 3)}")
        return plan

    # ------------------------------------------------------------------ public API

    @property
    def targets(self) -> frozenset[str]:
        """Official parameter names this LoRA changes."""
        return frozenset(self._plan)

    def _shape_problems(self, target: str, shape: tuple) -> list[str]:
        shape = tuple(shape)
        problems = []
        for term in self._plan[target]:
            if term.diff is not None:
                diff = self._tensors[term.diff]
                squeeze = [n for n in diff.shape if n != 1] == [n for n in shape if n != 1]
                if tuple(diff.shape) != shape and not squeeze:
                    problems.append(f"{term.diff} {list(diff.shape)} vs model {target} {list(shape)}")
            else:
                out, inner = self._tensors[term.up].shape[0], math.prod(self._tensors[term.down].shape[1:])
                if not shape or out != shape[0] or inner != math.prod(shape[1:]):
                    problems.append(f"{term.down}: LoRA gives [{out}, {inner}], model {target} is {list(shape)}")
        return problems

    def check(self, shapes: dict) -> None:
        """Raise LoraError (one line) unless every target exists in `shapes` ({name: shape}) with a fitting shape."""
        missing = [t for t in self._plan if t not in shapes]
        if len(missing) == len(self._plan):
            raise LoraError(f"LoRA file {self.path} ({self.format} format) matches nothing in the model: none of its "
                            f"{len(missing)} targets exist, e.g. {', '.join(sorted(missing)[:3])}; is it a LoRA "
                            "for another model?")
        problems = [f"{self._plan[t][0].keys[0]} targets {t}, which the model does not have" for t in missing]
        bad_shape = [p for t in self._plan if t in shapes for p in self._shape_problems(t, shapes[t])]
        problems += bad_shape
        if problems:
            hint = " (a LoRA made for another model size?)" if bad_shape else ""
            raise LoraError(f"LoRA file {self.path} does not fit the model: {'; '.join(problems[:3])}"
                            f"{_more(problems, 3)}{hint}")

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The merged float32 weight for parameter `name`, on `weight`'s device (the caller casts it).

        Untargeted names, and every name at strength 0, get `weight` itself back (same object, unchanged).
        `weight` is never modified in place.
        """
        terms = self._plan.get(name)
        if terms is None:
            return weight
        self._applied.add(name)
        if self.strength == 0.0:
            return weight
        problems = self._shape_problems(name, tuple(weight.shape))
        if problems:
            raise LoraError(f"LoRA file {self.path} does not fit the model: {problems[0]}")
        shape, device = weight.shape, weight.device
        out = weight.to(torch.float32)  # may alias `weight`: every update below is out of place
        with _ieee_fp32_matmul(device):
            for term in terms:
                if term.diff is not None:
                    diff = self._tensors[term.diff].to(device=device, dtype=torch.float32).reshape(shape)
                    out = torch.add(out, diff, alpha=self.strength)
                else:
                    up = self._tensors[term.up].to(device=device, dtype=torch.float32)
                    down = self._tensors[term.down].to(device=device, dtype=torch.float32)
                    out = torch.addmm(out.reshape(shape[0], -1), up.reshape(up.shape[0], -1),
                                      down.reshape(down.shape[0], -1), alpha=self.strength * term.coef)
                    out = out.reshape(shape)
        return out

    def summary(self) -> str:
        """One line for the log: file, format, keys applied / keys in the file, weights changed, strength."""
        applied = sum(len(term.keys) for t in self._applied for term in self._plan[t])
        return (f"{self.name}: {self.format} format, {applied}/{self.num_keys} keys applied to "
                f"{len(self._applied)} weights, strength {self.strength}")

    def __repr__(self) -> str:
        return f"LoraMerge({str(self.path)!r}, strength={self.strength})"


def merge_lora_(model: torch.nn.Module, path, strength: float = 1.0) -> str:
    """Merge a LoRA file into an already-built model, in place, one parameter at a time; returns the summary."""
    lora = LoraMerge(path, strength)
    params = dict(model.named_parameters())
    lora.check({name: tuple(p.shape) for name, p in params.items()})
    meta = [name for name in lora.targets if params[name].is_meta]
    if meta:
        raise LoraError(f"cannot merge {path}: {meta[0]} is on the meta device (load the weights first)")
    with torch.no_grad():
        for name in sorted(lora.targets):
            p = params[name]
            w = p.float()  # p itself when p is float32
            merged = lora.apply(name, w)
            if merged is not w:  # same object back: strength 0, nothing to write
                p.copy_(merged.to(p.dtype))
    summary = lora.summary()
    log.info("merged LoRA %s", summary)
    return summary
