"""Decode one image file into an RGB PIL image, or say why it can't be used.

Only numpy and PIL here: data-loader workers import this, and they must start
fast.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from hashsearch.errors import HashsearchError
from hashsearch.fileio import NotRegularFile, read_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")

# Larger images are refused as possible decompression bombs.  Read at call
# time so tests (and callers) can lower it.
MAX_PIXELS = 100_000_000
# Larger files are refused unread: no real photo comes near it, and a source
# must not be able to make a worker read without end.  Read at call time too.
MAX_BYTES = 256 * 1024 * 1024

_WHITE = (255, 255, 255, 255)


class ImageRejected(Exception):
    """One image can't be used; the message is a short reason to record."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str) -> Image.Image:
    """Fully decoded RGB image at ``path``; raises ImageRejected with a reason."""
    return decode_image(read_image_file(path))


def read_image_file(path: str) -> bytes:
    """The bytes of the image file at ``path``; raises ImageRejected with a reason.

    Only a regular file is read, checked before the first byte, so a FIFO
    named like an image can't block a run and a device can't feed it forever.
    """
    try:
        data = read_regular(path, MAX_BYTES)
    except FileNotFoundError:
        raise ImageRejected("missing file") from None
    except NotRegularFile as e:
        raise ImageRejected(str(e)) from None
    except OSError as e:
        raise ImageRejected(f"unreadable file: {e.strerror or e}") from None
    except ValueError as e:     # read_regular's "larger than N bytes"
        raise ImageRejected(str(e)) from None
    if not data:
        raise ImageRejected("empty file")
    return data


# The extension an image of each format is stored under, whatever name it came with.
_FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


def image_suffix(data: bytes) -> str:
    """The file extension of the image format `data` holds, as its content says (not a client's file name)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception:  # noqa: BLE001 - a broken file can make any plugin raise anything
        raise ImageRejected("not an image or unsupported format") from None
    return _FORMAT_SUFFIX.get(fmt, ".img")


def decode_image(data: bytes) -> Image.Image:
    """Fully decoded RGB image from the bytes of an image file; raises ImageRejected with a reason."""
    # Both are process-wide PIL settings; set them on every call so another
    # library flipping them can't make us accept half-decoded images.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX and 2*MAX pixels; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError("too many pixels")
                im.load()  # decode now so truncation shows up here, not later
                # exif_transpose returns a copy, which outlives the closed file.
                return _to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(f"too many pixels (limit {MAX_PIXELS})") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image or unsupported format") from None
    except ImageRejected:
        raise
    except (OSError, SyntaxError, EOFError) as e:
        raise ImageRejected(f"truncated or corrupt image: {e}") from None
    except Exception as e:  # a broken file can make any plugin raise anything
        raise ImageRejected(f"cannot decode: {type(e).__name__}: {e}") from None


def image_from_array(arr: np.ndarray) -> Image.Image:
    """RGB image from a uint8 array shaped HxW (grey) or HxWx3."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise HashsearchError(f"expected a uint8 HxW or HxWx3 array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        # High bit depth: PIL's own convert would clip at 255 instead of scaling.
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if "transparency" in im.info or any(b in ("A", "a") for b in im.getbands()):
        # Transparent pixels are usually white-ish backgrounds in product photos;
        # compositing beats letting whatever colour hides under alpha=0 through.
        bg = Image.new("RGBA", im.size, _WHITE)
        bg.alpha_composite(im.convert("RGBA"))
        im = bg
    try:
        return im if im.mode == "RGB" else im.convert("RGB")
    except ValueError:
        raise ImageRejected(f"unsupported mode {im.mode}") from None
