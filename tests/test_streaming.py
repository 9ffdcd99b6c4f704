"""Issue 5: encode memory stays flat whatever N is.

Python-side allocations (numpy arrays, including the decoded pixels, codes,
features and paths of every batch) are traced with tracemalloc: their peak
must not grow with N, which it would if anything kept per-item state.  Peak
RSS is a noisier witness (allocator arenas and page cache move it by tens of
MB), so the million-image RSS figure in the README comes from /usr/bin/time.
"""
from __future__ import annotations

import json
import tracemalloc

from hashsearch.encoders.runner import encode_collection

N_SMALL, N_LARGE = 1_000, 12_000


def traced_peak_mb(model, out, n) -> float:
    tracemalloc.start()
    try:
        encode_collection(model, f"synthetic:{n}", out, batch_size=200, workers=0, device="cpu",
                          shard_size=2_000, quiet=True, log=lambda *_: None)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_encode_memory_is_flat_in_n(model, tmp_path):
    small = traced_peak_mb(model, tmp_path / "small", N_SMALL)
    large = traced_peak_mb(model, tmp_path / "large", N_LARGE)
    # Keeping the pixels (3 KB an image) or the F7 rows (1 KB in float16) of every
    # item would add at least 11 MB over the extra 11,000 images.
    assert large - small < 4, (small, large)
    manifest = json.loads((tmp_path / "large" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["items"] == N_LARGE
    assert [s["rows"] for s in manifest["shards"]] == [2_000] * 6
