"""Output naming and safe, atomic mp4 writing (reference generate.py / utils.save_video).

Test hook: WAN_TEST_WRITE_DELAY_S (seconds, default 0) sleeps between frames while writing, so tests can send a
signal while the temporary file exists. It is read only here and has no other effect.
"""
from __future__ import annotations

import errno
import os
import secrets
import sys
import time
import unicodedata
from datetime import datetime
from pathlib import Path

import torch

WRITE_DELAY_ENV = "WAN_TEST_WRITE_DELAY_S"
PROMPT_NAME_CHARS, PROMPT_NAME_BYTES = 50, 100  # the reference keeps prompt[:50]; we also bound the UTF-8 bytes
_TMP_TOKEN_HEX = 8  # fixed width, so a probe name has exactly the temporary file's length
_LIVE_TEMP_FILES: set[Path] = set()  # temporary videos being written (removed on a hard exit too)


class OutputPathError(ValueError):
    """The output path is unusable; the message says how to fix it."""


class OutputRaceError(OutputPathError):
    """The target appeared while the video was being written; nothing was replaced."""


def safe_name_part(text: str, max_chars: int = PROMPT_NAME_CHARS, max_bytes: int = PROMPT_NAME_BYTES) -> str:
    """A prompt as a file-name fragment: whitespace and path separators -> '_' (the reference replaces ' ' and '/'),
    control, format and other invisible characters dropped, at most `max_chars` characters and `max_bytes` UTF-8
    bytes (cut on a character boundary), so long emoji prompts cannot make the name too long for the filesystem."""
    bad = set("/\\") | (set('<>:"|?*') if sys.platform == "win32" else set())
    out = []
    for ch in text:
        if ch.isspace() or ch in bad:
            out.append("_")
        elif unicodedata.category(ch)[0] != "C":  # Cc control, Cf format (zero-width ...), Cs, Co, Cn
            out.append(ch)
    part, size = "", 0
    for ch in "".join(out)[:max_chars]:
        n = len(ch.encode("utf-8", "surrogatepass"))
        if size + n > max_bytes:
            break
        part, size = part + ch, size + n
    return part


def default_save_name(task: str, size: str, ulysses_size: int, prompt: str, now=None, index: int | None = None) -> str:
    """Reference name: {task}_{size}_{ulysses}_{prompt[:50] with ' ','/' -> '_'}_{YYYYmmdd_HHMMSS}.mp4.

    With `index` (batch mode): {task}_{size}_{index:04d}_{prompt...}_{timestamp}.mp4. The prompt part is
    `safe_name_part(prompt)`: bounded in bytes, no path separators or control characters.
    """
    now = datetime.now() if now is None else now
    formatted_prompt = safe_name_part(prompt)
    size_str = size.replace("*", "x") if sys.platform == "win32" else size  # '*' kept off Windows
    middle = f"{index:04d}" if index is not None else f"{ulysses_size}"
    return f"{task}_{size_str}_{middle}_{formatted_prompt}_{now.strftime('%Y%m%d_%H%M%S')}.mp4"


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden temporary file next to `path`; it must end in .mp4 for imageio. Fixed length for a given path.
    `kind` is "tmp" (the video being written) or "prb" (the writability probe): same length, told apart by name."""
    assert len(kind) == 3, kind
    return path.with_name(f".{path.name}.{secrets.token_hex(_TMP_TOKEN_HEX // 2)}.{kind}.mp4")


def _os_reason(exc: OSError) -> str:
    reasons = {errno.ENAMETOOLONG: "the file name is too long for this filesystem",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "the filesystem is read-only", errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "the folder cannot hold new files"}
    return reasons.get(exc.errno, exc.strerror or type(exc).__name__)


def probe_writable(path: Path) -> None:
    """Create and remove a real file next to `path` whose name has the temporary file's length, so read-only places,
    names too long for the filesystem and other OS refusals show up before any work is done."""
    probe = temp_name(path, "prb")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        nbytes = len(os.fsencode(probe.name))
        hint = (f"the temporary file name is {nbytes} bytes; choose a shorter --save_file"
                if exc.errno == errno.ENAMETOOLONG else "choose another folder (--save_file or --save_dir)")
        raise OutputPathError(f"cannot write in {str(path.parent)!r}: {_os_reason(exc)}; {hint}") from None
    try:
        os.close(fd)
    finally:
        os.unlink(probe)


def check_output_path(path, overwrite: bool = False) -> Path:
    """Validate before generating, so a long run cannot end in 'save failed'. Returns the path to write: absolute,
    with symlinks resolved (an existing link, even a dangling one, counts as an existing target)."""
    raw = os.fspath(path)
    try:
        if not raw:
            raise OutputPathError("the output file name is empty; choose a .mp4 name")
        given = Path(os.path.abspath(raw))
        if given.suffix.lower() != ".mp4":
            raise OutputPathError(f"output file {raw!r} must end in .mp4; choose a .mp4 name")
        if os.path.islink(given):
            target = os.path.realpath(given)
            if not overwrite:
                raise OutputPathError(f"output file {raw!r} exists (a symlink to {target!r}); pass --overwrite to "
                                      "replace what it points to")
        resolved = Path(os.path.realpath(given))
        parent = resolved.parent
        if not parent.exists():
            raise OutputPathError(f"output directory {str(parent)!r} does not exist; create it first")
        if not parent.is_dir():
            raise OutputPathError(f"output directory {str(parent)!r} is not a directory; choose another path")
        if resolved.is_dir():
            raise OutputPathError(f"output path {raw!r} is a directory; choose a file name")
        if os.path.lexists(resolved):
            if not overwrite:
                raise OutputPathError(f"output file {raw!r} exists; pass --overwrite to replace it")
            if not resolved.is_file():
                raise OutputPathError(f"output path {raw!r} exists and is not a regular file; choose another name")
        probe_writable(resolved)
    except ValueError as exc:  # e.g. an embedded NUL byte
        if isinstance(exc, OutputPathError):
            raise
        raise OutputPathError(f"output file {raw!r} is not a usable path ({exc})") from None
    return resolved


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
    os.replace (overwrite) or os.link (no-clobber, race-free). The temp is always removed, also when a signal
    (KeyboardInterrupt) arrives during the write. A target that appeared meanwhile raises OutputRaceError.
    """
    path = check_output_path(path, overwrite)
    frames = _to_frames(video)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p (multiples of 16 recommended)")
    # 16 when divisible (no-op); otherwise 1 so imageio-ffmpeg never rescales silently.
    mbs = 16 if (h % 16 == 0 and w % 16 == 0) else 1

    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0)  # test hook (see the module docstring)
    tmp = temp_name(path)
    _LIVE_TEMP_FILES.add(tmp)
    try:
        writer = _get_writer(str(tmp), fps, mbs)
        try:
            for frame in frames:
                writer.append_data(frame)
                if delay:
                    time.sleep(delay)
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
        _LIVE_TEMP_FILES.discard(tmp)
    return path


def remove_temp_files() -> None:
    """Remove the temporary videos still being written (for an exit that skips the normal clean-up)."""
    for tmp in list(_LIVE_TEMP_FILES):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _LIVE_TEMP_FILES.discard(tmp)


def _publish_no_clobber(tmp: Path, path: Path) -> None:
    exists = OutputRaceError(f"output file {str(path)!r} appeared while the video was being written (another "
                             "run?); it was left untouched and this video was not saved; pass --overwrite to "
                             "replace it")
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
