"""`hashsearch bench --encode`: is the encode pipeline as fast as the model?

Measures, on the same images and batch size:
  model     images/s of the model alone on batches already decoded in RAM;
  pipeline  images/s of `hashsearch encode` end to end (decode in workers,
            model, HDF5 writer thread), into a scratch collection.
The pipeline is not the bottleneck when their ratio is close to 1.
"""
from __future__ import annotations

import tempfile
import time

import torch

from ..config import EncodeBenchConfig, EncodeConfig
from ..encoders.dataset import make_loader
from ..encoders.encoder import Encoder
from ..encoders.runner import encode_collection
from ..encoders.sources import open_source


def run_encode_bench(model_path, source_spec: str, *, limit: int | None = EncodeBenchConfig.limit,
                     batch_size: int = EncodeConfig.batch_size, workers: int = EncodeConfig.workers,
                     device: str = EncodeConfig.device, data_dir: str | None = EncodeConfig.data_dir, quiet: bool = True,
                     precision: str = EncodeConfig.precision) -> dict:
    EncodeConfig(limit=limit, batch_size=batch_size, workers=workers, device=device, precision=precision)
    encoder = Encoder.from_checkpoint(model_path, device=device, precision=precision)
    source = open_source(source_spec, data_dir=data_dir, limit=limit)
    batches = [pixels for _, pixels, _, _ in make_loader(source, encoder.input_size, batch_size, workers)]
    n = sum(len(b) for b in batches)
    encoder.encode_batch(batches[0])  # warm-up: first-call allocations and kernel selection
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for b in batches:
        encoder.encode_batch(b)
    model_seconds = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="hashsearch-bench-") as tmp:
        started = time.perf_counter()
        encode_collection(model_path, source_spec, f"{tmp}/collection", limit=limit, batch_size=batch_size,
                          workers=workers, device=device, data_dir=data_dir, quiet=quiet, precision=precision,
                          log=lambda *_: None)
        pipeline_seconds = time.perf_counter() - started
    model_ips, pipeline_ips = n / model_seconds, len(source) / pipeline_seconds
    return {
        "source": source.spec, "images": len(source), "batch_size": batch_size, "workers": workers,
        "device": str(encoder.device), "backbone": encoder.config["backbone"], "torch_threads": torch.get_num_threads(),
        "input_size": encoder.input_size, "precision": precision,
        "model_images_per_s": round(model_ips, 1), "pipeline_images_per_s": round(pipeline_ips, 1),
        "ratio": round(pipeline_ips / model_ips, 3),
    }


def format_encode_report(r: dict) -> str:
    return "\n".join([
        f"encode throughput: {r['images']} images of {r['source']} ({r['backbone']} at {r['input_size']} px, "
        f"{r['device']}, precision {r['precision']}, "
        f"batch {r['batch_size']}, {r['workers']} workers, {r['torch_threads']} torch threads)",
        f"  model alone (decoded batches in RAM): {r['model_images_per_s']:>10.1f} images/s",
        f"  hashsearch encode, end to end:        {r['pipeline_images_per_s']:>10.1f} images/s",
        f"  pipeline / model:                     {r['ratio'] * 100:>9.1f} %",
    ])
