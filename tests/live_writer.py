"""A light writer process for the live-collection tests: the storage side of encode, add, delete, compact.

    python live_writer.py create ROOT N [PAUSE]    a new collection of N deterministic rows, PAUSE s a batch
    python live_writer.py append ROOT FIRST N      rows FIRST..FIRST+N-1 (paths already present are skipped, as add does)
    python live_writer.py delete ROOT ID...        delete the ids that are still live
    python live_writer.py compact ROOT THRESHOLD
    python live_writer.py hold ROOT                hold the write lock until stdin closes

It prints "ready" once imports are done, then works, then prints "done"; errors are one line and exit 1,
as in the CLI.
No torch, so a test can start and kill many of these quickly.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from hashsearch.codes import pack_codes
from hashsearch.errors import HashsearchError
from hashsearch.shards import Collection, CollectionWriter, delete_items

BITS, DIM, SHARD = 32, 64, 200


def item_rows(first: int, n: int):
    """Rows first..first+n-1: features clustered by item number, codes the sign of a fixed projection."""
    proj = np.random.default_rng(12345).normal(size=(DIM, BITS)).astype(np.float32)
    centers = np.random.default_rng(54321).normal(size=(16, DIM)).astype(np.float32)
    items = np.arange(first, first + n)
    noise = np.stack([np.random.default_rng(int(i)).normal(size=DIM).astype(np.float32) for i in items]) \
        if n else np.zeros((0, DIM), np.float32)
    feats = centers[items % 16] + 0.4 * noise
    return pack_codes(feats @ proj > 0), feats, items % 16, [f"item-{i}" for i in items]


def create(root, n: int, pause: float = 0.0) -> None:
    """As encode does: resumes an unfinished collection, leaves a finished one alone; `pause` a batch stands for the model."""
    codes, feats, labels, paths = item_rows(0, n)
    with CollectionWriter(root, bits=BITS, feature_dim=DIM, shard_size=SHARD, meta={"source": f"items:{n}"}) as w:
        if w.complete:
            w.close()
            return
        for a in range(w.resume_from, n, 64):
            time.sleep(pause)
            b = min(n, a + 64)
            w.add(codes[a:b], feats[a:b], np.arange(a, b), labels[a:b], paths[a:b], source_end=b)
        w.finish(n)


def append(root, first: int, n: int) -> None:
    writer = CollectionWriter.append(root)
    try:
        with Collection.open(root, allow_empty=True) as coll:
            present, next_id = coll.live_paths(), coll.next_id
        codes, feats, labels, paths = item_rows(first, n)
        new = np.array([i for i, p in enumerate(paths) if p not in present], np.int64)
        for a in range(0, len(new), 64):
            part = new[a:a + 64]
            writer.add(codes[part], feats[part], next_id + np.arange(a, a + len(part)), labels[part],
                       [paths[i] for i in part], source_end=int(part[-1]) + 1, source_index=part)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def delete(root, ids) -> None:
    with Collection.open(root, allow_empty=True) as coll:
        gone = set(coll.ids()[coll.deleted_rows].tolist())
    todo = [i for i in ids if i not in gone]
    if todo:
        delete_items(root, ids=todo)


def compact(root, threshold: float) -> None:
    from hashsearch.engine.compact import compact as run
    run(root, threshold)


def main(argv) -> int:
    op, root, *args = argv
    print("ready", flush=True)
    try:
        if op == "create":
            create(root, int(args[0]), float(args[1]) if len(args) > 1 else 0.0)
        elif op == "append":
            append(root, int(args[0]), int(args[1]))
        elif op == "delete":
            delete(root, [int(a) for a in args])
        elif op == "compact":
            compact(root, float(args[0]))
        elif op == "hold":
            from hashsearch.shards import WriteLock
            with WriteLock(root):
                print("holding", flush=True)
                sys.stdin.read()
    except HashsearchError as exc:
        print(f"hashsearch: error: {exc}", file=sys.stderr)
        return 1
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
