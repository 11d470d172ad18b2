"""Which files hold each component, from `--ckpt_dir` and the per-component paths, planned from headers only.

    --ckpt_dir DIR        the official folder (high_noise_model/, low_noise_model/, models_t5_...pth, Wan2.1_VAE.pth,
                          google/umt5-xxl/; TI2V-5B: its one DiT at the folder root and Wan2.2_VAE.pth) or a Diffusers
                          folder (model_index.json, transformer/ = high-noise, transformer_2/ = low-noise,
                          text_encoder/, vae/, tokenizer/; TI2V-5B: transformer/ alone, its vae/ the Wan 2.2 VAE)
    --dit_high, --dit_low one expert each (the A14B tasks): a single file (ComfyUI / Kijai safetensors, fp16, bf16,
                          fp8_scaled; GGUF) or a folder (official expert folder, Diffusers transformer/)
    --dit                 the DiT of a one-model task (TI2V-5B), in the same layouts
    --t5, --vae           a single file (.pth, .safetensors) or a Diffusers text_encoder/ / vae/ folder (the VAE the
                          task's config names: Wan 2.1, or Wan 2.2 for TI2V-5B)
    --tokenizer           the tokenizer folder; from --ckpt_dir when it has one

Each task takes its own DiT flags (a one-model task refuses --dit_high / --dit_low, a two-expert one --dit) and its
own VAE (a Wan 2.1 VAE given to TI2V-5B, or a Wan 2.2 one to an A14B task, is refused from its first convolution).

A path given per component wins over the folder's. `resolve_weights` reads every header, plans every key and checks
every shape against the task's architecture before anything is loaded; errors are one line naming the file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

from ..configs.model_config import TI2V_5B, WanConfig
from ..errors import CheckpointError
from ..preflight import DOWNLOAD_HINT, PathError, check_expert_dir, check_tokenizer_dir, read_safetensors_header
from .headers import FileHeader, read_header
from .source import WeightSource, check_shapes, plan_source

log = logging.getLogger("wan")
TI2V_CHANNELS = TI2V_5B.out_dim  # 48: the Wan 2.2 VAE's latent channels

__all__ = ["WeightPaths", "ResolvedWeights", "resolve_weights", "dit_source", "t5_source", "vae_source",
           "dit_config_from_diffusers", "dit_shapes"]

DIFFUSERS_DIRS = {"high": "transformer", "low": "transformer_2", "t5": "text_encoder", "vae": "vae",
                  "tokenizer": "tokenizer"}
DIFFUSERS_ONE_MODEL = {"model": "transformer", "t5": "text_encoder", "vae": "vae", "tokenizer": "tokenizer"}
WHAT = {"high": "the high-noise DiT", "low": "the low-noise DiT", "model": "the DiT", "t5": "the T5 text encoder",
        "vae": "the VAE"}
DIT_FLAGS = {"high": "dit_high", "low": "dit_low", "model": "dit"}  # DiT name in the loop -> its WeightPaths field


@dataclass(frozen=True)
class WeightPaths:
    """Per-component paths (None: from --ckpt_dir). `dit` is for a one-model task."""
    dit_high: str | None = None
    dit_low: str | None = None
    dit: str | None = None
    t5: str | None = None
    vae: str | None = None
    tokenizer: str | None = None

    def given(self) -> dict[str, Path]:
        return {f.name: Path(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}

    def complete(self, config=None) -> bool:
        """Every component given (no folder needed): of a two-expert task, or of `config`'s task (a TaskConfig; a
        one-model task needs `dit` instead of the two experts)."""
        dits = ("dit",) if config is not None and config.boundary is None else ("dit_high", "dit_low")
        return all(getattr(self, f) is not None for f in (*dits, "t5", "vae", "tokenizer"))


@dataclass
class ResolvedWeights:
    folder: str  # the --ckpt_dir layout: "official", "diffusers" or "none"
    high: WeightSource | None  # the A14B experts (None for a one-model task)
    low: WeightSource | None
    t5: WeightSource
    vae: WeightSource
    tokenizer: Path
    model: WeightSource | None = None  # the DiT of a one-model task (TI2V-5B)

    @property
    def dits(self) -> dict[str, WeightSource]:
        """The DiTs by the name the sample loop uses: {"high", "low"}, or {"model"}."""
        return {"model": self.model} if self.model is not None else {"high": self.high, "low": self.low}

    def describe(self) -> list[str]:
        return [s.describe() for s in (*self.dits.values(), self.t5, self.vae)] + [f"tokenizer: {self.tokenizer}"]


# ---- one component ----------------------------------------------------------------------------------------------
def _shards(folder: Path, index_names: tuple[str, ...], single_names: tuple[str, ...], what: str) -> list[Path]:
    from ..preflight import _read_index

    for name in index_names:
        if (folder / name).is_file():
            shards = _read_index(folder / name)
            missing = [f for f in shards if not (folder / f).is_file()]
            if missing:
                raise FileNotFoundError(f"missing shard {folder / missing[0]} (listed in {name}); the download is "
                                        "incomplete")
            for f, keys in shards.items():
                header = read_safetensors_header(folder / f)
                lacking = [k for k in keys if k not in header]
                if lacking:
                    raise CheckpointError(f"{folder / f} lacks tensor {lacking[0]!r} that {name} places there")
            return [folder / f for f in shards]
    for name in single_names:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder} ({what}) holds no {' or '.join(index_names + single_names)}; the download "
                            "is incomplete")


def dit_config_from_diffusers(raw: dict, path: Path) -> WanConfig:
    """A Diffusers WanTransformer3DModel config.json as the engine's WanConfig. Diffusers records no model type: a
    Wan 2.2 I2V expert is the one whose input has more channels than its output (36 = 16 noise + 4 mask + 16 image
    latent, out 16), TI2V-5B the one on the Wan 2.2 VAE's 48 latent channels (in and out); Wan 2.1's CLIP-conditioned
    I2V (image_dim, added_kv_proj_dim) is not a Wan 2.2 model."""
    if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
        raise CheckpointError(f"{path} has image_dim / added_kv_proj_dim: a Wan 2.1 I2V or FLF2V transformer with CLIP "
                              "image conditioning, which Wan 2.2 does not have; pass a Wan2.2 T2V-A14B or I2V-A14B "
                              "checkpoint")
    try:
        heads = raw["num_attention_heads"]
        model_type = "i2v" if raw["in_channels"] != raw["out_channels"] else (
            "ti2v" if raw["out_channels"] == TI2V_CHANNELS else "t2v")
        return WanConfig(model_type=model_type, patch_size=tuple(raw.get("patch_size", (1, 2, 2))),
                         in_dim=raw["in_channels"], dim=heads * raw["attention_head_dim"], ffn_dim=raw["ffn_dim"],
                         freq_dim=raw["freq_dim"], text_dim=raw["text_dim"], out_dim=raw["out_channels"],
                         num_heads=heads, num_layers=raw["num_layers"], eps=raw.get("eps", 1e-6),
                         qk_norm=bool(raw.get("qk_norm")), cross_attn_norm=bool(raw.get("cross_attn_norm", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a Diffusers WanTransformer3DModel config ({type(exc).__name__}: "
                              f"{exc})") from None


def _read_config(folder: Path, arch: WanConfig | None) -> WanConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raw = None
    if isinstance(raw, dict) and "num_attention_heads" in raw:  # a Diffusers transformer folder
        config = dit_config_from_diffusers(raw, path)
        relevant = [f for f in config.mismatches(arch) if f.split("=")[0] not in WanConfig.IGNORED] if arch else []
        if relevant:
            raise CheckpointError(f"{path} has {', '.join(relevant[:3])} (another model's checkpoint: T2V, I2V, 1.3B "
                                  "or 5B?)")
        return config
    check_expert_dir(folder, arch)  # the official folder's checks: config.json, index, shard headers
    return WanConfig.from_json(path)


def dit_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every DiT parameter's official name and shape for `config` (the model built on meta: no memory)."""
    import torch

    from ..modules.model import WanModel

    with torch.device("meta"):
        model = WanModel.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def dit_source(path, what: str = "the DiT", arch: WanConfig | None = None, target: str = "the DiT") -> WeightSource:
    """Plan one expert: a folder (official or Diffusers, config.json + shards) or one file (safetensors, GGUF).
    Checked against the folder's config, else `arch`."""
    path = Path(path)
    config = None
    if path.is_dir():
        config = _read_config(path, arch)
        files = _shards(path, ("diffusion_pytorch_model.safetensors.index.json",),
                        ("diffusion_pytorch_model.safetensors",), what)
    else:
        files = [path]
    headers = _headers(files, what)
    if headers[0].container == "torch":
        raise CheckpointError(f"{path} ({what}) is a torch pickle; DiT checkpoints come as safetensors or GGUF")
    source = plan_source("dit", what, headers)
    source.config = config or arch
    if source.config is None:
        raise ValueError(f"{path}: a single DiT file needs the task's architecture (arch=...)")
    check_shapes(source, dit_shapes(source.config), target, "match" if config else "fit")
    return source


