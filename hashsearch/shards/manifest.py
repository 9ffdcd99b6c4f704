"""manifest.json: what a collection holds, written atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import HashsearchError

MANIFEST = "manifest.json"
FORMAT = "hashsearch-collection"
VERSION = 1
REQUIRED_KEYS = ("bits", "feature_dim", "feature_dtype", "shards")


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename over the target.

    A crash leaves either the old file or the new one, never half of either.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    atomic_write_bytes(Path(root) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not Path(root).exists():
        raise HashsearchError(f"collection not found: {root}")
    if not path.exists():
        raise HashsearchError(f"not a hashsearch collection (no {MANIFEST}): {root}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HashsearchError(f"unreadable manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HashsearchError(f"{path} is not a hashsearch manifest")
    if manifest.get("version", 0) > VERSION:
        raise HashsearchError(f"{path} has format version {manifest['version']}; this hashsearch reads up to {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    shards_ok = isinstance(manifest.get("shards"), list) and all(
        isinstance(e, dict) and {"file", "rows", "sha256"} <= e.keys() for e in manifest["shards"])
    if missing or not shards_ok:
        raise HashsearchError(f"damaged manifest {path}: " + (f"missing {', '.join(missing)}" if missing else "bad shard list"))
    return manifest
