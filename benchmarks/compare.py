"""Compare two outputs of the same seed and prompt, e.g. the original path's and --fast's, made with real weights.

    python -m benchmarks.compare original.mp4 fast.mp4
    python -m benchmarks.compare original_latent.pt fast_latent.pt     # tensors saved with torch.save

Videos: per-frame PSNR (dB, 8-bit) and SSIM (Gaussian window, luma), plus max / mean absolute pixel difference.
Tensors: max / mean absolute difference and the relative L2 difference.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F


def read_video(path: str) -> np.ndarray:
    """[T, H, W, 3] uint8."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(path, "ffmpeg")
    try:
        return np.stack(list(reader.iter_data()))
    finally:
        reader.close()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR of [T, H, W, C] uint8-range tensors (inf where identical)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM on luma (BT.601), 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x, y = (u.double() @ w for u in (a, b))  # [T, H, W]
    x, y = x[:, None], y[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :])[None, None]

    def blur(z):
        return F.conv2d(z, win)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def compare_videos(a: np.ndarray, b: np.ndarray) -> dict:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {a.shape} vs {b.shape}; compare outputs of the same size and frames")
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    p, s = psnr(ta, tb), ssim(ta, tb)
    d = (ta.double() - tb.double()).abs()
    finite = p[torch.isfinite(p)]
    return {"frames": int(a.shape[0]), "psnr_mean_db": float(finite.mean()) if len(finite) else float("inf"),
            "psnr_min_db": float(p.min()), "ssim_mean": float(s.mean()), "ssim_min": float(s.min()),
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.shape != b.shape:
        raise ValueError(f"tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = (a.double() - b.double()).abs()
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "rel_l2_diff": float(d.norm() / b.double().norm())}


def load_tensor(path: str) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):  # benchmarks.rows --save files hold {"latent", "pred"}
        obj = obj.get("latent", next(iter(obj.values())))
    return obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="reference: .mp4, or a tensor file (.pt / .pth)")
    p.add_argument("b", help="candidate, same kind")
    args = p.parse_args(argv)
    try:
        if args.a.endswith(".mp4") and args.b.endswith(".mp4"):
            result = compare_videos(read_video(args.a), read_video(args.b))
        elif not args.a.endswith(".mp4") and not args.b.endswith(".mp4"):
            result = compare_tensors(load_tensor(args.a), load_tensor(args.b))
        else:
            raise ValueError("compare two .mp4 files or two tensor files, not one of each")
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
