"""One writer at a time: an exclusive flock on a file inside the collection.

The kernel drops a flock when the last descriptor of its open file is
closed, so a writer killed with kill -9 leaves no stale lock behind, provided
no other process holds a copy of the descriptor.  A forked child (encode's
DataLoader workers) inherits one, and would keep the collection locked after
its parent's kill -9 until it noticed it was orphaned: so every child drops its
copies the moment it is forked.  Readers never take the lock: they pin a
generation (see manifest.py) and are never blocked by a writer.
"""
from __future__ import annotations

import fcntl
import os
import weakref
from pathlib import Path

from ..errors import HashsearchError
from .layout import LOCK_FILE

_held: "weakref.WeakSet[WriteLock]" = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a freshly forked child: close its copies of the parent's lock descriptors (the parent's stay locked)."""
    for lock in list(_held):
        fd, lock.fd = lock.fd, None
        if fd is not None:
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


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
        _held.add(self)

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _held.discard(self)
            os.close(fd)            # closing the only descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            self.release()