def t5_source(path, what: str = WHAT["t5"]) -> WeightSource:
    """Plan the umt5 encoder: the official .pth, a safetensors file (official or Hugging Face names: Kijai, ComfyUI)
    or a Diffusers text_encoder/ folder; shapes checked against the umt5 architecture they imply."""
    from ..modules.t5 import check_umt5_shapes

    path = Path(path)
    files = _shards(path, ("model.safetensors.index.json",), ("model.safetensors",), what) if path.is_dir() \
        else [path]
    headers = _headers(files, what)
    if headers[0].container == "gguf":
        raise CheckpointError(f"{path} ({what}) is a GGUF file; GGUF text encoders are not supported here: pass the "
                              "umt5 safetensors or .pth")
    source = plan_source("t5", what, headers)
    check_umt5_shapes(source.shapes(), str(source.where))
    return source


def vae_shapes(base_dim: int, z_dim: int) -> dict[str, tuple[int, ...]]:
    """Every original-named Wan 2.1 VAE key and its shape for base_dim / z_dim (the diffusers model on meta)."""
    from ..modules.vae import build_wan_vae
    from .keys import vae_diffusers_to_official

    inv = vae_diffusers_to_official()
    model = build_wan_vae(base_dim, z_dim, device="meta")
    return {inv[k]: tuple(v.shape) for k, v in model.state_dict().items()}


