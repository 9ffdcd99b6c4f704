"""`hashsearch bench duplicates SOURCE --model M`: how well `hashsearch duplicates` finds planted groups.

The test set is made from a real folder of images (CIFAR-10's test JPEGs in the
README): a seeded share of the images each get 1 to 3 edited copies, each
copy a different edit of bench/near_duplicates.py's EDITS, written beside
the originals as PNG files (lossless, so the edit is all that changes).  The
folder is encoded with the given model and indexed, and the duplicate pairs
found at several thresholds are scored against the planted ones:
  pair precision  found pairs that are an original and its copy, or two
                  copies of one original;
  pair recall     planted pairs found.
Images of the folder that are already near-duplicates of each other (CIFAR-10
holds a few) count against precision: nothing here knows about them.

With --synthetic-n, it also times `hashsearch duplicates` itself, in a child
process so its peak RSS is its own, on a synthetic collection of that size
(bench/synthetic.py, F7-like features in groups of 1 to 4 near-identical
rows: planted duplicates, not images) after `build-index` fits its neighbour
codes.  The test set and the synthetic collection are kept in --work, so a
second run reuses them.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..config import DuplicatesBenchConfig, DuplicatesConfig
from ..engine import Index
from ..errors import HashsearchError
from ..fileio import atomic_write_bytes
from ..shards import Collection
from .near_duplicates import EDITS
from .sysinfo import machine_info

TRUTH = "truth.json"


def build_test_set(source_spec: str, folder: Path, share: float, seed: int) -> dict:
    """Write the test set into `folder` (originals linked, copies as PNG); its planted groups, by path.
    A folder already holding the same test set is reused."""
    from ..encoders.sources import open_source
    source = open_source(source_spec)
    spec = {"source": source.spec, "images": len(source), "share": share, "seed": seed, "edits": list(EDITS)}
    truth_path = folder / TRUTH
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        if truth["spec"] == spec:
            return truth
        raise HashsearchError(f"{folder} holds another test set; give another --work")
    rng = np.random.default_rng(seed)
    edited = np.sort(rng.choice(len(source), round(share * len(source)), replace=False))
    copies = {int(i): rng.choice(list(EDITS), rng.integers(1, 4), replace=False).tolist() for i in edited}
    images = folder / "images"
    groups = []
    for i in range(len(source)):
        original = source.file(i)
        if original is None:
            raise HashsearchError(f"{source_spec} is not a folder or list of image files")
        rel = Path(os.path.relpath(original, source.spec))
        target = images / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(original, target)
            except OSError:          # another file system: a copy reads the same
                shutil.copyfile(original, target)
        if i in copies:
            im = source.load(i)
            members = [str(target)]
            for edit in copies[i]:
                path = target.with_name(f"{target.stem}~{edit}.png")
                EDITS[edit](im).save(path)
                members.append(str(path))
            groups.append([os.path.relpath(m, folder) for m in members])
    truth = {"spec": spec, "groups": groups}
    atomic_write_bytes(truth_path, json.dumps(truth).encode())
    return truth


def _id_of_member(id_of: dict, testset: Path, member: str) -> int:
    """The id of a planted group's member, named relative to the test set's folder (or absolute)."""
    found = id_of.get(os.path.realpath(testset / member))
    if found is None:
        raise HashsearchError(f"the test set in {testset} names {member}, which its collection does not hold; "
                              f"give another --work")
    return found


def run_duplicates_bench(source: str, model_path, *, share: float = DuplicatesBenchConfig.share,
                         seed: int = DuplicatesBenchConfig.seed, distances: str = DuplicatesBenchConfig.distances,
                         copy_distances: str = DuplicatesBenchConfig.copy_distances,
                         work: str | None = DuplicatesBenchConfig.work,
                         relative: float | None = DuplicatesBenchConfig.relative,
                         synthetic_n: int = DuplicatesBenchConfig.synthetic_n,
                         synthetic_dim: int = DuplicatesBenchConfig.synthetic_dim) -> dict:
    DuplicatesBenchConfig(share=share, seed=seed, distances=distances, copy_distances=copy_distances, work=work,
                          relative=relative, synthetic_n=synthetic_n, synthetic_dim=synthetic_dim)
    # F7's thresholds alone, then the miniatures' beside F7's default.
    thresholds = [(d, None) for d in _thresholds(distances, "max_distance")] + \
        [(DuplicatesConfig.max_distance, c) for c in _thresholds(copy_distances, "copy_distance")]
    if work is None:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="hashsearch-dup-") as tmp:
            return _run(source, model_path, share, seed, thresholds, Path(tmp), relative, synthetic_n,
                        synthetic_dim)
    return _run(source, model_path, share, seed, thresholds, Path(work), relative, synthetic_n, synthetic_dim)


def _thresholds(text: str, field: str) -> list[float]:
    flag = "--distances" if field == "max_distance" else "--copy-distances"
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HashsearchError(f"{flag} must be numbers separated by commas, got {text!r}") from None
    for v in values:
        DuplicatesConfig(**{field: v})
    if not values and field == "max_distance":
        raise HashsearchError("--distances names no threshold")
    return sorted(values)


def _run(source, model_path, share, seed, thresholds, work: Path, relative, synthetic_n, synthetic_dim) -> dict:
    from ..encoders.runner import encode_collection
    truth = build_test_set(source, work / "testset", share, seed)
    coll_dir = work / "collection"
    started = time.perf_counter()
    encode_collection(model_path, str(work / "testset" / "images"), coll_dir, quiet=True, log=lambda *_: None)
    encode_seconds = time.perf_counter() - started
    if "index" not in Collection.open(coll_dir).manifest:
        Index.build(coll_dir).close()
    rows = []
    with Index.open(coll_dir) as index:
        coll = index.collection
        id_of = dict(zip(map(os.path.realpath, coll.paths(coll.live_rows())), coll.ids()[coll.live_rows()].tolist()))
        planted = set()
        edit_of = {}
        for group in truth["groups"]:
            members = [_id_of_member(id_of, work / "testset", p) for p in group]
            ids = sorted(members)
            planted |= {(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]}
            first = members[0]
            for p, copy in zip(group[1:], members[1:]):
                edit_of[(min(first, copy), max(first, copy))] = p.rsplit("~", 1)[1].rsplit(".", 1)[0]
        for threshold, copy_distance in thresholds:
            if copy_distance is not None and not coll.has_miniatures:
                continue
            started = time.perf_counter()
            found = index.duplicates(max_distance=threshold, relative=relative, copy_distance=copy_distance)
            seconds = time.perf_counter() - started
            pairs = set(map(tuple, found.pairs.tolist()))
            hits = len(pairs & planted)
            per_edit = {}
            for pair, edit in edit_of.items():
                per_edit.setdefault(edit, []).append(pair in pairs)
            rows.append({"max_distance": threshold, "copy_distance": copy_distance, "pairs": len(pairs),
                         "precision": hits / max(len(pairs), 1), "recall": hits / len(planted),
                         "seconds": round(seconds, 3),
                         "groups": len(found.groups()),
                         "recall_by_edit": {e: round(float(np.mean(v)), 3) for e, v in sorted(per_edit.items())}})
        report = {"source": source, "model": str(model_path), "items": coll.items, "planted_groups": len(truth["groups"]),
                  "planted_pairs": len(planted), "radius": DuplicatesConfig.radius, "relative": relative,
                  "encode_seconds": round(encode_seconds, 1),
                  "rows": rows, "machine": machine_info()}
    if synthetic_n:
        report["synthetic"] = _time_synthetic(work / f"synthetic-{synthetic_n}-d{synthetic_dim}", synthetic_n,
                                              synthetic_dim)
    return report


def _time_synthetic(root: Path, n: int, dim: int) -> dict:
    """`hashsearch duplicates` on a synthetic collection of n rows in groups of 1 to 4: its time and peak RSS,
    in a child process; pairs found against the planted ones."""
    from .synthetic import SyntheticModel, SyntheticSpec, generate_collection
    started = time.perf_counter()
    coll = generate_collection(root, n, dim=dim, group_min=1, group_max=4, miniatures=True, progress=True)
    generate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    if "index" not in coll.manifest:
        Index.build(root).close()
    build_seconds = time.perf_counter() - started
    out = root.parent / f"{root.name}-duplicates.json"
    command = [sys.executable, "-m", "hashsearch.cli", "duplicates", str(root), "--json", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise HashsearchError(f"duplicates on {root} failed: {done.stderr.strip()}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads(out.read_text())
    spec = SyntheticSpec(**Collection.open(root).manifest["synthetic"])
    sizes = SyntheticModel(spec).group_sizes
    planted = int((sizes * (sizes - 1) // 2).sum())
    return {"items": n, "dim": dim, "planted_pairs": planted, "pairs": report["pairs"],
            "candidates": report["candidates"], "groups": len(report["groups"]),
            "generate_seconds": round(generate_seconds, 1), "build_index_seconds": round(build_seconds, 1),
            "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb), "command": " ".join(command[1:])}


def format_duplicates_report(r: dict) -> str:
    lines = [f"duplicates: {r['items']} items of {r['source']} with {r['planted_groups']} planted groups "
             f"({r['planted_pairs']} pairs), model {r['model']}, radius {r['radius']}"
             + ("" if r.get("relative") is None else f", relative {r['relative']}"),
             "| max distance | copy distance | pairs | precision | recall | groups | seconds | recall by edit |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in r["rows"]:
        edits = ", ".join(f"{e} {v:.2f}" for e, v in row["recall_by_edit"].items())
        copy = "-" if row.get("copy_distance") is None else row["copy_distance"]
        lines.append(f"| {row['max_distance']} | {copy} | {row['pairs']} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row['groups']} | {row['seconds']:.2f} | {edits} |")
    s = r.get("synthetic")
    if s:
        lines.append(f"synthetic {s['items']:,} x {s['dim']}-d: `hashsearch {s['command']}` took {s['seconds']} s, "
                     f"peak RSS {s['peak_rss_mb']} MiB; {s['pairs']:,} pairs found of {s['planted_pairs']:,} planted "
                     f"({s['candidates']:,} candidates); build-index {s['build_index_seconds']} s")
    lines.append(f"cpu: {r['machine'].get('cpu', r['machine'])}")
    return "\n".join(lines)
