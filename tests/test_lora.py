"""LoRA merging (wan/lora.py) on the tiny DiT: every key format vs the formula computed here in float64, and the
one-line errors for bad files. Reference formula: W + strength * (alpha / rank) * up @ down, + strength * diff."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from wan.errors import CheckpointError
from wan.lora import LoraError, LoraMerge, merge_lora_
from wan.testing.tiny import build_tiny_dit

RANK = 4
BLOCK_LINEARS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
MODULES = [f"blocks.{i}.{m}" for i in range(2) for m in BLOCK_LINEARS] + [
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1", "head.head"]

# official -> diffusers names, written out here independently of wan/lora_keys.py
TO_DIFFUSERS_BLOCK = {
    **{f"self_attn.{p}": f"attn1.{d}" for p, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"cross_attn.{p}": f"attn2.{d}" for p, d in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
TO_DIFFUSERS_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
}


def to_diffusers(module):
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"blocks.{i}.{TO_DIFFUSERS_BLOCK[rest]}"
    return TO_DIFFUSERS_TOP[module]


# format -> (module name -> key stem, down suffix, up suffix)
FORMATS = {
    "original": (lambda m: m, ".lora_down.weight", ".lora_up.weight"),
    "original_prefixed": (lambda m: "diffusion_model." + m, ".lora_down.weight", ".lora_up.weight"),
    "peft": (lambda m: m, ".lora_A.weight", ".lora_B.weight"),
    "peft_no_weight": (lambda m: m, ".lora_A", ".lora_B"),
    "peft_prefixed": (lambda m: "base_model.model." + m, ".lora_A.weight", ".lora_B.weight"),
    "diffusers": (lambda m: "transformer." + to_diffusers(m), ".lora_A.weight", ".lora_B.weight"),
    "diffusers_unprefixed": (lambda m: to_diffusers(m), ".lora_A.weight", ".lora_B.weight"),
    "kohya": (lambda m: "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"),
}
LABELS = {"original": "lightning/original", "original_prefixed": "lightning/original", "peft": "peft",
          "peft_no_weight": "peft", "peft_prefixed": "peft", "diffusers": "diffusers",
          "diffusers_unprefixed": "diffusers", "kohya": "kohya/musubi"}


@pytest.fixture(scope="module")
def base_model():
    return build_tiny_dit(1)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def random_lora(model, modules=MODULES, seed=0, rank=RANK, alpha="random"):
    """{module: (down [r, in], up [out, r], alpha float or None)} with non-zero up and down."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for m in modules:
        o, i = params[m + ".weight"].shape
        down = torch.randn(rank, i, generator=g) / i ** 0.5
        up = torch.randn(o, rank, generator=g) * 0.1
        a = None if alpha is None else float(torch.rand((), generator=g) * 15 + 1)
        out[m] = (down, up, a)
    return out


def write_lora(path, lora, fmt="original", dtype=torch.float32, alpha_shape=()):
    stem, dn, un = FORMATS[fmt]
    sd = {}
    for m, (down, up, a) in lora.items():
        sd[stem(m) + dn] = down.to(dtype).contiguous()
        sd[stem(m) + un] = up.to(dtype).contiguous()
        if a is not None:
            sd[stem(m) + ".alpha"] = torch.tensor(a, dtype=dtype).reshape(alpha_shape)
    save_file(sd, str(path))
    return path