def vae22_shapes(base_dim: int, decoder_base_dim: int, z_dim: int) -> dict[str, tuple[int, ...]]:
    """Every original-named Wan 2.2 VAE key and its shape for its widths and z_dim (the diffusers model on meta)."""
    from ..modules.vae2_2 import build_wan22_vae
    from ..modules.vae2_2_keys import diffusers_to_official22

    inv = diffusers_to_official22()
    model = build_wan22_vae(base_dim, decoder_base_dim, z_dim, device="meta")
    return {inv[k]: tuple(v.shape) for k, v in model.state_dict().items()}


VAE_VERSIONS = {"2.1": ("vae", "the Wan 2.1 VAE", 3, 16), "2.2": ("vae22", "the Wan 2.2 VAE", 12, 48)}
# version -> (key-map component, name, encoder.conv1's input channels: RGB, or RGB patchified 2x2; latent channels)


def vae_source(path, what: str = WHAT["vae"], version: str = "2.1") -> WeightSource:
    """Plan the task's VAE (`version` "2.1", or "2.2" for TI2V-5B): the official .pth, a safetensors file (official
    names: ComfyUI, Kijai) or a Diffusers vae/ folder; shapes checked against the architecture its first and last
    convolutions imply. A VAE of the other version is refused in one line from encoder.conv1's input channels."""
    component, name, rgb_in, z_dim = VAE_VERSIONS[version]
    path = Path(path)
    files = _shards(path, ("diffusion_pytorch_model.safetensors.index.json",),
                    ("diffusion_pytorch_model.safetensors",), what) if path.is_dir() else [path]
    headers = _headers(files, what)
    if headers[0].container == "gguf":
        raise CheckpointError(f"{path} ({what}) is a GGUF file; pass the VAE's .pth or safetensors")
    source = plan_source(component, what, headers)
    conv1, conv2 = source.plans.get("encoder.conv1.weight"), source.plans.get("conv2.weight")
    if conv1 is None or conv2 is None or len(conv1.shape) != 5:
        raise CheckpointError(f"{source.where} ({what}) is not {name} (no 5-D encoder.conv1.weight / conv2.weight)")
    if conv1.shape[1] != rgb_in or conv2.shape[0] != z_dim:
        other = [v for v, (_, _, c, z) in VAE_VERSIONS.items() if (c, z) == (conv1.shape[1], conv2.shape[0])]
        kind = f"a Wan {other[0]} VAE" if other else "another VAE"
        raise CheckpointError(f"{source.where} ({what}) is {kind} (encoder.conv1 takes {conv1.shape[1]} channels, "
                              f"{conv2.shape[0]} latent channels); this task needs {name} ({rgb_in} and {z_dim})"
                              + ("; TI2V-5B's is Wan2.2_VAE.pth" if version == "2.2" else
                                 "; the A14B tasks' is Wan2.1_VAE.pth"))
    if version == "2.2":
        dec = source.plans.get("decoder.conv1.weight")
        dec_dim = dec.shape[0] // 4 if dec is not None else conv1.shape[0]
        expected = vae22_shapes(conv1.shape[0], dec_dim, conv2.shape[0])
    else:
        expected = vae_shapes(conv1.shape[0], conv2.shape[0])
    check_shapes(source, expected, name)
    return source


