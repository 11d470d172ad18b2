"""The DiT against an independent float64 re-computation of the reference math, from the raw state dict."""
import math

import pytest
import torch
import torch.nn.functional as F

from wan.modules.checkpoint import CheckpointError, save_wan_model
from wan.modules.model import WanModel
from wan.testing.random_init import randomize_weights_

TINY = dict(dim=32, ffn_dim=48, freq_dim=16, text_dim=4096, num_heads=2, num_layers=2, text_len=12)


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    m = WanModel(**{**TINY, **over})
    return randomize_weights_(m, seed).eval()


# ---------------- independent float64 reference (written from wan22_reference.md, not from wan/) ----------------
def _ln(x, eps, w=None, b=None):
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return x * w + b if w is not None else x


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _attn(q, k, v, nh, k_len=None):
    L, d = q.shape
    q, k, v = (u.view(u.shape[0], nh, d // nh).transpose(0, 1) for u in (q, k, v))
    s = q @ k.transpose(1, 2) / math.sqrt(d // nh)
    if k_len is not None:
        s[..., k_len:] = -math.inf
    return (s.softmax(-1) @ v).transpose(0, 1).reshape(L, d)


def _rope_angles(hd, f, h, w):
    """[f*h*w, hd/2]: the first pairs follow the frame, then height, then width (22/21/21 for hd 128)."""
    c = hd // 2
    nf, nh_ = c - 2 * (c // 3), c // 3
    rows = []
    for fi in range(f):
        for hi in range(h):
            for wi in range(w):
                a = [fi * 10000 ** (-2 * i / (2 * nf)) for i in range(nf)]
                a += [hi * 10000 ** (-2 * i / (2 * nh_)) for i in range(nh_)]
                a += [wi * 10000 ** (-2 * i / (2 * nh_)) for i in range(nh_)]
                rows.append(a)
    return torch.tensor(rows, dtype=torch.float64)


def _rope(x, ang, nh):
    L, d = x.shape
    n = ang.shape[0]
    xr = x.view(L, nh, d // nh // 2, 2).clone()
    a0, a1 = xr[:n, :, :, 0].clone(), xr[:n, :, :, 1].clone()
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    xr[:n, :, :, 0] = a0 * c - a1 * s
    xr[:n, :, :, 1] = a0 * s + a1 * c
    return xr.view(L, d)


def reference_forward(model, xs, t, ctxs, seq_len):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    d, nh, eps, p = model.dim, model.num_heads, model.eps, model.patch_size
    outs = []
    for i, (x0, ctx) in enumerate(zip(xs, ctxs)):
        x = F.conv3d(x0[None].double(), sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=p)[0]
        _, f, h, w = x.shape
        n = f * h * w
        x = torch.cat([x.flatten(1).T, x.new_zeros(seq_len - n, d)])
        half = model.freq_dim // 2
        ang = float(t[i]) * 10000 ** (-torch.arange(half, dtype=torch.float64) / half)
        sin = torch.cat([ang.cos(), ang.sin()])
        e = _lin(sd, "time_embedding.2", F.silu(_lin(sd, "time_embedding.0", sin)))
        e0 = _lin(sd, "time_projection.1", F.silu(e)).view(6, d)
        c = torch.cat([ctx.double(), ctx.new_zeros(model.text_len - ctx.shape[0], ctx.shape[1]).double()])
        c = _lin(sd, "text_embedding.2", _gelu_tanh(_lin(sd, "text_embedding.0", c)))
        angles = _rope_angles(d // nh, f, h, w)
        for b in range(model.num_layers):
            pre = f"blocks.{b}."
            m = sd[pre + "modulation"][0] + e0
            y = _ln(x, eps) * (1 + m[1]) + m[0]
            q = _rms(_lin(sd, pre + "self_attn.q", y), sd[pre + "self_attn.norm_q.weight"], eps)
            k = _rms(_lin(sd, pre + "self_attn.k", y), sd[pre + "self_attn.norm_k.weight"], eps)
            v = _lin(sd, pre + "self_attn.v", y)
            y = _lin(sd, pre + "self_attn.o", _attn(_rope(q, angles, nh), _rope(k, angles, nh), v, nh, k_len=n))
            x = x + y * m[2]
            y = _ln(x, eps, sd[pre + "norm3.weight"], sd[pre + "norm3.bias"])
            q = _rms(_lin(sd, pre + "cross_attn.q", y), sd[pre + "cross_attn.norm_q.weight"], eps)
            k = _rms(_lin(sd, pre + "cross_attn.k", c), sd[pre + "cross_attn.norm_k.weight"], eps)
            v = _lin(sd, pre + "cross_attn.v", c)
            x = x + _lin(sd, pre + "cross_attn.o", _attn(q, k, v, nh))
            y = _ln(x, eps) * (1 + m[4]) + m[3]
            y = _lin(sd, pre + "ffn.2", _gelu_tanh(_lin(sd, pre + "ffn.0", y)))
            x = x + y * m[5]
        hm = sd["head.modulation"][0]
        x = _lin(sd, "head.head", _ln(x, eps) * (1 + hm[1] + e) + hm[0] + e)
        co = model.out_dim
        out = torch.zeros(co, f * p[0], h * p[1], w * p[2], dtype=torch.float64)
        tok = 0
        for fi in range(f):
            for hi in range(h):
                for wi in range(w):
                    u = x[tok].view(p[0], p[1], p[2], co)  # channels ordered (p, q, r, c)
                    out[:, fi * p[0]:(fi + 1) * p[0], hi * p[1]:(hi + 1) * p[1], wi * p[2]:(wi + 1) * p[2]] = \
                        u.permute(3, 0, 1, 2)
                    tok += 1
        outs.append(out)
    return outs


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(shapes, seed=1, text_lens=(5, 9)):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, *s, generator=g) for s in shapes]
    ctx = [torch.randn(text_lens[i % len(text_lens)], TINY["text_dim"], generator=g) for i in range(len(shapes))]
    return xs, ctx


@pytest.mark.parametrize("shapes,pad", [
    ([(3, 4, 6)], 0),                 # batch 1, exact seq_len
    ([(2, 6, 4)], 5),                 # another grid, padded seq_len (masked keys)
    ([(3, 4, 6), (3, 4, 6)], 3),      # batch 2, padded
])
def test_forward_matches_float64_reference(shapes, pad):
    model = tiny_model()
    xs, ctx = inputs(shapes)
    n = max(s[0] * s[1] * s[2] // 4 for s in shapes)
    t = torch.tensor([937, 412][: len(shapes)])
    with torch.no_grad():
        out = model(xs, t, ctx, seq_len=n + pad)
    ref = reference_forward(model, xs, t, ctx, n + pad)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        assert r.abs().mean() > 0.05  # non-degenerate: the head is not zero
        assert rel_err(o, r) < 1e-5, rel_err(o, r)


def test_fresh_model_outputs_zero_but_randomized_does_not():
    torch.manual_seed(0)
    fresh = WanModel(**TINY)
    xs, ctx = inputs([(1, 2, 2)])
    with torch.no_grad():
        assert fresh(xs, torch.tensor([500]), ctx, seq_len=1)[0].abs().max() == 0
        assert tiny_model()(xs, torch.tensor([500]), ctx, seq_len=1)[0].abs().max() > 0


def test_state_dict_keys_match_reference_layout():
    keys = set(WanModel(**TINY).state_dict())
    assert len(keys) == 27 * TINY["num_layers"] + 15
    for k in ["patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
              "time_projection.1.weight", "blocks.0.modulation", "blocks.1.self_attn.norm_q.weight",
              "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.0.cross_attn.o.bias", "blocks.1.ffn.2.weight",
              "head.modulation", "head.head.weight"]:
        assert k in keys, k
    assert not any(k.startswith(("blocks.0.norm1", "blocks.0.norm2", "head.norm", "freqs")) for k in keys)


def test_sharded_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=3)
    save_wan_model(model, tmp_path / "high_noise_model", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "high_noise_model").iterdir())
    assert "config.json" in files and "diffusion_pytorch_model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2  # really sharded
    loaded = WanModel.from_pretrained(tmp_path, subfolder="high_noise_model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    xs, ctx = inputs([(3, 4, 6)])
    with torch.no_grad():
        a = model(xs, torch.tensor([700]), ctx, seq_len=18)[0]
        b = loaded(xs, torch.tensor([700]), ctx, seq_len=18)[0]
    assert torch.equal(a, b)
    bf16 = WanModel.from_pretrained(tmp_path, subfolder="high_noise_model", torch_dtype=torch.bfloat16)
    assert bf16.blocks[0].ffn[0].weight.dtype == torch.bfloat16


def test_config_ignored_keys_keep_defaults(tmp_path):
    import json
    model = tiny_model()
    save_wan_model(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(qk_norm=False, cross_attn_norm=False)  # the reference ignores these keys
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = WanModel.from_pretrained(tmp_path)
    assert loaded.qk_norm and loaded.cross_attn_norm


def test_mismatched_checkpoint_gives_short_error(tmp_path):
    import json
    save_wan_model(tiny_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        WanModel.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "does not match" in msg and "more" in msg


def test_missing_shard_is_named(tmp_path):
    save_wan_model(tiny_model(), tmp_path, max_shard_bytes=20_000)
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        WanModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanModel.from_pretrained(tmp_path)
