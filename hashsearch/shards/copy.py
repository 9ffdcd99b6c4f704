"""A second collection sharing a collection's immutable files (the benches' scratch copies)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import HashsearchError
from ..fileio import atomic_write_bytes, read_regular
from .layout import GENERATION_DIRS, MANIFEST, MODEL_FILE, REJECTS
from .manifest import read_manifest


def linked_copy(src, dst) -> Path:
    """A new collection at `dst` holding `src`'s current generation: the files that generation names are
    hard links (copies across file systems), never written again by either, and the files writers rewrite
    (manifest, rejects, model) are copied, so writing either collection leaves the other as it was."""
    src, dst = Path(src), Path(dst)
    read_manifest(src)
    try:
        dst.mkdir(parents=True)
        for folder in GENERATION_DIRS:
            if (src / folder).is_dir():
                (dst / folder).mkdir()
                for path in (src / folder).iterdir():
                    if path.is_file() and not path.name.startswith("."):
                        _link(path, dst / folder / path.name)
        for name in (REJECTS, MODEL_FILE, MANIFEST):       # the manifest last: until then dst is no collection
            if (src / name).is_file():
                atomic_write_bytes(dst / name, read_regular(src / name, 1 << 34))
    except (OSError, ValueError) as exc:
        raise HashsearchError(f"cannot copy collection {src} to {dst}: {exc}") from None
    return dst


def _link(a: Path, b: Path) -> None:
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)
