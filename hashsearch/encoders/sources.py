"""Image sources: the SOURCE strings the command line accepts, opened as
indexable, picklable lists of (path, label, image).

Kinds of SOURCE:

* ``DIR`` -- images anywhere under DIR (hidden files and folders skipped),
  sorted by relative path.  First-level subfolders are the classes; images
  directly in DIR are unlabeled (-1).
* ``FILE.txt`` / ``FILE.csv`` -- one ``path[,label]`` per line, in file order;
  relative paths are relative to the list file.  Blank lines, ``#`` comments
  and a ``path,label`` header are skipped.  A .csv is read with the csv module
  (quote paths holding commas).  In a .txt the text after the last comma is a
  label only if it holds no ``/``, ``\\`` or ``.``, so ``a,b.jpg`` is a path.
  Labels are all integers (-1 = unlabeled) or else class names, numbered in
  sorted order.
* ``DIR:train`` / ``DIR:test`` -- the MNIST-layout IDX files in DIR (raw or .gz).
* ``fashion-mnist:train`` / ``fashion-mnist:test`` -- the same, found in
  ``data_dir``, ``$HASHSEARCH_DATA``, ~/.cache/hashsearch/fashion-mnist or
  /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist).
* ``synthetic:N[:SIZE]`` -- N generated SIZExSIZE images (default 32), a pure
  function of the index, labels ``i % 10``.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import os
import re
import struct
import zlib

import numpy as np
from PIL import Image

from hashsearch.encoders.images import image_from_array, is_image_name, load_image
from hashsearch.errors import HashsearchError
from hashsearch.fileio import open_regular

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Searched after data_dir and $HASHSEARCH_DATA.
FASHION_MNIST_DIRS = ("~/.cache/hashsearch/fashion-mnist", "/usr/share/datasets/fashion-mnist")

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_SOURCE_KINDS = "a directory, a .txt/.csv list, DIR:train|test, fashion-mnist:train|test or synthetic:N[:SIZE]"


class Source:
    """An ordered list of images; item i is (path(i), label(i), load(i))."""

    spec: str
    class_names: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def path(self, i: int) -> str:
        raise NotImplementedError

    def label(self, i: int) -> int:
        return int(self.labels()[i])

    def load(self, i: int) -> Image.Image:
        raise NotImplementedError

    def file(self, i: int) -> str | None:
        """The image file behind item i, for sources backed by files; None for generated or packed ones."""
        return None

    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Identifies the item list (not the pixels), to refuse resuming on another source."""
        h = hashlib.sha256(f"{self.spec}\n{len(self)}\n{self.class_names!r}\n".encode())
        self._hash_items(h)
        return h.hexdigest()

    def files_stamp(self) -> str:
        """Identifies the files behind the items by size and modification time: an image replaced under
        the same name changes it, which the item list (fingerprint) does not see."""
        h = hashlib.sha256()
        for f in self._files():
            try:
                st = os.stat(f)
                h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:         # unreadable now: the pass rejects it, and a later stat that works differs
                h.update(f"{f}\t-\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def _files(self):
        return (f for f in map(self.file, range(len(self))) if f is not None)

    def _hash_items(self, h) -> None:
        labels = self.labels()
        for i in range(len(self)):
            h.update(f"{self.path(i)}\t{labels[i]}\n".encode("utf-8", "surrogateescape"))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec} ({len(self)} images)>"


class _FileListSource(Source):
    """Image files on disk with their labels: what directory and list sources become."""

    def __init__(self, spec: str, paths: list[str], labels, class_names: list[str]):
        self.spec = spec
        self.class_names = class_names
        self._paths = paths
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> str:
        return self._paths[i]

    def load(self, i: int) -> Image.Image:
        return load_image(self._paths[i])

    def file(self, i: int) -> str:
        return self._paths[i]

    def labels(self) -> np.ndarray:
        return self._labels


class IdxSource(Source):
    """MNIST-layout IDX files; the pixel array is read on first use, once per process."""

    def __init__(self, spec: str, images_file: str, labels_file: str,
                 class_names: list[str] | None = None, limit: int | None = None):
        self.spec = spec
        self._images_file = images_file
        labels = _read_idx(labels_file)
        dims = _read_idx(images_file, header_only=True)
        if labels.ndim != 1 or len(dims) != 3 or dims[0] != len(labels):
            raise HashsearchError(
                f"IDX files don't match: {images_file} has shape {dims}, {labels_file} has {labels.shape}")
        self._labels = labels[:limit].astype(np.int64)
        if class_names is None:
            class_names = [str(k) for k in range(int(labels.max()) + 1)] if len(labels) else []
        self.class_names = class_names
        self._images = None

    def __getstate__(self):
        # Workers re-read the file rather than receive 47 MB through a pipe.
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, i: int) -> str:
        return f"{self._images_file}#{i}"

    def load(self, i: int) -> Image.Image:
        if self._images is None:
            self._images = read_idx_images(self._images_file)
        return image_from_array(self._images[i])

    def labels(self) -> np.ndarray:
        return self._labels

    def _files(self):
        return [self._images_file]

    def _hash_items(self, h) -> None:
        # Paths are the file plus the index, so the labels are all that varies;
        # the file's location doesn't matter (fashion-mnist moves between machines).
        h.update(self._labels.tobytes())