def _headers(files: list[Path], what: str) -> tuple[FileHeader, ...]:
    headers = tuple(read_header(f, what) for f in files)
    kinds = {h.container for h in headers}
    if len(kinds) > 1:
        raise CheckpointError(f"{files[0].parent} ({what}) mixes {' and '.join(sorted(kinds))} files")
    return headers


# ---- the whole checkpoint ---------------------------------------------------------------------------------------
def _check_path(flag: str, path: Path) -> None:
    if not path.exists():
        raise PathError(f"{flag} {path} does not exist")


def _folder_layout(config, ckpt: Path) -> tuple[str, dict[str, Path]]:
    if not ckpt.exists():
        raise PathError(f"--ckpt_dir {ckpt} does not exist; {DOWNLOAD_HINT}")
    if not ckpt.is_dir():
        flags = "--dit" if config.boundary is None else "--dit_high, --dit_low"
        raise PathError(f"--ckpt_dir {ckpt} is not a directory (per-component files go to {flags}, --t5, --vae)")
    official = {name: ckpt / sub for name, sub in config.experts.items()}  # "" (TI2V-5B): the folder root
    official |= {"t5": ckpt / config.t5_checkpoint, "vae": ckpt / config.vae_checkpoint,
                 "tokenizer": ckpt / config.t5_tokenizer}
    # what shows the official layout is there (a DiT at the root shows by its config.json)
    markers = [ckpt / "config.json" if p == ckpt else p for p in official.values()]
    if (ckpt / "model_index.json").is_file():
        present = [str(p.relative_to(ckpt)) for p in markers if p.exists()]
        if present:
            raise CheckpointError(f"{ckpt} mixes a Diffusers layout (model_index.json) with the official one "
                                  f"({present[0]}); pass one layout per --ckpt_dir")
        if config.boundary is None:
            if (ckpt / DIFFUSERS_DIRS["low"]).is_dir():
                raise CheckpointError(f"{ckpt} is a two-expert Diffusers folder (transformer_2/, an A14B model); "
                                      f"{config.name} has one DiT: pass the Wan2.2-TI2V-5B-Diffusers folder")
            return "diffusers", {k: ckpt / v for k, v in DIFFUSERS_ONE_MODEL.items()}
        return "diffusers", {k: ckpt / v for k, v in DIFFUSERS_DIRS.items()}
    diffusers = [d for d in DIFFUSERS_DIRS.values() if d != "vae" and (ckpt / d).is_dir()]
    if diffusers and any(p.exists() for p in markers):
        raise CheckpointError(f"{ckpt} mixes the official layout with Diffusers folders ({diffusers[0]}/) and has "
                              "no model_index.json; pass one layout per --ckpt_dir")
    if diffusers:
        raise CheckpointError(f"{ckpt} has Diffusers folders ({diffusers[0]}/) but no model_index.json; the "
                              "download is incomplete")
    return "official", official


