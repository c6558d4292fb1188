"""Loading one image file into a plain 8-bit RGB picture, or saying exactly why it can't be used.

Everything graft feeds a model goes through :func:`load_image`, so that training, evaluation and
the folder scanner agree on which files are usable and on what their pixels are: whatever the file's
mode (grayscale, palette, transparency, CMYK, 16-bit, float) the result is RGB with EXIF orientation
applied, and any problem with the file is an :class:`ImageError` that names it.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from graft.errors import DataError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
"""File extensions (lower-case, with the dot) that graft treats as images."""

DEFAULT_MAX_PIXELS: int = 89_478_485
"""Pillow's default decompression-bomb limit; an image with more pixels is refused unless raised."""

# Only the decoders for the extensions above (JPEG also covers multi-picture MPO files). Pillow
# would otherwise also identify e.g. EPS, which it renders by running Ghostscript, in a ".jpg".
_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP", "PPM")

_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

# Serialises the rare moments when Pillow's process-wide pixel limit is lifted (see _open).
_PILLOW_LIMIT_LOCK = threading.Lock()

# Pillow warnings graft keeps from the user (see _silence_pillow_warnings), as warnings.filters
# entries: (action, message regex, category, module regex, lineno).
_QUIET_FILTERS = (
    ("ignore", None, Image.DecompressionBombWarning, None, 0),
    ("ignore", None, UserWarning, re.compile(r"PIL\."), 0),
)


class ImageError(DataError):
    """One image file that cannot be used; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:  # survives pickling
        return (type(self), (self.path, self.reason))


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Return the image at ``path`` fully decoded as 8-bit RGB, EXIF orientation applied.

    ``max_pixels`` refuses images with more pixels (judged from the header, before any
    decoding); ``None`` disables the guard. ``draft_size`` lets JPEGs decode at a reduced scale
    whose sides both stay >= ``draft_size`` (much faster when only a small version is needed).
    Animated images give their first frame. Raises :class:`ImageError` naming the file for
    anything that makes it unusable: missing, empty, not an image, truncated or corrupt, too large.
    """
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int or None, not {max_pixels!r}")
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be a positive int or None, not {draft_size!r}")
    _silence_pillow_warnings()
    _check_file(path)
    try:
        with open(path, "rb") as f:
            im = _open(f, path)
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageError(
                    path,
                    f"image has {width * height} pixels, over the limit of {max_pixels} "
                    "(decompression-bomb guard; raise data.max_pixels to allow it)",
                )
            if draft_size is not None:
                im.draft(None, (draft_size, draft_size))  # a no-op for everything but JPEG
            try:
                im.load()
            except Exception as e:  # decoders raise anything from OSError to struct.error
                raise ImageError(path, f"truncated or corrupt image data: {_describe(e)}") from e
    except OSError as e:  # opening the file itself failed (e.g. unreadable)
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from e
    return _to_rgb(_exif_transposed(im), path)


def check_image(
    path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> str | None:
    """None if ``path`` loads as an image, else the :class:`ImageError` message saying why."""
    try:
        load_image(path, max_pixels=max_pixels, draft_size=64)
    except ImageError as e:
        return str(e)
    return None


def _check_file(path: str | os.PathLike) -> None:
    """Raise ImageError for a path that isn't a readable, non-empty file (before Pillow sees it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            raise ImageError(path, f"broken symlink (target {target} is missing)") from None
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from e
    except ValueError as e:  # a NUL byte, or a lone surrogate the file system cannot encode
        raise ImageError(path, f"not a usable file name ({e})") from e
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):  # e.g. a FIFO, which would block the reader forever
        raise ImageError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageError(path, "zero-byte file")


def _open(f, path: str | os.PathLike) -> Image.Image:
    """Identify the image in ``f`` and read its header, whatever Pillow's own pixel limit says.

    Pillow refuses outright images over twice its limit. The caller applies graft's own limit,
    so in that case the header is read again with Pillow's limit lifted; the lock keeps two
    threads from interleaving the lift and the restore, and only the header read (not decoding)
    is inside it.
    """
    try:
        try:
            return Image.open(f, formats=_FORMATS)
        except Image.DecompressionBombError:
            f.seek(0)
            with _PILLOW_LIMIT_LOCK:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    return Image.open(f, formats=_FORMATS)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError as e:
        raise ImageError(path, "not an image: cannot identify image file") from e
    except Exception as e:  # a header broken enough to crash the format's parser
        raise ImageError(path, f"truncated or corrupt image data: {_describe(e)}") from e


def _exif_transposed(im: Image.Image) -> Image.Image:
    """``im`` turned upright per its EXIF orientation tag; broken EXIF leaves it as stored."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # the pixels are fine; only the metadata is unreadable
        pass
    return im


def _to_rgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """Any decoded mode as 8-bit RGB: transparency composited onto white, deep modes rescaled."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _gray_to_rgb(_sixteen_bit_to_8(np.asarray(im)))
    if mode == "F":
        return _gray_to_rgb(_min_max_to_8(np.asarray(im, dtype=np.float64)))
    if mode in _ALPHA_MODES or mode == "P" or "transparency" in im.info:
        # Transparent areas become white, not whatever colour the hidden pixels happen to hold.
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode == "RGB":
        return im
    try:
        return im.convert("RGB")  # L, 1, CMYK, YCbCr, RGBX, HSV, ...
    except ValueError as e:
        raise ImageError(path, f"unsupported image mode {mode!r}") from e


def _sixteen_bit_to_8(a: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 (65535 -> 255, 32768 -> 128); other ranges are min/max scaled."""
    if a.size and (a.min() < 0 or a.max() > 65535):
        return _min_max_to_8(a.astype(np.float64))
    return np.rint(a.astype(np.float32) / 257.0).astype(np.uint8)


def _min_max_to_8(a: np.ndarray) -> np.ndarray:
    """Stretch the finite values' own range onto 0..255 (NaN/inf and constant images give 0)."""
    finite = np.isfinite(a)
    out = np.zeros(a.shape, dtype=np.uint8)
    if not finite.any():
        return out
    lo, hi = a[finite].min(), a[finite].max()
    if hi > lo:
        out[finite] = np.rint((a[finite] - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return out


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8), mode="L").convert("RGB")


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _silence_pillow_warnings() -> None:
    """Keep Pillow's warnings (decompression bomb, odd metadata) from reaching the user.

    graft applies its own pixel limit and turns real decoding problems into ImageError, so what
    is left in these warnings is noise. ``warnings.catch_warnings`` is not thread-safe before
    Python 3.14 and the scanner decodes in threads, so instead two narrow process-wide filters
    are put at the front of ``warnings.filters`` whenever they are not already there (which also
    keeps them effective inside callers' own ``catch_warnings`` blocks). The list is left alone
    otherwise: every change to it makes Python forget which warnings it has already shown.
    """
    if set(warnings.filters[: len(_QUIET_FILTERS)]) != set(_QUIET_FILTERS):
        for action, _, category, module, _ in reversed(_QUIET_FILTERS):
            pattern = module.pattern if module else ""
            warnings.filterwarnings(action, category=category, module=pattern)
