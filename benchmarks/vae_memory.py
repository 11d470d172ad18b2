"""Live-tensor peak and work of the Wan 2.1 VAE decode (and, with --encode, of the I2V condition's encode), counted on
CPU with no weights and no GPU; `--vae 2.2`: the Wan 2.2 VAE of TI2V-5B (dims 160 / 256, z 48, 4x16x16).

    python -m benchmarks.vae_memory --size 1280x720 --frames 81 --dtype fp32,bf16 --out vae_memory.json
    python -m benchmarks.vae_memory --encode --size 1280x720 --frames 81 --dtype fp32,bf16 --out vae_encode.json
    python -m benchmarks.vae_memory --vae 2.2 --size 1280x704 --frames 121 --orders band --bands 4 --out v22.json

The full-size VAE (base_dim 96, z_dim 16) is built on the meta device, where every op runs on shapes only. A
TorchDispatchMode sees each aten op's outputs and tracks their storages by weak reference: the peak is the largest
sum of live storage bytes right after an allocation (no allocator rounding or slack, no cuDNN / conv workspaces,
weights not counted), and the work is the multiply-adds of the convolutions and the attention. Cases: diffusers'
whole-frame decode (`vae.decode`), and `decode_banded` in frame order and band order for each split and band count.

Attention: on the meta device `scaled_dot_product_attention` falls back to the math path, which materialises the
[L, L] score matrix of the mid block (L = 90 x 160 latent pixels at 720p: 0.77 GiB fp32, 14 400^2 x 4 bytes). CUDA
runs this head size (384) on the memory-efficient fused kernel, which never does. So by default a TorchFunctionMode
replaces the call with what the fused kernel allocates (its output and its fp32 log-sum-exp); --math_attention keeps
the decomposition.

Meta kernels of elementwise ops run in Python; the counter reuses an op's output metadata for a repeated call with
the same input metadata, so the whole 1280x720x81 grid (2 dtypes, both orders, splits 0-2, 2-8 bands) takes about 4
minutes on one CPU core, one band-order case 2-12 s.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wan.modules.vae import build_wan_vae
from wan.modules.vae2_2 import build_wan22_vae
from wan.modules.vae_bands import DEFAULT_SPLIT_BY_ORDER, _band_plan, _row_scale, decode_banded, halo_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """Peak of the summed bytes of live tensor storages created under the mode, and conv / attention MACs."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage pointer -> (weak ref, bytes)
        self.total = 0  # bytes of self.live, possibly counting storages that died since the last sweep
        self.peak = 0
        self.macs = 0
        self.shapes: dict = {}  # functional op + input metadata -> output (shape, stride, dtype)

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in dead:
            self.total -= self.live.pop(key)[1]

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref.cdata in self.live:  # a view, or an in-place / out= result
            return
        self.live[ref.cdata] = (ref, storage.nbytes())
        self.total += storage.nbytes()
        if self.total > self.peak:  # a possible new peak: make the total exact first
            self._sweep()
            self.peak = max(self.peak, self.total)

    def _key(self, func, args, kwargs):
        """A hashable key of a functional op's call on meta tensors, or None (views, in-place, several outputs)."""
        schema = func._schema
        if schema.is_mutable or len(schema.returns) != 1 or schema.returns[0].alias_info is not None:
            return None
        try:
            return func, _meta_key(args), _meta_key(tuple(sorted(kwargs.items())))
        except TypeError:  # a tensor off the meta device, or an unhashable argument
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Meta kernels of elementwise ops run in Python (torch._refs); the decode repeats a few hundred distinct
        # calls thousands of times, so reuse the output's metadata (exact: it depends on the inputs' only).
        key = self._key(func, args, kwargs)
        hit = self.shapes.get(key) if key is not None else None
        if hit:
            out = torch.empty_strided(hit[0], hit[1], dtype=hit[2], device="meta")
        else:
            out = func(*args, **kwargs)
            if key is not None and hit is None and isinstance(out, torch.Tensor):
                # an unannotated alias (e.g. _unsafe_view) shares an input's storage: never replay it (False)
                ptr = out.untyped_storage()._cdata  # the StorageImpl (meta data pointers are all 0)
                fresh = all(t.untyped_storage()._cdata != ptr
                            for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
                self.shapes[key] = (out.shape, out.stride(), out.dtype) if fresh else False
        if func is torch.ops.aten.convolution.default:
            self.macs += out.numel() * args[1][0].numel()  # weight [Cout, Cin / groups, *kernel]
        elif func is torch.ops.aten.bmm.default:  # the math attention path only
            self.macs += out.numel() * args[0].shape[-1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _meta_key(value):
    """Hashable stand-in of an op argument: meta tensors by (shape, stride, offset, dtype); raises TypeError else."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise TypeError("not a meta tensor")
        return tuple(value.shape), value.stride(), value.storage_offset(), value.dtype
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_meta_key(v) for v in value)
    hash(value)
    return type(value), value  # 2 and 2.0 hash alike


class FusedAttention(TorchFunctionMode):
    """scaled_dot_product_attention as the fused CUDA kernels allocate it: the output and a [B, H, L] fp32 log-sum-exp
    (values are not computed; on meta there are none)."""

    def __init__(self, counter: LiveBytes):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(*q.shape[:-1], dtype=torch.float32)  # alive with out, as in the kernel
        self.counter.macs += q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        del lse
        return out


def count(fn, fused_attention: bool = True) -> dict:
    """Run fn() under the counter; {"peak_bytes", "macs"} of what it allocated (its result included)."""
    counter = LiveBytes()
    with torch.no_grad(), counter:
        if fused_attention:
            with FusedAttention(counter):
                result = fn()
        else:
            result = fn()
        del result
    return {"peak_bytes": counter.peak, "macs": counter.macs}


VAES = {"2.1": lambda: build_wan_vae(96, 16, device="meta"),
        "2.2": lambda: build_wan22_vae(160, 256, 48, device="meta")}


def meta_vae(dtype: torch.dtype, version: str = "2.1"):
    vae = VAES[version]().eval().requires_grad_(False)
    return vae._apply(lambda t: t.to(dtype))  # nn.Module's cast: ModelMixin.to warns about fp32 modules


def _latent_shape(vae, width: int, height: int, frames: int) -> tuple[int, ...]:
    s = vae.config.scale_factor_spatial
    return (1, vae.config.z_dim, 1 + (frames - 1) // 4, height // s, width // s)


def rows_overhead(decoder, height: int, split: int, bands: int, cropped: bool, patch: int = 1) -> list[float]:
    """Rows computed / rows kept - 1 in each banded up block (frame order: every block computes the split's halo;
    band order: each block's input is cropped to its own halo_rows)."""
    rows = height // (8 * patch) * _row_scale(decoder, 0) // _row_scale(decoder, split)
    plan = _band_plan(rows, bands, halo_rows(decoder, split))
    result = []
    for k in range(split, len(decoder.up_blocks)):
        s = _row_scale(decoder, split) // _row_scale(decoder, k)  # block k's input rows per split row
        if cropped and k > split:
            h = halo_rows(decoder, k)
            n = sum(min(rows * s, b * s + h) - max(0, a * s - h) for a, b, _, _ in plan)
        else:
            n = sum((i1 - i0) * s for _, _, i0, i1 in plan)
        result.append(n / (rows * s) - 1)
    return result


def measure(width: int, height: int, frames: int, dtype: str, order: str = "whole", split: int | None = None,
            bands: int = 1, fused_attention: bool = True, vae=None) -> dict:
    """One decode of a [1, z, 1 + (frames - 1) // 4, height / s, width / s] latent on the meta device (s = 8 for the
    Wan 2.1 VAE, 16 for 2.2)."""
    vae = meta_vae(DTYPES[dtype]) if vae is None else vae
    shape = _latent_shape(vae, width, height, frames)

    def run():
        z = torch.empty(shape, dtype=DTYPES[dtype], device="meta")
        if order == "whole":
            return vae.decode(z).sample
        return decode_banded(vae, z, bands, split, order=order)

    t0 = time.perf_counter()
    rec = count(run, fused_attention)
    rec.update(size=f"{width}x{height}", frames=frames, dtype=dtype, order=order, split=split, bands=bands,
               peak_gib=rec["peak_bytes"] / GIB, seconds=time.perf_counter() - t0)
    if order != "whole":
        rec["rows_overhead"] = rows_overhead(vae.decoder, height, split, bands, order == "band",
                                             vae.config.patch_size or 1)
    return rec


def measure_encode(width: int, height: int, frames: int, dtype: str, fused_attention: bool = True, vae=None) -> dict:
    """One encode of a [1, 3, frames, height, width] video (the I2V condition: the image, then black frames), the
    input counted (the pipeline builds it on the device)."""
    vae = meta_vae(DTYPES[dtype]) if vae is None else vae

    def run():
        x = torch.empty(1, 3, frames, height, width, dtype=DTYPES[dtype], device="meta")
        return vae.encode(x).latent_dist.mode()

    t0 = time.perf_counter()
    rec = count(run, fused_attention)
    rec.update(size=f"{width}x{height}", frames=frames, dtype=dtype, order="encode", split=None, bands=1,
               peak_gib=rec["peak_bytes"] / GIB, seconds=time.perf_counter() - t0)
    return rec


def cases(orders, splits, bands):
    yield "whole", None, 1
    for order in orders:
        for split in splits:
            for n in bands:
                yield order, split, n


def table(records: list[dict]) -> str:
    lines = ["dtype  order  split  bands  peak GiB  vs whole  work +%  rows + % per banded block"]
    whole = {r["dtype"]: r for r in records if r["order"] == "whole"}
    for r in records:
        w = whole.get(r["dtype"])
        ratio = f"{r['peak_bytes'] / w['peak_bytes']:8.2f}" if w else " " * 8
        work = f"{100 * (r['macs'] / w['macs'] - 1):7.1f}" if w else " " * 7
        rows = " ".join(f"{100 * x:3.0f}" for x in r.get("rows_overhead", []))
        split = "-" if r["split"] is None else r["split"]
        lines.append(f"{r['dtype']:5}  {r['order']:5}  {split!s:>5}  {r['bands']:5}  {r['peak_gib']:8.2f}  {ratio}  "
                     f"{work}  {rows}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the video (multiples of 8)")
    p.add_argument("--frames", type=int, default=81, help="video frames, 1 + 4k")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--orders", default="frame,band", help="decode_banded orders to count")
    p.add_argument("--splits", default="", help="comma-separated splits (default: each order's default)")
    p.add_argument("--bands", default="2,4,8", help="comma-separated band counts")
    p.add_argument("--math_attention", action="store_true", help="count the math attention path's score matrix")
    p.add_argument("--encode", action="store_true", help="count the encode of a video of this size instead")
    p.add_argument("--vae", default="2.1", choices=sorted(VAES), help="2.1 (A14B tasks) or 2.2 (TI2V-5B)")
    p.add_argument("--out", help="write the records as JSON here")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    align = 8 if args.vae == "2.1" else 16
    if width % align or height % align or (args.frames - 1) % 4:
        p.error(f"--size must be multiples of {align} and --frames 1 + 4k")
    orders = [o for o in args.orders.split(",") if o]
    records = []
    if args.encode:
        for dtype in args.dtype.split(","):
            records.append(measure_encode(width, height, args.frames, dtype, not args.math_attention,
                                          meta_vae(DTYPES[dtype], args.vae)))
            print(f"  {dtype} encode: {records[-1]['peak_gib']:.2f} GiB ({records[-1]['seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
        print(f"{width}x{height}x{args.frames} encode, live-tensor peaks (input included; no weights, no allocator "
              "slack, no workspaces)")
        for r in records:
            print(f"{r['dtype']:5}  encode  {r['peak_gib']:8.2f} GiB  {r['macs'] / 1e12:.1f} TMAC")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"size": args.size, "frames": args.frames, "vae": args.vae,
                           "fused_attention": not args.math_attention, "records": records}, f, indent=1)
        return 0
    for dtype in args.dtype.split(","):
        vae = meta_vae(DTYPES[dtype], args.vae)
        for order in ["whole", *orders]:
            splits = (_ints(args.splits) or [DEFAULT_SPLIT_BY_ORDER[order]]) if order != "whole" else [None]
            for split in splits:
                for bands in (_ints(args.bands) if order != "whole" else [1]):
                    rec = measure(width, height, args.frames, dtype, order, split, bands,
                                  not args.math_attention, vae)
                    records.append(rec)
                    print(f"  {dtype} {order} split {split} bands {bands}: {rec['peak_gib']:.2f} GiB "
                          f"({rec['seconds']:.1f} s)", file=sys.stderr, flush=True)
    print(f"{width}x{height}x{args.frames}, live-tensor peaks (no weights, no allocator slack, no workspaces); "
          f"work = conv + attention MACs over the whole-frame decode's")
    print(table(records))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"size": args.size, "frames": args.frames, "vae": args.vae,
                       "fused_attention": not args.math_attention, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
