"""Query a collection by images or by stored ids: encoder + index in one call.

This is what `hashsearch query` runs, and what a pipeline embedding
hashsearch calls; results are plain dicts ready for JSON.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

from .config import ANY_DEVICE_PRECISIONS, RaySearchConfig, saw_labels
from .engine import Index, SearchConfig
from .engine.index import check_index_meta, search_params
from .errors import HashsearchError
from .shards import Collection
from .shards.manifest import disk_bytes


def run_query(collection, *, images=(), ids=(), params: SearchConfig | None = None, model_path=None,
              index_dir=None, ray: RaySearchConfig | None = None, **options) -> dict:
    """`hashsearch query`: the k nearest items to each image and stored id; `ray` searches on Ray.
    `params` and `options` as Index.search takes them."""
    if not len(images) and not len(ids):
        raise HashsearchError("give at least one image or id to query")
    params = search_params(params, **options)
    with search_index(collection, index_dir, ray) as index:
        return _query(index, images, ids, params, model_path)


@contextlib.contextmanager
def search_index(collection, index_dir=None, ray: RaySearchConfig | None = None):
    """The index a query or a server searches, closed afterwards: an engine Index, or with ray.ray a
    distributed ShardedIndex on the cluster ray.address names (one is started on 127.0.0.1 if none)."""
    if ray is None or not ray.ray:
        with Index.open(collection, index_dir) as index:
            yield index
        return
    if index_dir is not None:
        raise HashsearchError("--index cannot be combined with --ray: partitions take the collection's own index settings")
    from .distributed import ShardedIndex, ray_cluster
    with ray_cluster(ray.address), ShardedIndex(collection, ray.partitions, start_timeout=ray.start_timeout) as index:
        yield index


def _query(index, images, ids, params: SearchConfig, model_path) -> dict:
    coll = index.collection
    names, codes, feats = [], [], []
    if images:
        for path in images:
            if not Path(path).exists():
                raise HashsearchError(f"query image not found: {path}")
        c, f = query_encoder(coll, model_path).encode(list(images))
        names += [str(p) for p in images]
        codes.append(c)
        feats.append(f)
    if ids:
        c, f = stored_query(index, ids)
        names += [f"id:{i}" for i in ids]
        codes.append(c)
        feats.append(f)
    result = index.search(np.concatenate(codes), np.concatenate(feats), params)
    return {"mode": params.mode, "k": params.k, "queries": describe_results(index, names, result)}


def query_encoder(coll: Collection, model_path=None):
    """The encoder that makes queries comparable with `coll`: its model, in its arithmetic, on the CPU."""
    from .encoders.encoder import Encoder   # torch is only needed to encode new images
    model_path = model_path or coll.model_path
    if model_path is None:
        raise HashsearchError(f"{coll.root} has no model.pt; pass --model")
    # bf16 collections get bf16 queries; fp16 (a GPU's) is not run on the CPU.
    recorded = coll.manifest.get("precision")
    precision = recorded if recorded in ANY_DEVICE_PRECISIONS else "fp32"
    encoder = Encoder.from_checkpoint(model_path, device="cpu", expect_bits=coll.bits, precision=precision)
    if encoder.feature_dim != coll.feature_dim:
        raise HashsearchError(f"model {model_path} makes {encoder.feature_dim}-d features but {coll.root} "
                              f"holds {coll.feature_dim}-d features")
    return encoder


def stored_query(index: Index, ids) -> tuple[np.ndarray, np.ndarray]:
    """(codes, float32 features) of live items, to search by: no model needed."""
    rows = index.collection.rows_for_ids(list(ids), live=True)
    return index.codes[rows], index.collection.features(rows)


def describe_results(index: Index, names: list[str], result) -> list[dict]:
    """One {"query", "results": [{rank, id, path, label, hamming, distance}]} per query, ready for JSON."""
    coll = index.collection
    class_names = coll.manifest.get("class_names") or []
    queries = []
    for q, name in enumerate(names):
        cols = np.flatnonzero(result.rows[q] >= 0)
        rows = result.rows[q, cols]
        # tolist() turns a column into Python numbers in one call: a service describes every answer here
        columns = zip(result.ids[q, cols].tolist(), coll.paths(rows), coll.labels()[rows].tolist(),
                      result.hamming[q, cols].tolist(), result.distances[q, cols].tolist())
        hits = [{"rank": rank + 1, "id": item, "path": path,
                 "label": class_names[label] if 0 <= label < len(class_names) else label,
                 "hamming": hamming, "distance": None if math.isnan(dist) else dist}
                for rank, (item, path, label, hamming, dist) in enumerate(columns)]
        queries.append({"query": name, "results": hits})
    return queries


def collection_info(root, verify: bool = False) -> dict:
    coll = Collection.open(root, require_complete=False, allow_empty=True)
    m = coll.manifest
    report = {
        "path": str(Path(root).resolve()), "complete": bool(m.get("complete")), "generation": coll.generation,
        "items": coll.items, "deleted": len(coll.deleted_rows), "shards": len(coll.shards), "bits": coll.bits,
        "feature_dim": coll.feature_dim, "feature_dtype": str(coll.feature_dtype),
        "rejected": coll.rejected, "backbone": m.get("backbone"), "precision": m.get("precision"),
        "trained_without_labels": not saw_labels(m.get("training")),
        "source": m.get("source_spec"),
        "classes": len(m.get("class_names") or []), "bytes_on_disk": disk_bytes(root),
    }
    index = m.get("index")
    if index is not None:
        check_index_meta(index, coll.root / "manifest.json", len(coll.shards))
        report["index"] = index["coarse"]["kind"]
        # Rows added since the index was built: searched exhaustively until the next build-index.
        report["index_delta"] = coll.n - int(coll.offsets[len(index["base_shards"])])
        report["neighbour_bits"], report["cells"] = index.get("neighbour_bits") or 0, index.get("cells") or 0
        tuned = index.get("tuned")
        if tuned:       # what hds searches use unless told (engine/tuning.py), and what build-index measured
            report["hds_sources"] = (f"neighbour pool {tuned['neighbour_pool']}, {tuned['neighbour_cells']} cells: "
                                     f"recall@10 {tuned.get('recall')} in {tuned.get('ms')} ms on "
                                     f"{tuned.get('queries')} of its rows")
    if verify:
        report["problems"] = coll.verify()
        report["verified"] = not report["problems"]
    return report
