"""The image of a stored item, read back from the path `encode` recorded for it: what thumbnails show.

`encode` and `add` store one path per item, in one of three forms (encoders/sources.py):
  a file         folders and list files: the image file itself;
  FILE#i         image i of an IDX file (Fashion-MNIST, MNIST);
  synthetic:i    image i of the collection's synthetic source, computed again from i.
Every form is read as the encoder read it, and a file that has gone since is reported as such.
"""
from __future__ import annotations

import io
import os
import re
import threading
from collections import OrderedDict

from PIL import Image

from .images import ImageRejected, image_from_array, load_image
from .sources import SyntheticSource, open_source, read_idx_images

# Decoded IDX files kept: one is a whole split (47 MB for Fashion-MNIST's training images), and a
# collection is usually encoded from one or two of them.
IDX_FILES_KEPT = 2
_IDX_MEMBER = re.compile(r"(.+-idx3-ubyte(?:\.gz)?)#(\d+)")
_SYNTHETIC = re.compile(r"synthetic:(\d+)")


class ItemImages:
    """Loads stored items' images; `source_spec` is the collection's (its manifest's source_spec), which
    says how a `synthetic:i` path was made.  Safe to share between threads."""

    def __init__(self, source_spec: str | None):
        self._synthetic = None
        if source_spec and source_spec.startswith("synthetic:"):
            source = open_source(source_spec)
            self._synthetic = source if isinstance(source, SyntheticSource) else None
        self._idx: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, path: str) -> Image.Image:
        """The item's RGB image; ImageRejected says why there is none (its file is gone, say)."""
        synthetic = _SYNTHETIC.fullmatch(path)
        if synthetic and self._synthetic is not None:
            i = int(synthetic[1])
            if i >= len(self._synthetic):
                raise ImageRejected(f"{path} is past the collection's synthetic source of {len(self._synthetic)}")
            return self._synthetic.load(i)
        member = _IDX_MEMBER.fullmatch(path)
        if member and not os.path.lexists(path):
            return image_from_array(self._idx_image(member[1], int(member[2])))
        return load_image(path)

    def jpeg_thumbnail(self, path: str, side: int, quality: int) -> bytes:
        """The item's image shrunk to fit `side` pixels, as JPEG bytes; ImageRejected says why there is none."""
        image = self.load(path)
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()

    def _idx_image(self, file: str, i: int):
        with self._lock:
            images = self._idx.get(file)
            if images is None:
                if not os.path.lexists(file):
                    raise ImageRejected(f"missing file: {file} is gone")
                try:
                    images = read_idx_images(file)
                except Exception as exc:  # noqa: BLE001 - any unreadable IDX file is a reason to show
                    raise ImageRejected(str(exc)) from None
                self._idx[file] = images
                while len(self._idx) > IDX_FILES_KEPT:
                    self._idx.popitem(last=False)
            self._idx.move_to_end(file)
        if i >= len(images):
            raise ImageRejected(f"{file} holds {len(images)} images, not image {i}")
        return images[i]
