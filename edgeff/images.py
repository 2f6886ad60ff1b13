"""A user's image files, read safely (torch-free): what the CLI's image folders and examples go through.

- Only regular files are opened: a FIFO, device or socket named like an image is refused, never waited on
  (the file is opened non-blocking and checked with ``fstat``, so a swap after listing changes nothing).
- An image above ``max_pixels()`` (width × height from its header, before it is decoded) is refused in one
  line; the limit is ``--max-pixels`` on the commands that read images, or ``set_max_pixels``.
- 16-bit and 32-bit integer images are scaled to 8 bits by their full range (65535 -> 255), float images in
  [0, 1] by 255; float images outside [0, 1] are refused (their scale is unknown). Nothing is clipped.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np

from edgeff.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to ~160 MB as RGBA
_max_pixels = DEFAULT_MAX_PIXELS


def max_pixels() -> int:
    """The largest width × height an image may have."""
    return _max_pixels


def set_max_pixels(n: int) -> None:
    """Change the pixel limit for this process (``--max-pixels``)."""
    global _max_pixels
    if n < 1:
        raise InputError(f"the pixel limit must be >= 1, got {n}")
    _max_pixels = int(n)


def image_files(path: str | Path) -> list[Path]:
    """The image files in ``path``, in reading order: the file itself, or a folder's regular files with an
    image suffix, sorted by name (sub-folders, FIFOs, devices and sockets are not image files)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return [p]
    return sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())


def read_image(path: str | Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    """One image file as uint8 (C, H, W): converted to the model's channels and resized to its H × W.

    Raises:
        InputError: not a regular file, unreadable, above the pixel limit, or a float image outside [0, 1].
    """
    from PIL import Image

    c, h, w = input_shape
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block a plain open() until a writer came
    except OSError as e:
        raise InputError(f"cannot open the image {path} ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path} is not a regular file (a FIFO, device or socket); an image folder holds "
                             "image files only")
        with os.fdopen(fd, "rb") as fh:
            fd = -1
            limit = max_pixels()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
                old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    im = Image.open(fh)
                finally:
                    Image.MAX_IMAGE_PIXELS = old
            with im:
                iw, ih = im.size
                if iw * ih > limit:
                    raise InputError(f"the image {path} is {iw}x{ih} ({iw * ih / 1e6:.1f} megapixels), above the "
                                     f"{limit / 1e6:g}-megapixel limit; shrink it, or raise the limit with "
                                     "--max-pixels")
                if im.format == "JPEG":
                    im.draft("L" if c == 1 else "RGB", (w, h))  # decode at a reduced scale where JPEG allows
                im = _eight_bit(im, path)
                im = im.convert("L" if c == 1 else "RGB").resize((w, h))
                a = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: OSError
        if isinstance(e, InputError):
            raise
        raise InputError(f"cannot read the image {path} ({type(e).__name__}); remove or replace it") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return a[None] if c == 1 else a.transpose(2, 0, 1)


def _eight_bit(im, path: Path):  # type: ignore[no-untyped-def]
    """``im`` with 8 bits per channel: wide integer modes scaled by their full range, floats in [0, 1] by 255."""
    from PIL import Image

    if im.mode.startswith("I;16"):
        scale = 65535.0
    elif im.mode == "I":
        scale = None  # 32-bit signed: the 16-bit range when every value fits it, else the 32-bit one
    elif im.mode == "F":
        scale = 1.0
    else:
        return im  # 8-bit modes (and Pillow's 16-bit RGB, read from its high bytes) convert as they are
    a = np.asarray(im).astype(np.float64)
    if a.size and (not np.isfinite(a).all() or a.min() < 0):
        raise InputError(f"the image {path} holds negative or non-finite values; save it as 8- or 16-bit")
    if scale is None:
        scale = 65535.0 if a.max(initial=0) <= 65535 else 2.0**31 - 1
    elif im.mode == "F" and a.max(initial=0) > 1.0:
        raise InputError(f"the float image {path} has values above 1 ({a.max():.4g}); save floats in [0, 1] or "
                         "8/16-bit integers")
    return Image.fromarray(np.rint(a * (255.0 / scale)).astype(np.uint8), "L")
