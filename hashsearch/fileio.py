"""The file primitives every layer shares: atomic writes and opening only regular files.

Only the standard library here: DataLoader workers import this (through
encoders.images) and must start fast.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO

from .errors import HashsearchError

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through write(file): a crash leaves the old file or the new one, never half of either.

    The bytes go to a uniquely named temporary file beside the target, which is
    fsynced, renamed over the target, and the directory fsynced.  On any failure
    (a full disk, a write callback that raises) the temporary file is removed
    and the target is untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise HashsearchError(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise HashsearchError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)      # mkstemp's 0600 would hide a shared collection from its readers
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):      # a full disk, a read-only file system: the environment, said in one line
            raise HashsearchError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse, before any work starts, an output path that could not be written at the end."""
    path = Path(path)
    if path.is_dir():
        raise HashsearchError(f"{what} {path} is a directory; give a file name")
    if path.exists() and not path.is_file():     # a FIFO would block the final write; a device would be replaced
        raise HashsearchError(f"{what} {path} is {_kind(path.stat().st_mode)}; give a regular file name")
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HashsearchError(f"cannot create the folder of {what} {path}: {exc.strerror}") from None
    if not parent.is_dir():
        raise HashsearchError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HashsearchError(f"{what} {path} is not writable")
    try:    # os.access says yes on a read-only mount for root; a real create tells
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise HashsearchError(f"{what} {path} is not writable: {exc.strerror}") from None
    return path


class NotRegularFile(OSError):
    """A path that names a FIFO, a device, a socket or a directory."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, *, append: bool = False, follow: bool = True) -> int:
    """A descriptor of `path`, which must be a regular file: read-only, or with `append` for appending (the
    file is created if missing).  follow=False refuses a symlink too: a collection's own files, where one would
    lead reads or writes outside the collection.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a
    writer (or, to append, fail at once without a reader), and fstat on the open
    descriptor checks the very file that will be used, so a FIFO or a device is
    refused before a single byte is read or written.
    """
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT) if append else os.O_RDONLY
    flags |= os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise NotRegularFile(f"{path} is a symbolic link") from None
        if exc.errno == errno.ENXIO:            # a FIFO opened to write, with no reader
            raise NotRegularFile(f"{path} is a FIFO") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path} is {_kind(mode)}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike, max_bytes: int, *, follow: bool = True) -> bytes:
    """The bytes of the regular file `path`; more than `max_bytes` raises ValueError without reading them all."""
    fd = open_regular(path, follow=follow)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    return data