def dit_flags_problem(config, given) -> str | None:
    """One line if the DiT files given (names of WeightPaths fields) do not fit the task's models, else None: a
    one-model task (TI2V-5B) takes `dit`, the two-expert tasks `dit_high` and `dit_low`."""
    one_model = config.boundary is None
    wrong = [f for f in (("dit_high", "dit_low") if one_model else ("dit",)) if f in given]
    if wrong and one_model:
        return (f"--{wrong[0]}: {config.name} has one DiT; pass it with --dit FILE (--dit_high and --dit_low are for "
                "the two-expert A14B tasks)")
    if wrong:
        return f"{config.name} has two experts: pass --dit_high FILE and --dit_low FILE (--dit is for one-model tasks)"
    return None


def resolve_weights(config, ckpt_dir=None, paths: WeightPaths | None = None) -> ResolvedWeights:
    """Plan every component of a task (`config` a TaskConfig: two experts, or one model for TI2V-5B) from headers;
    nothing is loaded."""
    given = (paths or WeightPaths()).given()
    problem = dit_flags_problem(config, given)
    if problem:
        raise PathError(problem)
    one_model = config.boundary is None
    for name, p in given.items():
        _check_path(f"--{name}", p)
    folder, defaults = ("none", {}) if ckpt_dir is None else _folder_layout(config, Path(ckpt_dir))
    dits = list(config.experts)  # ["high", "low"] or ["model"]
    where = {k: given.get(DIT_FLAGS[k]) for k in dits}
    where |= {"t5": given.get("t5"), "vae": given.get("vae"), "tokenizer": given.get("tokenizer")}
    missing = [k for k, v in where.items() if v is None and k not in defaults]
    if missing:
        flags = {"high": "--dit_high FILE", "low": "--dit_low FILE", "model": "--dit FILE", "t5": "--t5 FILE",
                 "vae": "--vae FILE",
                 "tokenizer": "--tokenizer DIR (the google/umt5-xxl folder of the official download, or tokenizer/ "
                              "of the Diffusers one)"}
        raise PathError("without --ckpt_dir every component needs its path: pass "
                        + ", ".join(flags[k] for k in missing))
    for k, default in defaults.items():
        if where[k] is None:
            if folder == "diffusers" and not default.exists():
                raise FileNotFoundError(f"the Diffusers-format folder {ckpt_dir} lacks {default.name}/ "
                                        f"({WHAT.get(k, 'the tokenizer')}); the download is incomplete or it is a "
                                        f"{'two-expert (A14B)' if one_model else 'one-model (5B)'} folder")
            where[k] = default
    from ..preflight import check_torch_file

    if folder == "official" and "t5" not in given:
        check_torch_file(where["t5"], "the T5 text encoder", config.checkpoint_name)
    if folder == "official" and "vae" not in given:
        check_torch_file(where["vae"], "the VAE", config.checkpoint_name)
    if folder != "official" or "tokenizer" in given:
        if not where["tokenizer"].is_dir():
            raise PathError(f"--tokenizer {where['tokenizer']} is not a folder (the tokenizer folder: "
                            "google/umt5-xxl/ of the official download, tokenizer/ of the Diffusers one)")
    check_tokenizer_dir(where["tokenizer"])
    target = f"the {config.name} DiT"
    sources = {k: dit_source(where[k], WHAT[k], config.arch, target) for k in dits}
    t5, vae = t5_source(where["t5"]), vae_source(where["vae"], WHAT["vae"], config.vae_version)
    if one_model:
        return ResolvedWeights(folder, None, None, t5, vae, where["tokenizer"], model=sources["model"])
    return ResolvedWeights(folder, sources["high"], sources["low"], t5, vae, where["tokenizer"])
