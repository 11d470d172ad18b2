"""The torch ports of the gguf package's dequantization (wan.formats.quant.TORCH_PORTS) are bit for bit equal to
`gguf.quants.dequantize` (float32, compared as int32 bit patterns: -0.0 vs 0.0 counts): on random raw blocks, where
every bit pattern of the packed fields occurs and the fp16 scales are random finite fp16 values (subnormals,
negatives and zeros included). Why no order of operations can change a bit (every product is exact in fp32) is shown
on the same blocks, and that fp16 arithmetic (ComfyUI-GGUF's default) does change them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wan.formats import quant as Q

gguf = pytest.importorskip("gguf")

# byte offsets of each type's fp16 fields (d, and m / dmin where the type has one)
FP16_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
           "Q6_K": (208,)}
BLOCKS = (1, 3, 16, 17, 250)  # the package works in groups of 16 rows: fewer, exactly, more, uneven


def qtype(name: str):
    return getattr(gguf.GGMLQuantizationType, name)


def random_blocks(name: str, n: int, seed: int = 0) -> np.ndarray:
    """n raw blocks of `name`: random bytes, the fp16 fields random finite fp16 values (an exponent of all ones, NaN
    or Inf, made finite by clearing its top bit)."""
    size = Q.TORCH_PORTS[name][0]
    rng = np.random.default_rng([seed, n, size])
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for at in FP16_AT[name]:
        bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)
        raw[:, at:at + 2] = bits.view(np.uint8).reshape(n, 2)
    assert np.isfinite(raw[:, FP16_AT[name][0]:FP16_AT[name][0] + 2].copy().view(np.float16)).all()
    return raw


def same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    b = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    return a.dtype == torch.float32 and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_ports_match_the_package_block_sizes():
    for name, (size, _) in Q.TORCH_PORTS.items():
        assert gguf.GGML_QUANT_SIZES[qtype(name)][1] == size, name
        assert Q.gguf_can_dequantize(name)


@pytest.mark.parametrize("name", list(Q.TORCH_PORTS))
@pytest.mark.parametrize("n", BLOCKS)
def test_port_equals_the_package_bit_for_bit(name, n):
    raw = random_blocks(name, n)
    want = gguf.quants.dequantize(raw, qtype(name))
    size, port = Q.TORCH_PORTS[name]
    assert same_bits(port(torch.from_numpy(raw.copy())), want.reshape(n, -1))


@pytest.mark.parametrize("name", list(Q.TORCH_PORTS))
def test_dequantize_gguf_takes_the_readers_rows(name):
    """As the GGUF reader gives a quantized tensor: uint8 [rows, bytes per row], read-only (a memory map); the
    result in the tensor's shape, on the requested device."""
    block = gguf.GGML_QUANT_SIZES[qtype(name)][0]
    rows, per_row = 6, 1024 // block
    raw = random_blocks(name, rows * per_row, seed=1).reshape(rows, -1)
    raw.setflags(write=False)
    want = gguf.quants.dequantize(raw, qtype(name))
    got = Q.dequantize_gguf(raw, name, (rows, 1024), device="cpu")
    assert want.shape == (rows, 1024) and same_bits(got, want)
    assert same_bits(Q.dequantize_gguf(raw, name, (2, 3, 1024)).reshape(rows, 1024), want)


def test_an_all_zero_and_a_negative_zero_scale_block():
    for name in Q.TORCH_PORTS:
        raw = random_blocks(name, 4, seed=2)
        for at in FP16_AT[name]:
            raw[0, at:at + 2] = 0
            raw[1, at:at + 2] = np.frombuffer(np.float16(-0.0).tobytes(), np.uint8)
        raw[2] = 0
        want = gguf.quants.dequantize(raw, qtype(name))
        assert same_bits(Q.TORCH_PORTS[name][1](torch.from_numpy(raw.copy())), want.reshape(4, -1)), name


# ---- why the order of operations cannot change a bit, and what would --------------------------------------------
# d, dmin, m are fp16 (at most 11 significant bits), sc 6 bits (Q6_K: int8, |sc| <= 127 or 128), q at most 5 bits
# (Q6_K: |q - 32| <= 31 or 32): every product (d * sc, (d * sc) * q, dmin * m, d * q) has at most 23 significant
# bits, so it is exact in fp32 whatever the order, and each value is its exact real value rounded once (at the
# final + / -, exact too for the offset-free types). Reassociating the products, or a fused multiply-add, gives the
# same bits; computing in fp16 (ComfyUI-GGUF's default, the scale's dtype) does not.
def _ints(name, raw):
    return getattr(Q, f"_unpack_{name.lower()}")(torch.from_numpy(raw.copy()))


