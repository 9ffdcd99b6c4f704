"""One writer at a time: an exclusive flock on a file inside the collection.

The kernel drops a flock when its process dies, so a writer killed with
kill -9 never leaves a stale lock behind.  Readers never take it: they pin a
generation (see manifest.py) and are never blocked by a writer.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import HashsearchError

LOCK_FILE = ".lock"


class WriteLock:
    """Held from construction until release(); `wait` blocks for the current writer instead of failing."""

    def __init__(self, root, *, wait: bool = False):
        self.root = Path(root)
        self.fd = None
        try:
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise HashsearchError(f"cannot lock collection {self.root} for writing: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise HashsearchError(f"collection {self.root} is being written by another process; "
                                  "try again when it has finished (or pass --wait)") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)       # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            self.release()