def reference(model, lora, strength=1.0, dtype=torch.float32):
    """{param name: float64 merged weight}, the LoRA tensors as stored in `dtype`."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = {}
    for m, (down, up, a) in lora.items():
        d, u = down.to(dtype).double(), up.to(dtype).double()
        scale = 1.0 if a is None else float(torch.tensor(a, dtype=dtype)) / RANK  # alpha as stored in the file
        ref[m + ".weight"] = params[m + ".weight"].double() + strength * scale * (u @ d)
    return ref


def assert_merged(model, base_model, ref):
    params = {k: v.detach() for k, v in model.named_parameters()}
    for name, p in base_model.named_parameters():
        got = params[name]
        if name in ref:
            want = ref[name]
            err = float((got.double() - want).abs().max() / want.abs().max())
            assert err <= 1e-6, (name, float(err))
            assert not torch.equal(got, p), name  # the LoRA really changed it
        else:
            assert torch.equal(got, p), name


def assert_one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, CheckpointError) and isinstance(excinfo.value, ValueError)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ---------------------------------------------------------------- formats

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_matches_formula(fmt, model, base_model, tmp_path):
    lora = random_lora(base_model)
    path = write_lora(tmp_path / "lora.safetensors", lora, fmt)
    summary = merge_lora_(model, path)
    assert_merged(model, base_model, reference(base_model, lora))
    n = len(MODULES)
    assert summary == (f"lora.safetensors: {LABELS[fmt]} format, {3 * n}/{3 * n} keys applied to {n} weights, "
                       "strength 1.0")


def test_all_formats_give_identical_weights(base_model, tmp_path):
    lora = random_lora(base_model)
    results = {}
    for fmt in FORMATS:
        m = copy.deepcopy(base_model)
        merge_lora_(m, write_lora(tmp_path / f"{fmt}.safetensors", lora, fmt))
        results[fmt] = m.state_dict()
    first = results["original"]
    for fmt, sd in results.items():
        assert all(torch.equal(first[k], sd[k]) for k in first), fmt


def test_targets_and_meta_shapes(base_model, tmp_path):
    from wan.configs.model_config import TINY
    from wan.modules.model import WanModel

    lora = LoraMerge(write_lora(tmp_path / "l.safetensors", random_lora(base_model), "diffusers"))
    assert lora.targets == {m + ".weight" for m in MODULES}
    with torch.device("meta"):
        meta = WanModel.from_config(TINY)
    lora.check({k: tuple(v.shape) for k, v in meta.state_dict().items()})  # passes without real weights
    assert lora.summary().endswith("0/78 keys applied to 0 weights, strength 1.0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(dtype, model, base_model, tmp_path):
    lora = random_lora(base_model, seed=3)
    merge_lora_(model, write_lora(tmp_path / "half.safetensors", lora, "original_prefixed", dtype=dtype))
    assert_merged(model, base_model, reference(base_model, lora, dtype=dtype))


@pytest.mark.parametrize("alpha_shape", [(), (1,)])
def test_alpha_tensor_shapes(alpha_shape, model, base_model, tmp_path):
    lora = random_lora(base_model, seed=4)
    merge_lora_(model, write_lora(tmp_path / "a.safetensors", lora, alpha_shape=alpha_shape))
    assert_merged(model, base_model, reference(base_model, lora))


def test_alpha_missing_means_scale_one(model, base_model, tmp_path):
    lora = random_lora(base_model, seed=5, alpha=None)
    summary = merge_lora_(model, write_lora(tmp_path / "noalpha.safetensors", lora, "original"))
    assert_merged(model, base_model, reference(base_model, lora))
    assert "52/52 keys" in summary


@pytest.mark.parametrize("strength", [0.5, -1.0, 2.5])
def test_strength_scales_the_delta(strength, model, base_model, tmp_path):
    lora = random_lora(base_model, seed=6)
    summary = merge_lora_(model, write_lora(tmp_path / "s.safetensors", lora, "kohya"), strength=strength)
    assert_merged(model, base_model, reference(base_model, lora, strength=strength))
    assert summary.endswith(f"strength {strength}")


def test_strength_zero_and_zero_up_are_bit_identical(model, base_model, tmp_path):
    lora = random_lora(base_model, seed=7)
    path = write_lora(tmp_path / "z.safetensors", lora)
    merge_lora_(model, path, strength=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base_model.state_dict().values()))
    zero_up = {m: (d, torch.zeros_like(u), a) for m, (d, u, a) in lora.items()}
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(base_model).to(dtype)
        before = copy.deepcopy(m.state_dict())
        merge_lora_(m, write_lora(tmp_path / "zu.safetensors", zero_up))
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        merge_lora_(m, path, strength=0.0)
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_diff_extras(model, base_model, tmp_path):
    g = torch.Generator().manual_seed(8)
    params = {k: v.detach() for k, v in base_model.named_parameters()}
    lora = random_lora(base_model, modules=["blocks.0.self_attn.q", "head.head"], seed=9)
    write_lora(tmp_path / "pairs.safetensors", lora, "original_prefixed")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "pairs.safetensors"))
    diffs = {  # key -> official target
        "blocks.0.self_attn.q.diff": "blocks.0.self_attn.q.weight",  # also has a LoRA pair
        "blocks.0.self_attn.q.diff_b": "blocks.0.self_attn.q.bias",
        "blocks.1.diff_m": "blocks.1.modulation",
        "blocks.0.norm3.diff": "blocks.0.norm3.weight",
        "blocks.0.norm3.diff_b": "blocks.0.norm3.bias",
        "blocks.1.cross_attn.norm_k.diff": "blocks.1.cross_attn.norm_k.weight",
        "head.head.diff": "head.head.weight",
        "head.head.diff_b": "head.head.bias",
    }
    for key, target in diffs.items():
        sd["diffusion_model." + key] = torch.randn(params[target].shape, generator=g) * 0.01
    save_file(sd, str(tmp_path / "distill.safetensors"))
    strength = 0.75
    summary = merge_lora_(model, tmp_path / "distill.safetensors", strength=strength)
    ref = reference(base_model, lora, strength=strength)
    for key, target in diffs.items():
        ref[target] = ref.get(target, params[target].double()) + strength * sd["diffusion_model." + key].double()
    assert_merged(model, base_model, ref)
    assert summary == ("distill.safetensors: lightning/original + diff format, 14/14 keys applied to 8 weights, "
                       "strength 0.75")


def test_diffusers_extras(model, base_model, tmp_path):
    g = torch.Generator().manual_seed(10)
    params = {k: v.detach() for k, v in base_model.named_parameters()}
    extras = {  # diffusers key -> official target
        "transformer.blocks.0.attn1.to_q.lora_B.bias": "blocks.0.self_attn.q.bias",  # acts like diff_b
        "transformer.proj_out.lora_B.bias": "head.head.bias",
        "transformer.blocks.1.norm2.diff": "blocks.1.norm3.weight",
        "transformer.blocks.1.scale_shift_table.diff": "blocks.1.modulation",
        "transformer.scale_shift_table.diff": "head.modulation",
        "transformer.blocks.0.attn2.norm_q.diff": "blocks.0.cross_attn.norm_q.weight",
    }
    sd = {k: torch.randn(params[t].shape, generator=g) * 0.01 for k, t in extras.items()}
    save_file(sd, str(tmp_path / "d.safetensors"))
    merge_lora_(model, tmp_path / "d.safetensors")
    ref = {t: params[t].double() + sd[k].double() for k, t in extras.items()}
    assert_merged(model, base_model, ref)


def test_torch_pickle_file(model, base_model, tmp_path):
    lora = random_lora(base_model, seed=11)
    write_lora(tmp_path / "l.safetensors", lora)
    from safetensors.torch import load_file

    torch.save(load_file(str(tmp_path / "l.safetensors")), tmp_path / "l.pt")
    merge_lora_(model, tmp_path / "l.pt")
    assert_merged(model, base_model, reference(base_model, lora))


# ---------------------------------------------------------------- apply() contract

def test_apply_untargeted_and_no_inplace(base_model, tmp_path):
    lora = LoraMerge(write_lora(tmp_path / "l.safetensors", random_lora(base_model, seed=12)))
    w = base_model.blocks[0].norm3.weight.detach()
    assert lora.apply("blocks.0.norm3.weight", w) is w
    q = base_model.blocks[0].self_attn.q.weight.detach()
    before = q.clone()
    merged = lora.apply("blocks.0.self_attn.q.weight", q)
    assert merged is not q and torch.equal(q, before) and merged.dtype == torch.float32
    zero = LoraMerge(tmp_path / "l.safetensors", strength=0)
    assert zero.apply("blocks.0.self_attn.q.weight", q) is q


def test_merge_is_float32_into_bf16_model(base_model, tmp_path):
    lora = random_lora(base_model, seed=13)
    path = write_lora(tmp_path / "l.safetensors", lora)
    m = copy.deepcopy(base_model).to(torch.bfloat16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    merge_lora_(m, path)
    sd = m.state_dict()
    merger = LoraMerge(path)
    n = off_fp32 = off_bf16 = 0
    for mod, (down, up, a) in lora.items():
        name = mod + ".weight"
        # the contract: bf16(fp32(W) + delta), W being the bf16 weight upcast
        assert torch.equal(sd[name], merger.apply(name, before[name].float()).to(torch.bfloat16))
        want = (before[name].double() + (a / RANK) * (up.double() @ down.double())).to(torch.bfloat16)
        bf16_math = before[name] + ((a / RANK) * (up @ down)).to(torch.bfloat16)  # a merge in bf16 arithmetic
        n += want.numel()
        off_fp32 += int((sd[name] != want).sum())  # only where fp32 rounding straddles a bf16 rounding midpoint
        off_bf16 += int((bf16_math != want).sum())
    assert off_fp32 <= 1e-3 * n and off_bf16 >= 1e-2 * n, (off_fp32, off_bf16, n)


def test_loader_style_per_tensor_apply_equals_merge(base_model, tmp_path):
    path = write_lora(tmp_path / "l.safetensors", random_lora(base_model, seed=14), "diffusers")
    lora = LoraMerge(path, strength=0.8)
    lora.check({k: v.shape for k, v in base_model.state_dict().items()})
    loaded = {k: lora.apply(k, v.float()).to(torch.bfloat16) for k, v in base_model.state_dict().items()}
    m = copy.deepcopy(base_model)  # an fp32 checkpoint: merge, then cast (as a loader that casts once would)
    merge_lora_(m, path, strength=0.8)
    m.to(torch.bfloat16)
    assert all(torch.equal(loaded[k], v) for k, v in m.state_dict().items())
    assert lora.summary() == "l.safetensors: diffusers format, 78/78 keys applied to 26 weights, strength 0.8"


# ---------------------------------------------------------------- bad files

def test_missing_file_and_folder(model, tmp_path):
    with pytest.raises(LoraError) as e:
        merge_lora_(model, tmp_path / "nope.safetensors")
    assert "does not exist" in assert_one_line_error(e, tmp_path / "nope.safetensors")
    with pytest.raises(LoraError) as e:
        LoraMerge(tmp_path)
    assert "folder" in assert_one_line_error(e, tmp_path)


def test_corrupt_and_truncated_files(base_model, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(LoraError) as e:
        LoraMerge(junk)
    assert "cannot read" in assert_one_line_error(e, junk)
    good = write_lora(tmp_path / "good.safetensors", random_lora(base_model))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoraError) as e:
        LoraMerge(cut)
    assert "cannot read" in assert_one_line_error(e, cut)
    pt = tmp_path / "junk.pt"
    pt.write_bytes(b"not a pickle at all\n" * 10)
    with pytest.raises(LoraError) as e:
        LoraMerge(pt)
    assert_one_line_error(e, pt)
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(LoraError) as e:
        LoraMerge(empty)
    assert "no tensors" in assert_one_line_error(e, empty)


def test_lora_for_wider_model(model, tmp_path):
    wide = build_tiny_dit(1).requires_grad_(False)
    for name, p in list(wide.named_parameters()):  # a stand-in with dim 128 shapes
        if name.endswith(".weight") and p.ndim == 2:
            setattr_path(wide, name, torch.nn.Parameter(torch.zeros(p.shape[0] * 2, p.shape[1] * 2)))
    path = write_lora(tmp_path / "wide.safetensors", random_lora(wide, modules=MODULES[:4]))
    with pytest.raises(LoraError) as e:
        merge_lora_(model, path)
    msg = assert_one_line_error(e, path)
    assert "does not fit" in msg and "[128, 128]" in msg and "another model size" in msg
    with pytest.raises(LoraError):  # apply() checks too, when check() was skipped
        LoraMerge(path).apply("blocks.0.self_attn.q.weight", model.blocks[0].self_attn.q.weight)


def setattr_path(root, name, value):
    *parents, leaf = name.split(".")
    for p in parents:
        root = getattr(root, p)
    setattr(root, leaf, value)


def test_unknown_module_and_extra_blocks(model, base_model, tmp_path):
    lora = random_lora(base_model, modules=MODULES[:2])
    path = write_lora(tmp_path / "u.safetensors", lora)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd["blocks.0.self_attn.qkv.lora_down.weight"] = torch.randn(RANK, 64)
    sd["blocks.0.self_attn.qkv.lora_up.weight"] = torch.randn(192, RANK)
    sd["blocks.7.ffn.0.diff_b"] = torch.randn(128)
    save_file(sd, str(path))
    with pytest.raises(LoraError) as e:
        merge_lora_(model, path)
    msg = assert_one_line_error(e, path)
    assert "blocks.0.self_attn.qkv.weight" in msg and "blocks.7.ffn.0.bias" in msg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base_model.state_dict().values()))
    kohya = tmp_path / "k.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_qkv.lora_down.weight": torch.randn(RANK, 64),
               "lora_unet_blocks_0_self_attn_qkv.lora_up.weight": torch.randn(192, RANK)}, str(kohya))
    with pytest.raises(LoraError) as e:
        LoraMerge(kohya)
    assert "lora_unet_blocks_0_self_attn_qkv" in assert_one_line_error(e, kohya)


def test_keys_of_no_known_format(base_model, tmp_path):
    path = write_lora(tmp_path / "x.safetensors", random_lora(base_model, modules=MODULES[:1]))
    from safetensors.torch import load_file

    sd = load_file(str(path))
    sd["blocks.0.self_attn.q.lora_magnitude_vector"] = torch.randn(64)  # DoRA: not supported, not ignored
    save_file(sd, str(path))
    with pytest.raises(LoraError) as e:
        LoraMerge(path)
    assert "lora_magnitude_vector" in assert_one_line_error(e, path)
    full = tmp_path / "full.safetensors"  # a model checkpoint instead of a LoRA
    save_file({k: v.contiguous() for k, v in list(base_model.state_dict().items())[:6]}, str(full))
    with pytest.raises(LoraError) as e:
        LoraMerge(full)
    assert "not a LoRA" in assert_one_line_error(e, full)


def test_nothing_matched(model, tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(RANK, 64),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(192, RANK)}, str(path))
    with pytest.raises(LoraError) as e:
        merge_lora_(model, path)
    assert "matches nothing" in assert_one_line_error(e, path)


def test_inconsistent_pairs(base_model, tmp_path):
    lora = random_lora(base_model, modules=MODULES[:2])
    path = write_lora(tmp_path / "p.safetensors", lora)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    del sd["blocks.0.self_attn.k.lora_up.weight"]
    save_file(sd, str(path))
    with pytest.raises(LoraError) as e:
        LoraMerge(path)
    assert "blocks.0.self_attn.k.lora_down.weight has no matching" in assert_one_line_error(e, path)
    sd = load_file(str(write_lora(tmp_path / "dup.safetensors", lora)))
    sd["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = sd["blocks.0.self_attn.q.lora_down.weight"].clone()
    save_file(sd, str(tmp_path / "dup.safetensors"))
    with pytest.raises(LoraError) as e:
        LoraMerge(tmp_path / "dup.safetensors")
    assert "same down" in assert_one_line_error(e, tmp_path / "dup.safetensors")


def test_bad_strength(tmp_path):
    with pytest.raises(ValueError, match="strength"):
        LoraMerge(tmp_path / "x.safetensors", strength=float("nan"))