def _exact(name, raw) -> tuple[torch.Tensor, callable]:
    """The exact value of every element (float64: the products and sums below fit its 53 bits here) and the same
    formula as a function of the dtype to compute in."""
    parts = _ints(name, raw)
    if name in ("Q4_K", "Q5_K"):
        d, dmin, sc, m, q = parts

        def f(dt):
            return ((d.to(dt) * sc.to(dt)).unsqueeze(-1) * q.to(dt) - (dmin.to(dt) * m.to(dt)).unsqueeze(-1))
    elif name == "Q6_K":
        d, sc, q = parts

        def f(dt):
            return (d.to(dt) * sc.to(dt)).unsqueeze(-1) * (q.to(dt) - 32)
    elif name in ("Q4_1", "Q5_1"):
        d, m, q = parts

        def f(dt):
            return d.to(dt) * q.to(dt) + m.to(dt)
    else:
        d, q = parts
        offset = {"Q4_0": 8, "Q5_0": 16}[name]

        def f(dt):
            return d.to(dt) * (q.to(dt) - offset)
    return f(torch.float64), f


@pytest.mark.parametrize("name", [n for n in Q.TORCH_PORTS if n != "Q8_0"])
def test_each_value_is_its_exact_value_rounded_once(name):
    raw = random_blocks(name, 250, seed=3)
    want = gguf.quants.dequantize(raw, qtype(name)).reshape(250, -1)
    exact, formula = _exact(name, raw)
    assert same_bits(exact.float().reshape(want.shape), want)
    if name in ("Q4_K", "Q5_K", "Q6_K"):  # the products are exact in fp32: either association, the same bits
        parts = [p.double() for p in _ints(name, raw)]
        d, sc, q = (parts[0], parts[2], parts[4]) if name != "Q6_K" else (parts[0], parts[1], parts[2] - 32)
        a = (d * sc).unsqueeze(-1) * q
        assert torch.equal(a.float().double(), a) and torch.equal((d.float() * sc.float()).double(), d * sc)
    half = formula(torch.float16).float().reshape(want.shape)  # ComfyUI-GGUF's fp16 arithmetic: other bits
    assert not same_bits(half, want)


def test_an_off_by_one_bit_is_caught():
    """The comparison itself: one flipped low mantissa bit in one value fails it."""
    raw = random_blocks("Q4_K", 3)
    want = gguf.quants.dequantize(raw, qtype("Q4_K"))
    got = Q.dequantize_q4_k(torch.from_numpy(raw.copy()))
    assert same_bits(got, want)
    i = int(torch.nonzero(got.reshape(-1)).reshape(-1)[0])
    got.view(torch.int32).reshape(-1)[i] ^= 1
    assert not same_bits(got, want)


# ---- files: the writer (wan.testing.layouts) and the real loader -------------------------------------------------
MIXES = {"Q4_K_M": ("Q4_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K")}  # llama.cpp's _M files: some tensors in Q6_K


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q4_K_M", "Q5_K_M"])
def test_gguf_file_loads_equal_to_the_package(tiny_ckpt, tmp_path, kind):
    """A tiny expert written as a GGUF of `kind` (K-quants where 256 divides the rows: text_embedding.0 and
    time_embedding.0; Q8_0 for the rest), loaded by load_dit: every tensor equal to the package's dequantization,
    in fp32 and cast to bf16."""
    from wan.configs import WAN_CONFIGS
    from wan.formats import dit_source
    from wan.modules.checkpoint import load_dit
    from wan.modules.model import WanModel
    from wan.testing import layouts as L

    arch = WAN_CONFIGS["t2v-tiny"].arch
    qtype_, mixed = MIXES.get(kind, (kind, None))
    path = tmp_path / f"{kind}.gguf"
    types = L.write_gguf_dit(tiny_ckpt / "high_noise_model", path, qtype_,
                             override={"time_embedding.0.weight": mixed} if mixed else None)
    written = set(types.values())
    assert qtype_ in written and (mixed is None or mixed in written)
    src = dit_source(path, "x", arch)
    assert f"gguf {qtype_}" in src.counts()
    ref = L.gguf_reference(path)
    got32 = load_dit(WanModel, src, None).state_dict()
    got16 = load_dit(WanModel, src, torch.bfloat16).state_dict()
    assert ref.keys() == got32.keys()
    for k, v in ref.items():
        assert got32[k].dtype == torch.float32 and torch.equal(got32[k].view(torch.int32), v.view(torch.int32)), k
        assert torch.equal(got16[k], v.to(torch.bfloat16)), k
    official = L.official_dit_state(tiny_ckpt / "high_noise_model")  # and the writer's quantizers are sound
    for k, t in types.items():
        if t not in ("F32", "F16"):
            rel = ((got32[k] - official[k]).norm() / official[k].norm()).item()
            assert rel < {"4": 0.12, "5": 0.06, "6": 0.03, "8": 0.01}[t[1]], (k, t, rel)
