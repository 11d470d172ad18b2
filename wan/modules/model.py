"""The Wan 2.2 DiT (`WanModel`): the reference's math, its constructor, config semantics and state-dict keys.

One readable forward. The fast paths are alternatives chosen by `configure()` (attention backend, RoPE form,
per-sample time embedding, fused q/k norm + RoPE, FFN over token chunks); with the defaults the forward is the
reference's, step for step. Sequence parallelism (Ulysses) is a load-time layout set by `set_sequence_parallel()`:
the same forward then shards the tokens after the embeddings and gathers them after the head (both do nothing
without a group). `forward_residual` is the same forward exposing the block stack's residual, and reusing an earlier
one instead of running the blocks: the named alternative step caching runs (wan/step_cache.py).
Shapes: d = dim, L = padded token count (seq_len), H = heads, D = head dim = d / H.
"""
from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn as nn

from ..configs.model_config import WanConfig
from ..distributed.ulysses import UlyssesAttention, gather_tokens, shard_tokens
from .attention import DEFAULT_ATTENTION, AttentionBackend
from .ffn import WholeFFN, ffn_runner
from .precision import fp32_region
from .qk_rope import FusedQKRope
from .rope import FastRope, ReferenceRope
from .token_timesteps import time_rows

__all__ = ["WanModel", "sinusoidal_embedding_1d"]

# i2v: the same DiT, its input = the noise latent + y (mask and image latent); ti2v (TI2V-5B): no branch at all,
# its image mode only changes the latent and the timesteps it is given
MODEL_TYPES = ("t2v", "i2v", "ti2v")


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, dim] float64: cos first, then sin, angle = pos * 10000^(-k/half)."""
    half = dim // 2
    position = position.type(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width: normalise in fp32, cast back, then times the weight (may promote to fp32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed on x.float(), cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size=(-1, -1), qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        assert dim % num_heads == 0
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size, self.qk_norm, self.eps = window_size, qk_norm, eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        # Chosen once by WanModel.configure(); plain attributes, not modules.
        self.attention: AttentionBackend = DEFAULT_ATTENTION
        self.rope = ReferenceRope
        self.qk_rope: FusedQKRope | None = None  # None: norm, then RoPE (the reference)

    def forward(self, x, seq_lens, rope_table):
        """x [B, L, d] -> [B, L, d]; keys limited to each sample's real tokens (seq_lens)."""
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        if self.qk_rope is None:
            q = self.norm_q(self.q(x)).view(b, s, n, d)
            k = self.norm_k(self.k(x)).view(b, s, n, d)
            q, k = self.rope.apply(q, rope_table), self.rope.apply(k, rope_table)
        else:  # the same norm + fast RoPE fused, q and k [B, L, H, D] already in the attention's dtype (bf16)
            q, k = self.qk_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, self.norm_q.eps,
                                rope_table, n)
        v = self.v(x).view(b, s, n, d)
        x = self.attention(q, k, v, k_lens=seq_lens)
        return self.o(x.flatten(2))


class WanCrossAttention(WanSelfAttention):
    def forward(self, x, context, context_lens=None):
        """x [B, L, d], context [B, 512, d]: every text row (zero-padded ones too) is attended, no RoPE."""
        b, n, d = x.size(0), self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)
        k = self.norm_k(self.k(context)).view(b, -1, n, d)
        v = self.v(context).view(b, -1, n, d)
        return self.o(self.attention(q, k, v, k_lens=context_lens).flatten(2))


class WanAttentionBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True, cross_attn_norm=False, eps=1e-6):
        super().__init__()
        self.dim, self.ffn_dim, self.num_heads = dim, ffn_dim, num_heads
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.ffn_runner = WholeFFN()  # chosen by WanModel.configure(): whole, or over token chunks

    def forward(self, x, e, seq_lens, rope_table, context, context_lens=None):
        """x [B, L, d]; e [B, L|1, 6, d] fp32 (per token, or per sample with the fast time embedding)."""
        assert e.dtype == torch.float32
        with fp32_region(x.device.type):
            # shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn, each [B, L|1, d]
            e = [u.squeeze(2) for u in (self.modulation.unsqueeze(0) + e).chunk(6, dim=2)]
        # 1. self-attention, modulated and gated
        y = self.self_attn(self.norm1(x).float() * (1 + e[1]) + e[0], seq_lens, rope_table)
        with fp32_region(x.device.type):
            x = x + y * e[2]
        # 2. cross-attention: no modulation, no gate
        x = x + self.cross_attn(self.norm3(x), context, context_lens)
        # 3. feed-forward, modulated and gated
        y = self.ffn_runner(self.ffn, self.norm2(x).float() * (1 + e[4]) + e[3])
        with fp32_region(x.device.type):
            x = x + y * e[5]
        return x


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.dim, self.out_dim, self.patch_size, self.eps = dim, out_dim, patch_size, eps
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e):
        """x [B, L, d], e [B, L|1, d] (time_embedding output, no SiLU) -> [B, L, prod(patch) * out_dim] fp32."""
        with fp32_region(x.device.type):
            shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)
            return self.head(self.norm(x) * (1 + scale.squeeze(2)) + shift.squeeze(2))


