"""Exact, memory-bounded decode of the Wan 2.1 and Wan 2.2 VAEs in horizontal bands of rows.

Wan 2.2 (TI2V-5B; diffusers' is_residual=True, patch_size 2): its up blocks add a DupUp3D shortcut (each output row
a copy of input row r // 2: no rows read around it) and name their upsampler `upsampler`; its decoder ends in 12
channels that a 2x2 unpatchify turns into 3 at twice the rows (row r -> rows 2r, 2r + 1). Both are row-local, so
the halo rule below holds unchanged and each band is unpatchified on its own. The numbers below are Wan 2.1's.

diffusers' `AutoencoderKLWan._decode` runs the whole decoder on whole frames, one latent frame at a time with a causal
feature cache. Only the decoder's mid block (spatial self-attention over the whole latent frame) is non-local; every
layer after it is a radius-1 conv or a per-pixel op (RMS norm over channels, SiLU, nearest upsample, the 3x1x1 time
conv). So from up_blocks[split] on, a band of rows computed with `halo_rows` extra rows above and below gives, in its
interior, the whole-frame values up to summation order: no blending (unlike diffusers' tiled decode). Each band keeps
its own causal cache (its own features at each layer, halo included): the invalid margin at a layer is the same for
every frame, so cached frames are exactly as valid as the current one.

Choice of the default split, at 1280x720 (latent 90x160), fp32, per latent frame after the first (4 output frames):

    stage (whole frame)            output [C, t, rows, cols]   size      causal cache (2 frames per conv)
    conv_in + mid_block            384 x 1 x  90 x  160        0.02 GiB  0.2 GiB
    up_blocks[0] (x2 upsample)     192 x 2 x 180 x  320        0.08 GiB  0.3 GiB
    up_blocks[1] (x2 upsample)     192 x 4 x 360 x  640        0.66 GiB  1.1 GiB  (its upsample: 384 ch, 1.32 GiB)
    up_blocks[2] (x2 upsample)      96 x 4 x 720 x 1280        1.32 GiB  2.0 GiB  (its upsample: 192 ch, 2.64 GiB)
    up_blocks[3] + conv_out        96 / 3 x 4 x 720 x 1280     1.32 GiB  4.6 GiB

    split  rows  halo   halo overhead (rows computed / kept - 1)   peak, 81 frames fp32 (whole frame: 17.6 GiB)
                        4 bands     8 bands                         4 bands     8 bands
    1      180   12     40%         93%                             15.4 GiB    18.5 GiB
    2      360   10     17%         39%                             13.4 GiB    14.1 GiB
    3      720    7      6%         14%                             14.5 GiB    14.9 GiB

Peaks: live tensor bytes of the whole decode run on the meta device (benchmarks/vae_memory.py: a dispatch mode summing
live storages; no weights, no allocator slack, no conv workspaces). In order="frame" (the default) split 2 with 4
bands is lowest, at 17% extra rows in the banded stages: its default split (bf16: 7.3 GiB against 9.1 GiB whole).
Split 3 keeps up_blocks[2]'s full-resolution upsample whole; split 1 pays its large halo in the caches too. The floor
is the causal caches, 8.1 GiB in all (fp32, 720p): each band keeps its own across frames and all bands are live at
once, so banding does not shrink them (they grow by the halo overhead, which is why 8 bands peak higher).

order="band" removes that floor: the trunk runs once over all latent frames (its own caches, freed after), its
outputs are kept, then each band runs all frames with only its own caches alive, freed before the next band. Two more
exact savings inside a band (_band_frames): each block's input is cropped to the rows the rest of the decoder still
needs, so the split's halo is not carried to full resolution (extra rows per block at split 0, 4 bands: 87%, 40%,
17%, 6%, against 87% everywhere in frame order); and the blocks after the last temporal upsample run one output frame
at a time, so their full-resolution working set is one frame, not four.

Keep or recompute the trunk (fp32, 720p x 81 frames; live counts):

    split  trunk work (of the decode)  its outputs, all frames  its caches  4 bands, recomputed per band
    0       2.6%                        0.43 GiB                 0.17 GiB    +7.8% work, its caches live in every band
    1       5.5%                        1.69 GiB                 0.45 GiB    +16.5%
    2      26.2%                       13.35 GiB                 1.53 GiB    +79%

Kept: at split 0 the outputs cost 0.43 GiB, against 0.17 GiB of caches plus the attention if recomputed at 3 more
trunk runs; split 2 is out either way (13 GiB kept, or +79% work). Band order, 1280x720x81, live-tensor counts
(NOT measured GPU peaks; whole-frame decode 17.57 GiB fp32, 9.12 GiB bf16; work: conv + attention multiply-adds
over the whole decode's, i.e. the extra rows computed):

    order  split  bands   peak fp32   peak bf16   extra work
    frame  2      4       13.38 GiB    7.32 GiB   12%          (the frame-order default)
    band   0      2        7.73 GiB    4.04 GiB    6%
    band   0      4        5.03 GiB    2.77 GiB   19%          (recommended default)
    band   0      6        3.94 GiB    2.21 GiB   32%
    band   0      8        3.53 GiB    2.01 GiB   45%
    band   1      2        8.80 GiB    4.54 GiB    6%
    band   1      4        6.07 GiB    3.26 GiB   17%
    band   1      8        4.60 GiB    2.52 GiB   39%
    band   2      4       17.64 GiB    9.81 GiB    9%          (13.35 GiB of kept trunk outputs)

What is left at the band-order peak (split 0, 4 bands, fp32, inside up_blocks[3]): the output video 0.83 GiB, the kept
trunk outputs 0.43, the band's caches 2.46 (the other bands' are freed), its working set 1.31. Split 0 beats split 1
(smaller kept outputs, and cropping makes its larger split halo cost only in up_blocks[0], 2.6% of the work).
Recommended for the memory plan: order "band", split 0, 4 bands: 0.29 (fp32) / 0.30 (bf16) of the whole-frame peak
at +19% decode work; 6 bands (0.22 / 0.24, +32%) where 4 do not fit, e.g. fp32 under a 6 GB decode budget once GPU
workspaces and slack are added.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["DEFAULT_SPLIT", "DEFAULT_BAND_SPLIT", "halo_rows", "decode_banded"]

DEFAULT_SPLIT = 2  # order "frame"
DEFAULT_BAND_SPLIT = 0  # order "band"
DEFAULT_SPLIT_BY_ORDER = {"frame": DEFAULT_SPLIT, "band": DEFAULT_BAND_SPLIT}
CACHE_T = 2  # frames a causal conv caches for the next chunk (diffusers' CACHE_T)


def _row_radius(conv: nn.Module) -> int:
    """Rows a conv reads above and below its output row: kernel rows k -> (k - 1) // 2 (Conv2d and Conv3d)."""
    return (conv.kernel_size[-2] - 1) // 2


