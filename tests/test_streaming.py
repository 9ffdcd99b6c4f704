"""Issue 5: encode memory stays flat whatever N is.

Peak RSS of an encode of N_LARGE synthetic images must not exceed that of a
small encode by more than what holding even one column in RAM would cost.
HASHSEARCH_STREAM_N=1000000 runs the million-image version reported in the README.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

N_SMALL = 2_000
N_LARGE = int(os.environ.get("HASHSEARCH_STREAM_N", 20_000))

# The child's own peak (VmHWM): ru_maxrss would carry over the pytest parent's.
_PEAK_RSS = """
import json, sys, time
from hashsearch.bench.sysinfo import peak_rss_mb
from hashsearch.cli import main
t = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t}), file=sys.stderr)
"""


def encode_peak(model, out, n) -> dict:
    args = ["encode", f"synthetic:{n}", "--model", str(model), "--out", str(out), "--shard-size", "5000",
            "--batch-size", "256", "--workers", "1", "--device", "cpu", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, *args], capture_output=True, text=True, timeout=7200)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_encode_memory_is_flat_in_n(model, tmp_path):
    small = encode_peak(model, tmp_path / "small", N_SMALL)
    large = encode_peak(model, tmp_path / "large", N_LARGE)
    # Keeping the decoded pixels (3 KB an image) or the float32 F7 (2 KB) of every
    # item would add at least 40 MB at 20,000 images; streaming adds nothing per item.
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    print(f"\nencode synthetic:{N_LARGE}: {large['seconds']:.1f}s, peak RSS {large['peak_rss_mb']:.0f} MB "
          f"(synthetic:{N_SMALL}: {small['peak_rss_mb']:.0f} MB)")
    assert growth < 30, (small, large)
    manifest = json.loads((tmp_path / "large" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["items"] == N_LARGE
    assert all(s["rows"] == 5000 for s in manifest["shards"][:-1])