class SyntheticSource(Source):
    """Images computed from their index in integer arithmetic, so every process
    and every CPU produces the same pixels.  Class c is a stripe pattern with a
    class-specific direction and frequency; phase, colour and noise vary per image.
    """

    _DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1), (2, 1), (1, 2), (2, -1), (1, -2), (3, 1), (1, 3))
    _NOISE_TILES = 32

    def __init__(self, n: int, size: int = 32, limit: int | None = None):
        self.spec = f"synthetic:{n}:{size}"
        self.class_names = [f"class{c}" for c in range(10)]
        self.size = size
        self._n = n if limit is None else min(n, limit)
        self._tables = None

    def __getstate__(self):
        return {**self.__dict__, "_tables": None}

    def __len__(self) -> int:
        return self._n

    def path(self, i: int) -> str:
        return f"synthetic:{i}"

    def label(self, i: int) -> int:
        return i % 10

    def labels(self) -> np.ndarray:
        return np.arange(self._n, dtype=np.int64) % 10

    def load(self, i: int) -> Image.Image:
        return image_from_array(self.pixels(i))

    def pixels(self, i: int) -> np.ndarray:
        if not 0 <= i < self._n:
            raise IndexError(i)
        ramps, noise = self._tables or self._make_tables()
        h = _mix64(i)
        stripes = np.abs(((ramps[i % 10] + (h & 0xFF)) & 0xFF) - 128)  # triangle wave, 0..128
        gains = np.array([(h >> s) & 0x7F for s in (8, 16, 24)], dtype=np.int32) + 32
        img = (stripes[..., None] * gains >> 7) + noise[(h >> 32) % self._NOISE_TILES] + 64
        return np.clip(img, 0, 255).astype(np.uint8)

    def _make_tables(self):
        s = self.size
        y, x = np.mgrid[0:s, 0:s].astype(np.int32)
        # 2..6 stripe periods across the image, 256 phase steps per period.
        ramps = np.stack([(dx * x + dy * y) * (256 * (2 + c % 5)) // s
                          for c, (dx, dy) in enumerate(self._DIRECTIONS)])
        noise = np.random.default_rng(0).integers(-24, 25, (self._NOISE_TILES, s, s, 3), dtype=np.int32)
        self._tables = (ramps, noise)
        return self._tables

    def _hash_items(self, h) -> None:
        pass  # spec and length determine every item


def open_source(spec: str, *, data_dir: str | None = None, limit: int | None = None) -> Source:
    """Open a SOURCE string (see the module docstring); ``limit`` keeps the first N items."""
    if limit is not None and limit < 1:
        raise HashsearchError(f"limit must be at least 1, got {limit}")
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        return _open_synthetic(spec, rest, limit)
    if kind == "fashion-mnist":
        return _open_fashion_mnist(spec, rest, data_dir, limit)

    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _open_directory(os.path.abspath(path), limit)
    if os.path.isfile(path):
        if path.lower().endswith((".txt", ".csv")):
            return _open_list(os.path.abspath(path), limit)
        raise HashsearchError(f"unknown source {spec!r}: expected {_SOURCE_KINDS}")
    root, sep, split = path.rpartition(":")
    if sep and os.path.isdir(root):
        root = os.path.abspath(root)
        if split not in _IDX_PREFIX:
            raise HashsearchError(f"bad split {split!r} in {spec!r}: use DIR:train or DIR:test")
        files = _idx_files(root, split)
        if files is None:
            raise HashsearchError(f"no IDX files for split {split!r} in {root}")
        return IdxSource(f"{root}:{split}", *files, limit=limit)
    raise HashsearchError(f"source not found: {spec} (expected {_SOURCE_KINDS})")


def _open_synthetic(spec: str, rest: str, limit: int | None) -> Source:
    m = re.fullmatch(r"(\d+)(?::(\d+))?", rest)
    if not m or int(m[1]) < 1 or (m[2] and not 4 <= int(m[2]) <= 4096):
        raise HashsearchError(f"bad synthetic source {spec!r}: use synthetic:N or synthetic:N:SIZE (SIZE 4..4096)")
    return SyntheticSource(int(m[1]), int(m[2] or 32), limit=limit)


def _open_fashion_mnist(spec: str, split: str, data_dir: str | None, limit: int | None) -> Source:
    if split not in _IDX_PREFIX:
        raise HashsearchError(f"bad source {spec!r}: use fashion-mnist:train or fashion-mnist:test")
    candidates = []
    for base in (data_dir, os.environ.get("HASHSEARCH_DATA")):
        if base:
            candidates += [base, os.path.join(base, "fashion-mnist")]
    candidates += FASHION_MNIST_DIRS
    for d in candidates:
        files = _idx_files(os.path.expanduser(d), split)
        if files:
            return IdxSource(f"fashion-mnist:{split}", *files, class_names=list(FASHION_MNIST_CLASSES), limit=limit)
    raise HashsearchError(
        "Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` or put the four "
        "*-ubyte.gz files in ~/.cache/hashsearch/fashion-mnist (or $HASHSEARCH_DATA)")