def _upsampler(block: nn.Module):
    """An up block's WanResample (Wan 2.1 WanUpBlock: upsamplers[0]; Wan 2.2 WanResidualUpBlock: upsampler), or
    None (the last block has none)."""
    ups = getattr(block, "upsamplers", None)
    return ups[0] if ups is not None else getattr(block, "upsampler", None)


def _upsample_parts(block: nn.Module):
    """(row scale, conv after it) of an up block's WanResample, or None (the last block has no upsampler)."""
    resample = _upsampler(block)
    if resample is None:
        return None
    upsample, conv = resample.resample  # Sequential(WanUpsample nearest x2, Conv2d 3x3)
    return int(upsample.scale_factor[0]), conv


def _time_upsampling(block: nn.Module) -> bool:
    resample = _upsampler(block)
    return resample is not None and resample.mode == "upsample3d"


def _unpatchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Decoder output [1, 3 * p * p, t, r, w] -> video rows [1, 3, t, r * p, w * p] (Wan 2.2: p = 2; 2.1: as is)."""
    if patch == 1:
        return x
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    return unpatchify(x, patch)


def _row_scale(decoder: nn.Module, start: int) -> int:
    """Output rows per input row of up_blocks[start:] (8 for start 0, 1 for the last block)."""
    parts = [_upsample_parts(b) for b in decoder.up_blocks[start:]]
    return math.prod(p[0] for p in parts if p is not None)


def halo_rows(decoder: nn.Module, split: int) -> int:
    """Rows a band needs above and below, at the resolution of up_blocks[split]'s input, for exact interior rows.

    At a band edge the convs see zero padding instead of the neighbouring rows, so each radius-1 conv spoils one
    more row inward ('depth', counted at the current resolution): +2 per resnet (conv1, conv2; the 1x1 shortcut
    reaches no row), x2 at a nearest x2 upsample (each spoilt row becomes two), +1 for the Conv2d after it, and +1
    for conv_out at the end. The halo must hold the final depth, i.e. depth / row scale rows at the split
    resolution, rounded up. Equivalently, counted backwards from the output: a conv at 2x resolution costs half a
    row at the previous one. Wan 2.1 (3 resnets per block): split 0 -> 13, 1 -> 12, 2 -> 10, 3 -> 7.
    """
    depth = 0  # rows spoilt at a band edge, at the current resolution
    for block in decoder.up_blocks[split:]:
        depth += sum(_row_radius(r.conv1) + _row_radius(r.conv2) for r in block.resnets)
        upsample = _upsample_parts(block)
        if upsample is not None:
            scale, conv = upsample
            depth = depth * scale + _row_radius(conv)
    depth += _row_radius(decoder.conv_out)
    return math.ceil(depth / _row_scale(decoder, split))


def _band_plan(rows: int, bands: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(kept start, kept stop, input start, input stop) per band, rows at the split resolution: kept rows as even as
    possible (bands clamped to rows), inputs widened by the halo and clipped to the frame."""
    bands = min(bands, rows)
    edges = [rows * i // bands for i in range(bands + 1)]
    return [(a, b, max(0, a - halo), min(rows, b + halo)) for a, b in zip(edges[:-1], edges[1:])]


def _cache_slots(*parts: nn.Module) -> int:
    """An upper bound on the cache entries the parts use: one per causal conv (WanCausalConv3d is a Conv3d; the 1x1
    shortcuts are counted but unused)."""
    return sum(isinstance(m, nn.Conv3d) for part in parts for m in part.modules())


def _cached_causal_conv(conv: nn.Module, x: torch.Tensor, cache: list, idx: list[int]) -> torch.Tensor:
    """conv_in / conv_out step of WanDecoder3d.forward: convolve x [B, C, t, H, W] after the cached frames of the
    previous chunk, then cache x's last CACHE_T frames (a 1-frame chunk keeps the previous last frame too)."""
    i = idx[0]
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and cache[i] is not None:
        keep = torch.cat([cache[i][:, :, -1:], keep], dim=2)
    out = conv(x, cache[i])
    cache[i] = keep
    idx[0] += 1
    return out


def _run_trunk(decoder: nn.Module, x: torch.Tensor, cache: list, split: int, first: bool) -> torch.Tensor:
    """Whole frame: conv_in, mid block (attention), up_blocks[:split]. [1, z, 1, h, w] -> [1, C, t, rows, cols]."""
    idx = [0]
    x = _cached_causal_conv(decoder.conv_in, x, cache, idx)
    x = decoder.mid_block(x, feat_cache=cache, feat_idx=idx)
    for block in decoder.up_blocks[:split]:
        x = block(x, feat_cache=cache, feat_idx=idx, first_chunk=first)
    return x


def _run_band(decoder: nn.Module, x: torch.Tensor, cache: list, split: int, first: bool) -> torch.Tensor:
    """One band: up_blocks[split:], norm_out, SiLU, conv_out. [1, C, t, r, cols] -> [1, 3, t', r * scale, 8w]."""
    idx = [0]
    for block in decoder.up_blocks[split:]:
        x = block(x, feat_cache=cache, feat_idx=idx, first_chunk=first)
    x = decoder.nonlinearity(decoder.norm_out(x))
    return _cached_causal_conv(decoder.conv_out, x, cache, idx)


def _crop(x: torch.Tensor, lo: int, hi: int, keep0: int, keep1: int, halo: int) -> tuple[torch.Tensor, int, int]:
    """x holds rows [lo, hi); cut it (a view) to kept rows [keep0, keep1) +- halo. Returns (x, lo, hi)."""
    a, b = max(lo, keep0 - halo), min(hi, keep1 + halo)
    return x[:, :, :, a - lo:b - lo], a, b


def _band_frames(decoder: nn.Module, x: torch.Tensor, cache: list, split: int, first: bool,
                 rows: tuple[int, int, int, int], halos: list[int]):
    """One band of one latent frame, band order: yields ([1, 3, 1, r, W] video rows, first row) per output frame.

    rows: (kept start, kept stop, x's first row, x's stop) at up_blocks[split]'s input resolution. Two savings over
    _run_band, both exact:
    - crop: before up_blocks[k] (k > split) x is cut to kept +- halos[k]. Those rows are still exact (the band's
      halo at the split covers them, see halo_rows) and later layers read no others, so the band computes and caches
      only what each block needs (4 bands, split 0, 720p: rows computed / kept - 1 is 87%, 40%, 17%, 6% in
      up_blocks[0..3], not 87% in all).
    - time: blocks after the last temporal upsample mix frames only through their causal caches, so they run one
      output frame at a time (each conv then sees cache + 1 frame, as diffusers does for a 1-frame chunk): the
      full-resolution working set is one frame, not four.
    """
    keep0, keep1, lo, hi = rows
    blocks = decoder.up_blocks
    tail = 1 + max((k for k, b in enumerate(blocks) if _time_upsampling(b)),
                   default=-1)  # first block that mixes no frames itself
    tail = max(tail, split)

    def run(x, k, keep0, keep1, lo, hi, idx):
        if k > split:
            x, lo, hi = _crop(x, lo, hi, keep0, keep1, halos[k])
        x = blocks[k](x, feat_cache=cache, feat_idx=idx, first_chunk=first)
        parts = _upsample_parts(blocks[k])
        s = parts[0] if parts is not None else 1
        return x, keep0 * s, keep1 * s, lo * s, hi * s

    idx = [0]
    for k in range(split, tail):  # [1, C, t, r, w] -> [1, C', t', r', w'], t' = 2t in a temporal upsample
        x, keep0, keep1, lo, hi = run(x, k, keep0, keep1, lo, hi, idx)
    tail_idx = idx[0]
    for j in range(x.shape[2]):
        idx[0] = tail_idx  # every frame runs the same convs, each with its own cache entry
        y, k0, k1, y0, y1 = x[:, :, j:j + 1], keep0, keep1, lo, hi
        for k in range(tail, len(blocks)):
            y, k0, k1, y0, y1 = run(y, k, k0, k1, y0, y1, idx)
        y = decoder.nonlinearity(decoder.norm_out(y))
        yield _cached_causal_conv(decoder.conv_out, y, cache, idx), y0


def _check_supported(vae_model: nn.Module, split: int, bands: int, order: str = "frame") -> None:
    if bands < 1:
        raise ValueError(f"decode_banded needs bands >= 1, got {bands}")
    if order not in ("frame", "band"):
        raise ValueError(f"decode_banded order must be 'frame' or 'band', got {order!r}")
    layout = (bool(vae_model.config.is_residual), vae_model.config.patch_size)
    if layout not in ((False, None), (True, 2)):
        raise ValueError("decode_banded supports the Wan 2.1 VAE (is_residual=False, no patch_size) and the Wan 2.2 "
                         f"VAE (is_residual=True, patch_size 2), not is_residual={layout[0]}, patch_size={layout[1]}")
    if not 0 <= split < len(vae_model.decoder.up_blocks):
        raise ValueError(f"split must index an up block (0..{len(vae_model.decoder.up_blocks) - 1}), got {split}")


@torch.no_grad()
def decode_banded(vae_model: nn.Module, z: torch.Tensor, bands: int, split: int | None = None,
                  halo: int | None = None, order: str = "frame") -> torch.Tensor:
    """`vae_model.decode(z).sample` of a Wan 2.1 / 2.2 AutoencoderKLWan, decoded in `bands` bands of rows.

    z: un-normalised latent [1, z_dim, T, h, w] in the model's dtype -> video [1, 3, 1 + 4(T - 1), 8h, 8w] (2.2:
    16h, 16w) clamped to [-1, 1]. Rows are banded from up_blocks[split] on, each band read with `halo` extra rows
    (default: halo_rows).
    order "frame": per latent frame, the trunk then every band (all bands' caches live; split default 2).
    order "band": the trunk over all frames first (its outputs kept), then per band all frames, only that band's
    caches live, each block's input cropped to the rows still needed (split default 0). See the module docstring.
    """
    split = DEFAULT_SPLIT_BY_ORDER.get(order, DEFAULT_SPLIT) if split is None else split
    _check_supported(vae_model, split, bands, order)
    decoder = vae_model.decoder
    halo = halo_rows(decoder, split) if halo is None else halo
    _, _, n_latent, h, w = z.shape
    scale = _row_scale(decoder, split)  # output rows per row at the split resolution
    rows = h * _row_scale(decoder, 0) // scale
    plan = _band_plan(rows, bands, halo)
    n_time_up = sum(_time_upsampling(b) for b in decoder.up_blocks)
    patch = vae_model.config.patch_size or 1
    out = torch.empty(1, decoder.conv_out.out_channels // patch ** 2, 1 + 2 ** n_time_up * (n_latent - 1),
                      rows * scale * patch, w * _row_scale(decoder, 0) * patch, dtype=decoder.conv_out.weight.dtype,
                      device=z.device)

    x = vae_model.post_quant_conv(z)  # 1x1x1 conv, no cache: all frames at once, as diffusers (latent-sized)
    trunk_cache = [None] * _cache_slots(decoder.conv_in, decoder.mid_block, *decoder.up_blocks[:split])
    band_slots = _cache_slots(*decoder.up_blocks[split:], decoder.conv_out)
    if order == "band":
        return _decode_band_major(decoder, x, trunk_cache, band_slots, plan, split, rows, out, patch)
    band_caches = [[None] * band_slots for _ in plan]
    scale *= patch  # video rows per split row
    t0 = 0  # first output frame of the current latent frame
    for i in range(n_latent):
        first = i == 0
        feats = _run_trunk(decoder, x[:, :, i:i + 1], trunk_cache, split, first)  # [1, C, t, rows, cols]
        for (keep0, keep1, in0, in1), cache in zip(plan, band_caches):
            # the band's intermediates die when _run_band returns; y is its 3-channel output
            y = _run_band(decoder, feats[:, :, :, in0:in1], cache, split, first)
            y = _unpatchify(y, patch)  # [1, 3, t', band rows * scale, W]
            kept = y[:, :, :, (keep0 - in0) * scale:(keep1 - in0) * scale]
            out[:, :, t0:t0 + y.shape[2], keep0 * scale:keep1 * scale].copy_(kept).clamp_(-1.0, 1.0)
        t0 += y.shape[2]
        del feats, y  # before the next frame's trunk
    return out


def _decode_band_major(decoder: nn.Module, x: torch.Tensor, trunk_cache: list, band_slots: int, plan: list,
                       split: int, rows: int, out: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """order="band" of decode_banded: x [1, z, T, h, w] after post_quant_conv; fills and returns `out`."""
    # Trunk once, time-major, keeping its output per latent frame ([1, C, t, rows, cols]; split 0, 720p, fp32: 384 x
    # 1 x 90 x 160 = 22 MB a frame, 0.46 GB for 81 frames). Recomputing it per band instead would cost (bands - 1)
    # trunk runs and keep its caches alive in every band (see the module docstring).
    feats = [_run_trunk(decoder, x[:, :, i:i + 1], trunk_cache, split, i == 0) for i in range(x.shape[2])]
    del trunk_cache[:], x  # the trunk's caches (the caller's list) go before the first band
    halos = [halo_rows(decoder, k) for k in range(len(decoder.up_blocks))]
    scale = out.shape[3] // rows  # video rows per split row (the unpatchify's included)
    for keep0, keep1, in0, in1 in plan:
        cache = [None] * band_slots  # this band's causal caches only
        a, b, t = keep0 * scale, keep1 * scale, 0  # kept output rows, output frame
        for i, f in enumerate(feats):
            for y, lo in _band_frames(decoder, f[:, :, :, in0:in1], cache, split, i == 0, (keep0, keep1, in0, in1),
                                      halos):  # y [1, 3 * p * p, 1, rows y holds, W / p], its first row lo
                y, lo = _unpatchify(y, patch), lo * patch
                out[:, :, t:t + 1, a:b].copy_(y[:, :, :, a - lo:b - lo]).clamp_(-1.0, 1.0)
                t += 1
        del cache  # freed before the next band's
    return out
