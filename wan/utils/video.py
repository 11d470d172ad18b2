"""Output naming and safe, atomic mp4 writing (reference generate.py / utils.save_video)."""
from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

import torch


class OutputPathError(ValueError):
    """The output path is unusable; the message says how to fix it."""


def default_save_name(task: str, size: str, ulysses_size: int, prompt: str, now=None) -> str:
    """Reference name: {task}_{size}_{ulysses}_{prompt[:50] with ' ','/' -> '_'}_{YYYYmmdd_HHMMSS}.mp4."""
    now = datetime.now() if now is None else now
    formatted_prompt = prompt.replace(" ", "_").replace("/", "_")[:50]
    size_str = size.replace("*", "x") if sys.platform == "win32" else size  # '*' kept off Windows
    return f"{task}_{size_str}_{ulysses_size}_{formatted_prompt}_{now.strftime('%Y%m%d_%H%M%S')}.mp4"


def check_output_path(path, overwrite: bool = False) -> Path:
    """Validate before generating, so a long run cannot end in 'save failed'."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise OutputPathError(f"output file {str(path)!r} must end in .mp4; choose a .mp4 name")
    parent = path.parent  # Path("out.mp4").parent == Path(".")
    if not parent.exists():
        raise OutputPathError(f"output directory {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise OutputPathError(f"output directory {str(parent)!r} is not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"output directory {str(parent)!r} is not writable; choose another directory")
    if path.is_dir():
        raise OutputPathError(f"output path {str(path)!r} is a directory; choose a file name")
    if path.exists() and not overwrite:
        raise OutputPathError(f"output file {str(path)!r} exists; pass --overwrite to replace it")
    return path


def _to_frames(video: torch.Tensor):
    """[3,T,H,W] in [-1,1] -> uint8 numpy [T,H,W,3], as the reference's make_grid path."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W], got {tuple(video.shape)}")
    x = video.detach().to("cpu", torch.float32).clamp(-1, 1)
    x = (x + 1) / 2                                     # make_grid(normalize, value_range=(-1,1))
    x = (x * 255).to(torch.uint8)                       # truncation, not rounding (as reference)
    return x.permute(1, 2, 3, 0).contiguous().numpy()   # [T,H,W,3]


def _get_writer(tmp: str, fps: int, macro_block_size: int):
    try:
        import imageio_ffmpeg  # noqa: F401  (imageio's FFMPEG plugin needs it)
    except ImportError:
        raise ImportError("writing mp4 needs imageio-ffmpeg: pip install imageio-ffmpeg") from None
    import imageio.v2 as iio
    # libx264 quality=8 -> crf 10, yuv420p (reference settings).
    return iio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                          pixelformat="yuv420p", macro_block_size=macro_block_size)


def save_video(video: torch.Tensor, path, fps: int = 16, overwrite: bool = False) -> Path:
    """Write video [3,T,H,W] in [-1,1] to `path` atomically; returns the final Path.

    Written to a hidden temp .mp4 in the same directory, fsynced, then published with
    os.replace (overwrite) or os.link (no-clobber, race-free). The temp is always removed.
    """
    path = check_output_path(path, overwrite)
    frames = _to_frames(video)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p (multiples of 16 recommended)")
    # 16 when divisible (no-op); otherwise 1 so imageio-ffmpeg never rescales silently.
    mbs = 16 if (h % 16 == 0 and w % 16 == 0) else 1

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")  # must end in .mp4 for imageio
    try:
        writer = _get_writer(str(tmp), fps, mbs)
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_no_clobber(tmp, path)
        _fsync_dir(path.parent)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return path


def _publish_no_clobber(tmp: Path, path: Path) -> None:
    exists = OutputPathError(f"output file {str(path)!r} exists; pass --overwrite to replace it")
    try:
        os.link(tmp, path)  # atomic; fails if the target appeared meanwhile
        return
    except FileExistsError:
        raise exists from None
    except OSError:
        pass  # filesystem without hard links: fall back below
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))  # reserve the name
    except FileExistsError:
        raise exists from None
    try:
        os.replace(tmp, path)  # replaces only our own empty placeholder
    except BaseException:
        os.unlink(path)  # do not leave an empty placeholder that looks like a result
        raise


def _fsync_dir(d: Path) -> None:
    # Persist the directory entry (POSIX); best effort elsewhere.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
