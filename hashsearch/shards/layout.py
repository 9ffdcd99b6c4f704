"""Every name in a collection's on-disk layout, declared once.

A collection is a directory:
  manifest.json            the current generation (manifest.py)
  .lock                    the writers' lock (lock.py)
  model.pt                 the model that encoded it, for `add` and image queries
  rejects.jsonl            one line per image that could not be read
  shards/shard-NNNNN.h5    the items (writer.py)
  tombstones/*.npy         the ids deleted in one generation (edit.py)
  index/*                  the coarse index's files (written by the engine, through a transaction)
  uploads/*                images added through the service
Only hashsearch.shards writes any of them.
"""
from __future__ import annotations

import os
import re

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
MODEL_FILE = "model.pt"
REJECTS = "rejects.jsonl"
SHARD_DIR = "shards"
TOMBSTONE_DIR = "tombstones"
INDEX_DIR = "index"
UPLOAD_DIR = "uploads"
# The metadata of an index written outside its collection (`build-index --out`), which no manifest names.
INDEX_META = "index.json"
# A shard's datasets: every one has a row per item.  `miniatures` (uint8 [rows, MINIATURE_SIDE ** 2]) is each
# item's image as the model saw it, shrunk to grey MINIATURE_SIDE x MINIATURE_SIDE, for `duplicates`
# (engine/copies.py): shards written before it came lack it.  16 keeps a photo's layout of light and dark,
# which is what copies share, in 256 bytes an item, 256 MB at a million.
SHARD_DATASETS = ("codes", "features", "ids", "labels", "paths")
MINIATURES = "miniatures"
MINIATURE_SIDE = 16
# Folders whose files a generation names: a file no generation names any more is removed by the next writer.
GENERATION_DIRS = (SHARD_DIR, TOMBSTONE_DIR, INDEX_DIR)


def shard_name(number: int) -> str:
    return f"{SHARD_DIR}/shard-{number:05d}.h5"


def generation_file(folder: str, stem: str, generation: int, suffix: str) -> str:
    """The name of a file first named by `generation`: a new generation never reuses an older one's names.
    `stem` and `suffix` are lowercase words (transaction.py recognises these names by that)."""
    return f"{folder}/{stem}-{generation:06d}{suffix}"


_SHARD_NUMBER = re.compile(rf"{SHARD_DIR}/shard-(\d{{5,}})\.h5")
_GENERATION = re.compile(r"[^/]+/[a-z]+-(\d{6,})\.[a-z]+")


def shard_number(name: str) -> int | None:
    """The number shard_name gave `name`, or None for a name it did not make."""
    match = _SHARD_NUMBER.fullmatch(os.path.normpath(name))
    return int(match[1]) if match else None


def generation_of(name: str) -> int | None:
    """The generation generation_file gave `name`, or None for a name it did not make."""
    match = _GENERATION.fullmatch(os.path.normpath(name))
    return int(match[1]) if match else None
