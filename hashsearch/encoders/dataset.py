"""A SOURCE as a torch Dataset, and the DataLoader that reads it.

Workers decode and resize; an item that fails to decode comes back as a
reject (its reason instead of pixels) so the run can skip it, record it and
go on.  Batches are aligned to absolute multiples of the batch size, so a
resumed run feeds the model exactly the batches an uninterrupted one did.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .images import ImageRejected
from .preprocess import decode_file, to_uint8_tensor


class SourceDataset(Dataset):
    def __init__(self, source, size: int):
        self.source, self.size = source, size

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            file = self.source.file(i)
            pixels = decode_file(file, self.size) if file else to_uint8_tensor(self.source.load(i), self.size)
            return i, pixels, None
        except ImageRejected as exc:
            return i, None, str(exc) or "cannot decode image"
        except Exception as exc:  # a decoder crash on one odd file must not end a million-image run
            return i, None, f"{type(exc).__name__}: {exc}"


class AlignedBatches(Sampler):
    """Batches [b*B, (b+1)*B) of `indices`' positions, starting from the batch that holds `start`."""

    def __init__(self, indices, batch_size: int, start: int = 0):
        self.indices, self.batch_size = list(indices), batch_size
        self.first = (start // batch_size) * batch_size

    def __iter__(self):
        for a in range(self.first, len(self.indices), self.batch_size):
            yield self.indices[a:a + self.batch_size]

    def __len__(self):
        return max(0, -(-(len(self.indices) - self.first) // self.batch_size))


def collate(items, size: int):
    """-> (indices, uint8 [m, 3, S, S] of the good items, their indices, [(index, reason)] rejects)."""
    good = [(i, t) for i, t, _ in items if t is not None]
    rejects = [(i, r) for i, t, r in items if t is None]
    pixels = torch.stack([t for _, t in good]) if good else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return [i for i, _, _ in items], pixels, [i for i, _ in good], rejects


def make_loader(source, size: int, batch_size: int, workers: int, indices=None, start: int = 0,
                pin_memory: bool = False) -> DataLoader:
    indices = range(len(source)) if indices is None else indices
    return DataLoader(
        SourceDataset(source, size), batch_sampler=AlignedBatches(indices, batch_size, start),
        num_workers=workers, collate_fn=_Collate(size), pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )


class _Collate:
    # A class, not a lambda, so worker processes can pickle it.
    def __init__(self, size):
        self.size = size

    def __call__(self, items):
        return collate(items, self.size)
