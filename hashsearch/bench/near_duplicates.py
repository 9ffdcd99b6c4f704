"""`hashsearch eval DB --near-duplicates N`: does search find the original of an edited copy?

A user searches a photo collection for *this* picture and its edited copies,
not only for its class.  N database images, drawn with a seed, are each
edited in every way of EDITS; each copy is encoded with the collection's own
model and searched in every mode.  A hit at 1 is the original ranked first,
a hit at 10 the original among the first 10.  Ranks are those of the
collection's own index with the search defaults (SearchConfig), so the
figures are what `query --image` gives.
"""
from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ..config import MODES, SearchConfig
from ..engine import Index
from ..errors import HashsearchError
from ..retrieval import query_encoder

K = 10


def _jpeg(im: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=30)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(im: Image.Image) -> Image.Image:
    w, h = im.size
    dx, dy = round(w * 0.1), round(h * 0.1)
    return im.crop((dx, dy, w - dx, h - dy))


def _rescale(im: Image.Image) -> Image.Image:
    w, h = im.size
    return im.resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR).resize((w, h), Image.BILINEAR)


# Each is an edit a photo library sees, at a strength that leaves the picture plainly the same one.
EDITS = {
    "jpeg": _jpeg,                                                        # re-saved at quality 30
    "crop": _crop,                                                        # 10 % off every side
    "rescale": _rescale,                                                  # halved, then enlarged back
    "brightness": lambda im: ImageEnhance.Brightness(im).enhance(1.4),     # 40 % brighter
    "mirror": ImageOps.mirror,                                            # left-right flip
    "rotate": lambda im: im.rotate(8, resample=Image.BILINEAR),          # 8 degrees, corners black
}
# The rankings compared: every mode at the search defaults, and hds with H's pool alone (the paper's).
RANKINGS = {mode: {"mode": mode} for mode in MODES} | {
    "hds, H pool only": {"mode": "hds", "neighbour_pool": 0, "neighbour_cells": 0}}


def run_near_duplicates(database, n: int, seed: int = 0, params: SearchConfig | None = None) -> dict:
    """Top-1 and top-10 hit rates per ranking and per edit, for edited copies of `n` database images."""
    from ..encoders.images import ImageRejected, load_image
    params = params or SearchConfig()
    with Index.open(database) as index:
        coll = index.collection
        live = coll.live_rows()
        if n <= 0 or n > len(live):
            raise HashsearchError(f"--near-duplicates must be from 1 to the {len(live)} live items, got {n}")
        rows = np.sort(np.random.default_rng(seed).choice(live, n, replace=False))
        try:
            originals = [load_image(p) for p in coll.paths(rows)]
        except ImageRejected as exc:
            raise HashsearchError(f"--near-duplicates reads the database's image files, and one of "
                                  f"{coll.root}'s cannot be read ({exc}); use a collection of a folder or "
                                  "list SOURCE whose files are in place") from None
        started = time.perf_counter()
        codes, feats = query_encoder(coll).encode([edit(im) for edit in EDITS.values() for im in originals])
        encode_seconds = time.perf_counter() - started
        wanted = np.tile(coll.ids()[rows], len(EDITS))
        npool, cells = index.neighbour_sources(dataclasses.replace(params, k=K))
        table = {}
        for name, settings in RANKINGS.items():
            found = index.search(codes, feats, dataclasses.replace(params, k=K, **settings)).ids
            table[name] = _hit_rates(found, wanted, n)
    return {"database": str(database), "items": int(coll.items), "originals": n, "seed": seed, "k": K,
            "edits": list(EDITS), "pool": params.pool, "neighbour_pool": npool, "neighbour_cells": cells,
            "encode_seconds": round(encode_seconds, 2), "rankings": table}


def _hit_rates(found: np.ndarray, wanted: np.ndarray, n: int) -> dict:
    top1 = found[:, 0] == wanted
    top10 = (found == wanted[:, None]).any(1)
    rates = {"all": {"top1": float(top1.mean()), "top10": float(top10.mean())}}
    for e, name in enumerate(EDITS):
        part = slice(e * n, (e + 1) * n)
        rates[name] = {"top1": float(top1[part].mean()), "top10": float(top10[part].mean())}
    return rates


def format_near_duplicates(report: dict) -> str:
    edits = ["all", *report["edits"]]
    lines = [f"near-duplicates: {report['originals']} originals x {len(report['edits'])} edits against "
             f"{report['items']} items (seed {report['seed']}); top-1 / top-10",
             "| ranking | " + " | ".join(edits) + " |", "| --- |" + " ---: |" * len(edits)]
    for name, rates in report["rankings"].items():
        cells = [f"{rates[e]['top1']:.3f} / {rates[e]['top10']:.3f}" for e in edits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
