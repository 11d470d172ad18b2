"""Reading the first frame of an image-to-video run: one RGB PIL image per file, checked before any model loads.

The reference opens the file with Pillow and converts it to RGB (`Image.open(path).convert("RGB")`); ordinary 8-bit
RGB, grey, palette or CMYK images become exactly what it gets. Where that call would silently give a wrong picture
we decide, and record the decision in the image's `notes` (the CLI logs them as warnings):
- EXIF orientation: the image is turned upright as every viewer shows it (the reference ignores the tag, so a phone
  photo held upright would start a sideways video).
- 16-bit images: reduced to their high byte per channel. Pillow already does this for 16-bit RGB(A) PNGs; a 16-bit
  grey image would otherwise be clipped to 255 (nearly white) by the reference's conversion.
- An alpha channel is dropped, as the reference does: transparent areas show whatever colour they store.
Refused with one line (`ImageInputError`): a missing or unreadable file, a file that is no image Pillow reads, a
truncated image, one smaller than MIN_SIDE pixels on a side, one larger than MAX_PIXELS (decoding it would take
gigabytes), and floating-point images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_SIDE = 16  # pixels: smaller images carry too little to condition a video on (a 1x1 image is one colour)
MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning limit (0.27 GB as RGB)
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageInputError(ValueError):
    """An image file cannot be used; the message names the file and the fix."""


@dataclass
class LoadedImage:
    image: object  # PIL.Image.Image, mode RGB
    notes: list[str] = field(default_factory=list)  # what was changed beyond the reference's convert("RGB")

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_image(path, flag: str = "--image") -> LoadedImage:
    """Open, check and fully decode `path`; returns the RGB image and the notes of what was changed."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageInputError(f"{flag} {p} does not exist")
    if not p.is_file():
        raise ImageInputError(f"{flag} {p} is not a file")
    try:
        img = Image.open(p)
    except UnidentifiedImageError:
        raise ImageInputError(f"{flag} {p} is not an image Pillow can read; pass a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{flag} {p} is too large to decode (more than {MAX_PIXELS / 1e6:.0f} megapixels); "
                              "downscale it") from None
    except OSError as exc:
        raise ImageInputError(f"{flag} {p} cannot be read ({exc.strerror or _first_line(exc)})") from None
    with img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise ImageInputError(f"{flag} {p} is too large to decode ({w}x{h}, {w * h / 1e6:.0f} megapixels; at "
                                  f"most {MAX_PIXELS / 1e6:.0f}); downscale it")
        if min(w, h) < MIN_SIDE:
            raise ImageInputError(f"{flag} {p} is {w}x{h} pixels: too small to start a video from (at least "
                                  f"{MIN_SIDE} on each side)")
        try:
            img.load()
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or damaged data
            raise ImageInputError(f"{flag} {p} cannot be decoded ({_first_line(exc)}); the file is damaged or "
                                  "truncated") from None
        return _to_rgb(img, p, flag)


def _to_rgb(img, path: Path, flag: str) -> LoadedImage:
    from PIL import Image, ImageOps

    notes = []
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"turned upright by its EXIF orientation {orientation} (the reference ignores the tag)")
    if img.mode == "F":
        raise ImageInputError(f"{flag} {path} is a floating-point image; save it as an 8- or 16-bit PNG or a JPEG")
    if img.mode in _16_BIT_MODES:
        values = np.asarray(img, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageInputError(f"{flag} {path} holds 32-bit integer pixels; save it as an 8- or 16-bit PNG")
        img = Image.fromarray((values >> 8).astype(np.uint8), mode="L")
        notes.append("16-bit grey reduced to 8 bits (its high byte, as Pillow reads 16-bit RGB PNGs)")
    elif img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        notes.append("alpha channel ignored, as the reference does (transparent areas show their stored colour)")
    return LoadedImage(img.convert("RGB"), notes)