class WanModel(nn.Module):
    """The Wan DiT. Constructor arguments and defaults are the reference's (`WanConfig` holds them as one frozen
    object: `model.config`); see `from_pretrained` for config.json."""

    ignore_for_config = WanConfig.IGNORED
    _no_split_modules = ["WanAttentionBlock"]

    def __init__(self, model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048, ffn_dim=8192,
                 freq_dim=256, text_dim=4096, out_dim=16, num_heads=16, num_layers=32, window_size=(-1, -1),
                 qk_norm=True, cross_attn_norm=True, eps=1e-6):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"this project implements the {' and '.join(MODEL_TYPES)} DiTs (config.json has "
                             f"model_type={model_type!r}); point --ckpt_dir at a Wan2.2-T2V-A14B, I2V-A14B or "
                             "TI2V-5B checkpoint")
        self.config = WanConfig(model_type=model_type, patch_size=patch_size, text_len=text_len, in_dim=in_dim,
                                dim=dim, ffn_dim=ffn_dim, freq_dim=freq_dim, text_dim=text_dim, out_dim=out_dim,
                                num_heads=num_heads, num_layers=num_layers, window_size=window_size,
                                qk_norm=qk_norm, cross_attn_norm=cross_attn_norm, eps=eps)
        self.model_type, self.patch_size, self.text_len = model_type, tuple(patch_size), text_len
        self.in_dim, self.dim, self.ffn_dim, self.freq_dim = in_dim, dim, ffn_dim, freq_dim
        self.text_dim, self.out_dim, self.num_heads, self.num_layers = text_dim, out_dim, num_heads, num_layers
        self.window_size, self.qk_norm, self.cross_attn_norm, self.eps = window_size, qk_norm, cross_attn_norm, eps

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([
            WanAttentionBlock(dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps)
            for _ in range(num_layers)])
        self.head = Head(dim, out_dim, patch_size, eps)
        self.sp_group = None  # Ulysses group (load-time layout); None = one device
        self.configure()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @classmethod
    def from_config(cls, config: WanConfig) -> "WanModel":
        return cls(**asdict(config))

    # ---- per-call kernels and the load-time layout ------------------------------------------------------------
    def configure(self, attention: AttentionBackend | None = None, fast_rope: bool = False,
                  fast_time_embedding: bool = False, qk_rope: FusedQKRope | None = None,
                  ffn_chunks: int = 0) -> "WanModel":
        """Pick the attention backend, the RoPE form and the time-embedding form for every block; `qk_rope` (a
        `wan.modules.qk_rope.FusedQKRope`, needs fast_rope) fuses the self-attention's q/k norm and RoPE;
        `ffn_chunks` >= 2 runs each FFN over that many token chunks (wan/modules/ffn.py)."""
        if qk_rope is not None and not (fast_rope and self.qk_norm):
            raise ValueError("the fused q/k RMSNorm + RoPE applies the fast RoPE's cos/sin tables after the q/k norm: "
                             "it needs fast_rope=True (--fast_rope) and a model with qk_norm")
        self.qk_rope = qk_rope
        self.rope = (FastRope if fast_rope else ReferenceRope)(self.dim // self.num_heads)
        self.fast_time_embedding = fast_time_embedding
        self.attention = attention or DEFAULT_ATTENTION
        self.ffn_runner = ffn_runner(ffn_chunks)
        for block in self.blocks:
            block.ffn_runner = self.ffn_runner
        self._bind_attention()
        return self

    def set_sequence_parallel(self, group) -> "WanModel":
        """Split the tokens over `group` (Ulysses); None or a group of one rank turns it off. Independent of
        `configure()`: either may be called first."""
        import torch.distributed as dist

        size = dist.get_world_size(group) if group is not None else 1
        if size > 1 and self.num_heads % size:
            raise ValueError(f"--ulysses_size {size} must divide the model's {self.num_heads} attention heads")
        self.sp_group = group if size > 1 else None
        self._bind_attention()
        return self

    def _bind_attention(self):
        # self-attention sees the whole sequence through the Ulysses exchange; cross-attention is always local
        self_attention = self.attention if self.sp_group is None else UlyssesAttention(self.attention, self.sp_group)
        for block in self.blocks:
            block.self_attn.attention, block.cross_attn.attention = self_attention, self.attention
            block.self_attn.rope = block.cross_attn.rope = self.rope
            block.self_attn.qk_rope = self.qk_rope

    # ---- forward ---------------------------------------------------------------------------------------------
    def embed(self, x: list, t: torch.Tensor, context: list, seq_len: int):
        """Everything before the blocks. Returns (x [B, L, d], e, e0, seq_lens, grids, rope_table, context)."""
        if any(u.shape[0] != self.in_dim for u in x):
            raise ValueError(f"latents must have {self.in_dim} channels (with y, for i2v), got "
                             f"{[tuple(u.shape) for u in x]}")
        # 1. patchify: per sample [1, d, F, H/2, W/2] -> [1, F*H'*W', d], right-padded to seq_len
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grids = [tuple(u.shape[2:]) for u in x]
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = [u.size(1) for u in x]
        if max(seq_lens) > seq_len:
            raise ValueError(f"seq_len {seq_len} is smaller than the {max(seq_lens)} tokens of the latents")
        x = torch.cat([torch.cat([u, u.new_zeros(1, seq_len - u.size(1), u.size(2))], dim=1) for u in x])
        # 2. time: one timestep per token [B, L] (reference), or per sample [B, 1] (fast, exact for t2v); per-token
        # TokenTimesteps (TI2V image mode) fast: its few distinct rows, then gathered per token
        rows, index = time_rows(t, x.size(0), seq_len, self.fast_time_embedding)
        with fp32_region(x.device.type):
            e = self.time_embedding(
                sinusoidal_embedding_1d(self.freq_dim, rows.flatten()).unflatten(0, rows.shape).float())
            e0 = self.time_projection(e).unflatten(2, (6, self.dim))  # [B, L|1|K, 6, d]
            if index is not None:
                e, e0 = e[:, index], e0[:, index]  # [B, L, d], [B, L, 6, d]
            assert e.dtype == torch.float32 and e0.dtype == torch.float32
        # 3. text: zero-pad each prompt to text_len rows before the MLP (padded rows take part in cross-attention)
        context = self.text_embedding(torch.stack([
            torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))]) for u in context]))
        rope_table = self.rope.prepare(grids, seq_len, x.device)
        return x, e, e0, seq_lens, grids, rope_table, context

    def forward(self, x: list, t: torch.Tensor, context: list, seq_len: int, y=None) -> list:
        """x: list of [C, F, H, W]; t: [B], [B, seq_len] or TokenTimesteps (per token, factored); context: list of
        [L_i, text_dim]; y (i2v): list of [C_y, F, H, W] conditions, each joined to its x along the channels before
        the patch embedding (noise first, as the reference), so everything after it (Ulysses sharding, streaming,
        compile) sees the usual tokens.

        Returns a list of fp32 [C_out, F, H, W] (the flow / velocity prediction).
        """
        x, e, e0, seq_lens, grids, rope_table, context = self.stack_input(x, t, context, seq_len, y)
        for block in self.blocks:
            x = block(x, e0, seq_lens, rope_table, context, None)
        return self.stack_output(x, e, grids)

    def stack_input(self, x: list, t: torch.Tensor, context: list, seq_len: int, y=None):
        """Everything before the blocks, this rank's tokens: (x [B, L(/P), d], e, e0, seq_lens, grids, rope_table,
        context). i2v: y joined to x first."""
        if y is not None:
            x = [torch.cat([u, v]) for u, v in zip(x, y, strict=True)]
        elif self.model_type == "i2v":
            raise ValueError("the i2v DiT needs y (the image condition: first-frame mask and image latent)")
        x, e, e0, seq_lens, grids, rope_table, context = self.embed(x, t, context, seq_len)
        # with a Ulysses group: this rank's tokens from here to the head (per-token e / e0 / RoPE rows with them)
        x, e, e0, rope_table = shard_tokens(self.sp_group, x, e, e0, rope_table)
        return x, e, e0, seq_lens, grids, rope_table, context

    def stack_output(self, x: torch.Tensor, e: torch.Tensor, grids: list) -> list:
        """Everything after the blocks: the head, the tokens gathered (Ulysses), unpatchified to fp32 latents."""
        x = gather_tokens(self.head(x, e), self.sp_group)
        return [u.float() for u in self.unpatchify(x, grids)]

    def forward_residual(self, x: list, t: torch.Tensor, context: list, seq_len: int, y=None,
                         reuse: torch.Tensor | None = None) -> tuple[list, torch.Tensor]:
        """`forward` with the block stack's residual, for step caching (wan/step_cache.py): returns (forward's
        output, r = blocks' output - blocks' input, [B, L(/P), d], this rank's tokens; fp32 where the stream is).
        With `reuse` (an r of an earlier step) no block runs: x + reuse goes to the head."""
        x, e, e0, seq_lens, grids, rope_table, context = self.stack_input(x, t, context, seq_len, y)
        if reuse is not None:
            return self.stack_output(x + reuse, e, grids), reuse
        x0 = x
        for block in self.blocks:
            x = block(x, e0, seq_lens, rope_table, context, None)
        return self.stack_output(x, e, grids), x - x0

    def unpatchify(self, x: torch.Tensor, grids: list) -> list:
        """[B, L, p*q*r*c] -> list of [c, F*p, H'*q, W'*r]; head channels are ordered (p, q, r, c), c fastest."""
        c, (p, q, r) = self.out_dim, self.patch_size
        out = []
        for u, (f, h, w) in zip(x, grids):
            u = u[: f * h * w].view(f, h, w, p, q, r, c)
            out.append(torch.einsum("fhwpqrc->cfphqwr", u).reshape(c, f * p, h * q, w * r))
        return out

    # ---- weights -----------------------------------------------------------------------------------------
    def init_weights(self):
        """The reference's init (note: head.head is zero, so a fresh model outputs zeros)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in self.text_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.time_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    @classmethod
    def from_pretrained(cls, checkpoint_dir, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        device="cpu", transform=None) -> "WanModel":
        """Load `<checkpoint_dir>/<subfolder>/` (config.json + sharded safetensors) without a second copy.
        `transform` (e.g. a `wan.lora.LoraMerge`) changes each tensor in fp32 before the dtype cast."""
        from .checkpoint import load_wan_model

        return load_wan_model(cls, checkpoint_dir, subfolder, dtype=torch_dtype, device=device, transform=transform)

    def estimate_flops(self, seq_len: int, text_len: int | None = None) -> float:
        """Matmul FLOPs of one batch-1 forward (linears + attention), for MFU reporting."""
        d, f, n_txt = self.dim, self.ffn_dim, text_len or self.text_len
        # qkvo, cross q/o, cross k/v
        per_block = 2 * seq_len * d * d * 4 + 2 * seq_len * d * d * 2 + 2 * n_txt * d * d * 2
        per_block += 2 * seq_len * d * f * 2  # ffn
        per_block += 4 * seq_len * seq_len * d + 4 * seq_len * n_txt * d  # self + cross attention
        return float(per_block * self.num_layers)