def _open_directory(root: str, limit: int | None) -> Source:
    found = []  # relative paths split into parts, so sorting keeps folders together
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        rel = os.path.relpath(d, root)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        found += [parts + (f,) for f in files if not f.startswith(".") and is_image_name(f)]
    if not found:
        hint = f" (it holds IDX files: use {root}:train or {root}:test)" if _idx_files(root, "train") or _idx_files(root, "test") else ""
        raise HashsearchError(f"no images found in {root}{hint}")
    found.sort()
    class_names = sorted({p[0] for p in found if len(p) > 1})
    index = {name: k for k, name in enumerate(class_names)}
    found = found[:limit]
    labels = [index[p[0]] if len(p) > 1 else -1 for p in found]
    return _FileListSource(root, [os.path.join(root, *p) for p in found], labels, class_names)


def _open_list(list_file: str, limit: int | None) -> Source:
    base = os.path.dirname(list_file)
    entries = []  # (path, label text or None)
    with open(list_file, encoding="utf-8-sig", newline="") as f:
        if list_file.lower().endswith(".csv"):
            reader = csv.reader(f)
            for row in reader:
                if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                    continue
                if len(row) > 2:
                    raise HashsearchError(f"{list_file}:{reader.line_num}: expected path[,label], got {len(row)} fields")
                entries.append((row[0].strip(), row[1].strip() if len(row) > 1 and row[1].strip() else None))
        else:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append(_split_txt_line(line))
    if entries and entries[0][0].lower() == "path" and entries[0][1] in (None, "label"):
        entries = entries[1:]
    if not entries:
        raise HashsearchError(f"no images listed in {list_file}")

    texts = [t for _, t in entries if t is not None]
    if all(re.fullmatch(r"-?\d+", t) for t in texts):
        labels = [int(t) if t is not None else -1 for _, t in entries]
        if min(labels) < -1:
            raise HashsearchError(f"negative label {min(labels)} in {list_file} (-1 means unlabeled)")
        class_names = [str(k) for k in range(max(labels) + 1)]
    else:
        class_names = sorted(set(texts))
        index = {name: k for k, name in enumerate(class_names)}
        labels = [index[t] if t is not None else -1 for _, t in entries]
    paths = [os.path.abspath(os.path.join(base, p)) for p, _ in entries]
    return _FileListSource(list_file, paths[:limit], labels[:limit], class_names)


def _split_txt_line(line: str) -> tuple[str, str | None]:
    head, sep, tail = line.rpartition(",")
    tail = tail.strip()
    if not sep:
        return line, None
    if not tail:
        return head.strip(), None
    if any(c in tail for c in "/\\."):
        return line, None  # a comma inside the path, not a label
    return head.strip(), tail


def _idx_files(root: str, split: str) -> tuple[str, str] | None:
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        name = os.path.join(root, f"{_IDX_PREFIX[split]}-{kind}-ubyte")
        name = next((p for p in (name, name + ".gz") if os.path.isfile(p)), None)
        if name is None:
            return None
        found.append(name)
    return found[0], found[1]


# The largest IDX file read, decompressed: MNIST's 60,000 training images are 47 MB.
MAX_IDX_BYTES = 1 << 32


def _read_idx(path: str, header_only: bool = False):
    """An IDX ubyte file as a numpy array (or just its dimensions).  Only a regular file is read (a FIFO is
    refused, never waited on), and no more bytes than its header announces, up to MAX_IDX_BYTES."""
    try:
        with os.fdopen(open_regular(path), "rb") as raw, \
                (gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else contextlib.nullcontext(raw)) as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\0\0\x08":
                raise HashsearchError(f"not an IDX file of unsigned bytes: {path}")
            dims = struct.unpack(f">{magic[3]}I", f.read(4 * magic[3]))
            if header_only:
                return dims
            expected = int(np.prod(dims, dtype=np.int64)) if dims else 0
            if expected > MAX_IDX_BYTES:
                raise HashsearchError(f"IDX file {path} announces {expected} bytes, over {MAX_IDX_BYTES}")
            data = f.read(expected + 1)
    except (OSError, EOFError, struct.error, zlib.error) as e:
        raise HashsearchError(f"cannot read IDX file {path}: {e}") from None
    if len(data) != expected:
        raise HashsearchError(f"corrupt IDX file {path}: {len(data)} bytes of data, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_idx_images(path: str) -> np.ndarray:
    """The images of an IDX file, uint8 [n, rows, cols]."""
    images = _read_idx(path)
    if images.ndim != 3:
        raise HashsearchError(f"{path} holds an array of shape {images.shape}, not images")
    return images


def _mix64(x: int) -> int:
    """splitmix64: well-spread 64 bits from an index, identical on every platform."""
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)
