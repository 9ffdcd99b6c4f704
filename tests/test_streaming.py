"""Issue 5: encode memory stays flat whatever N is.

Two witnesses, because neither sees everything:
- tracemalloc traces what Python and numpy allocate (codes, ids, paths, the
  writer's buffers); its peak must not grow with N.
- It does not see torch's allocations, which hold the decoded pixels and the
  F7 features, so the resident memory left behind after a run (after gc)
  must not grow with N either.  Keeping the pixels or the features of every
  batch left 26-31 MB more after 12,000 items than after 1,000 (measured
  by injecting the leak); a clean run leaves the same in both.
Peak RSS is a noisier witness, so the million-image RSS figure in the README
comes from /usr/bin/time.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import tracemalloc

from hashsearch.encoders.runner import encode_collection

N_SMALL, N_LARGE = 1_000, 12_000


def resident_mb() -> float:
    # glibc keeps freed heap pages resident; handing them back first leaves what
    # is still referenced.  Without it, 1 run in about 10 read 13.5 MB of growth
    # with no leak; with it, 0.6 MB, against 33 MB for an injected leak.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                                      # not glibc: measure as it is
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def encode(model, out, n):
    encode_collection(model, f"synthetic:{n}", out, batch_size=200, workers=0, device="cpu",
                      shard_size=2_000, quiet=True, log=lambda *_: None)


def memory_growth_mb(model, out, n) -> tuple[float, float]:
    """(tracemalloc peak, resident memory left behind) of encoding n items, in MB."""
    gc.collect()
    before = resident_mb()
    tracemalloc.start()
    try:
        encode(model, out, n)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    gc.collect()
    return peak, resident_mb() - before


def test_encode_memory_is_flat_in_n(model, tmp_path):
    encode(model, tmp_path / "warm-up", 200)       # first-use allocations are not per item
    small, small_rss = memory_growth_mb(model, tmp_path / "small", N_SMALL)
    large, large_rss = memory_growth_mb(model, tmp_path / "large", N_LARGE)
    # Keeping the pixels (3 KB an image) or the F7 rows (1 KB in float16) of every
    # item would add at least 11 MB over the extra 11,000 images.
    assert large - small < 4, (small, large)
    assert large_rss - small_rss < 10, (small_rss, large_rss)
    manifest = json.loads((tmp_path / "large" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["items"] == N_LARGE
    assert [s["rows"] for s in manifest["shards"]] == [2_000] * 6
