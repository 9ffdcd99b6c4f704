"""Edited copies found by the items' miniatures (engine/copies.py): encode stores them, compaction keeps them,
`duplicates` finds mirrored, turned, cropped and re-compressed copies of real images that F7 alone does not,
never names a deleted item, joins only the new items with --since, and a collection without miniatures
falls back to F7."""
from __future__ import annotations

import shutil

import numpy as np
import torch
import pytest

from conftest import cli, fashion_with_copies
from hashsearch.bench.near_duplicates import EDITS
from hashsearch.engine import Index
from hashsearch.engine.copies import VARIANTS, descriptors
from hashsearch.errors import HashsearchError
from hashsearch.shards import Collection
from hashsearch.shards.layout import MINIATURE_SIDE

N_IMAGES = 200
EDITED = (7, 61, 120, 188)              # each gets four edited copies
COPY_EDITS = ("mirror", "rotate", "crop", "jpeg")
LATER = (30,)                           # copies of this one come in a later `add`


def _edited(image, folder, stem: str) -> list[str]:
    out = []
    for edit in COPY_EDITS:
        path = folder / f"{stem}~{edit}.png"
        EDITS[edit](image.convert("RGB")).save(path)
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def edited(tmp_path_factory, model):
    return fashion_with_copies(tmp_path_factory.mktemp("copies"), model, N_IMAGES, EDITED, LATER, _edited)


@pytest.fixture
def edited_copy(edited, tmp_path):
    root = tmp_path / "coll"
    shutil.copytree(edited["root"], root)
    return root


def _planted_pairs(root, groups) -> set[tuple[int, int]]:
    with Index.open(root) as index:
        coll = index.collection
        out = set()
        for group in groups:
            ids = sorted(coll.ids()[coll.rows_for_paths(group)].tolist())
            out |= {(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]}
        return out


def test_a_variant_map_edits_the_miniature_as_the_edit_would():
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (5, 4, 4)).repeat(4, 1).repeat(4, 2).astype(np.uint8)
    mirrored = VARIANTS.index((True, 0.0, 0.0))
    flat = smooth.reshape(5, -1)
    assert np.allclose(descriptors(flat, mirrored), descriptors(smooth[:, :, ::-1].reshape(5, -1)), atol=1e-5)
    # a brighter, lower-contrast copy describes the same; a flat image describes nothing
    assert np.allclose(descriptors(flat), descriptors(flat * 0.8 + 10), atol=1e-5)
    assert not descriptors(np.full((1, MINIATURE_SIDE ** 2), 77, np.uint8)).any()


def test_encode_stores_miniatures_and_compaction_keeps_them(edited, edited_copy):
    with Collection.open(edited["root"]) as coll:
        stored = coll.miniatures()
        assert stored.shape == (coll.n, MINIATURE_SIDE ** 2) and stored.dtype == np.uint8
        row = coll.rows_for_paths([edited["groups"][0][0]])[0]
    from hashsearch.encoders.preprocess import miniatures, to_uint8_tensor
    from PIL import Image
    with Image.open(edited["groups"][0][0]) as im:
        pixels = to_uint8_tensor(im.convert("RGB"), 32)
    # the model's input is larger, so its cells average the same area of the picture: within rounding
    assert np.abs(miniatures(pixels[None]).astype(int) - stored[row].astype(int)).max() <= 8
    cli("delete", edited_copy, "--id", 0, "--id", 5)
    cli("compact", edited_copy, "--threshold", 0)
    with Collection.open(edited_copy) as coll:
        kept = coll.miniatures()
        assert kept.shape == (coll.n, MINIATURE_SIDE ** 2) and coll.n == len(stored) - 2
        assert (kept == np.delete(stored, [0, 5], axis=0)).all()


def test_edited_copies_are_found_by_their_miniatures_beyond_f7(edited):
    planted = _planted_pairs(edited["root"], edited["groups"])
    with Index.open(edited["root"]) as index:
        both = {tuple(p) for p in index.duplicates(max_distance=0.0).pairs.tolist()}
        f7 = {tuple(p) for p in index.duplicates(copy_distance=0).pairs.tolist()}      # F7 at its default
    # 33 of the 40 on this machine: a few crops and turns of these 28-pixel garments are missed
    assert len(planted & both) >= 0.8 * len(planted), (len(planted & both), len(planted))
    assert len(both - planted) <= 2, both - planted
    # F7 alone, at its default, finds 22 of the 40 with the session's tiny model; the miniatures add 11
    assert len((planted & both) - f7) >= 8, (len(planted & f7), len((planted & both) - f7))


def test_the_command_reports_the_edited_groups(edited):
    result = cli("duplicates", edited["root"], "--max-distance", 0)
    with Index.open(edited["root"]) as index:
        coll = index.collection
        wanted = [set(coll.ids()[coll.rows_for_paths(g)].tolist()) for g in edited["groups"]]
    found = [{int(item.split(":", 1)[0]) for item in line.split("  ") if item}
             for line in result.stdout.splitlines() if line.strip()]
    for group in wanted:
        assert any(len(group & f) >= 3 and f <= group for f in found), (group, found)


def test_deleted_items_never_appear_among_copies(edited, edited_copy):
    gone = [edited["groups"][0][0], edited["groups"][1][2]]
    with Index.open(edited_copy) as index:
        gone_ids = set(index.collection.ids()[index.collection.rows_for_paths(gone)].tolist())
    cli("delete", edited_copy, *[a for p in gone for a in ("--path", p)])
    with Index.open(edited_copy) as index:
        found = {tuple(p) for p in index.duplicates(max_distance=0.0).pairs.tolist()}
    assert not {i for p in found for i in p} & gone_ids
    # and the others are still found, by their own miniatures (a deletion shifts live positions against rows)
    planted = {p for p in _planted_pairs(edited_copy, [[m for m in g if m not in gone] for g in edited["groups"]])}
    assert len(planted & found) >= 0.8 * len(planted), (len(planted & found), len(planted))


def test_since_joins_only_the_new_copies(edited, edited_copy):
    with Index.open(edited_copy) as index:
        before = index.generation
    cli("add", edited_copy, edited["later"], "--workers", 0, "--device", "cpu", "--quiet")
    planted_new = _planted_pairs(edited_copy, edited["new_groups"])
    with Index.open(edited_copy) as index:
        new = index.duplicates(max_distance=0.0, since=before)
        first_new = new.since_id
        pairs = {tuple(p) for p in new.pairs.tolist()}
    assert pairs and all(max(p) >= first_new for p in pairs)
    assert len(planted_new & pairs) >= 0.8 * len(planted_new)


def test_a_collection_without_miniatures_has_f7_alone(tmp_path):
    """Rows written without images (here, the benchmarks' synthetic ones; or shards from before miniatures)."""
    from hashsearch.bench.synthetic import SyntheticModel, SyntheticSpec, generate_collection
    root = tmp_path / "syn"
    generate_collection(root, 400, dim=32, group_min=1, group_max=3)
    Index.build(root).close()
    with Index.open(root) as index:
        assert index.collection.miniatures() is None
        found = index.duplicates(max_distance=0.25)       # the synthetic groups' spread (bench/synthetic.py)
        sizes = SyntheticModel(SyntheticSpec(**index.collection.manifest["synthetic"])).group_sizes
    assert len(found.pairs) >= 0.9 * int((sizes * (sizes - 1) // 2).sum()) > 0


def test_the_writer_refuses_miniatures_of_another_shape(tmp_path):
    from hashsearch.shards import CollectionWriter
    writer = CollectionWriter(tmp_path / "c", bits=8, feature_dim=4, meta={"source": "x"})
    args = (np.zeros((2, 1), np.uint8), np.zeros((2, 4)), np.arange(2), np.zeros(2, np.int64), ["a", "b"])
    with pytest.raises(HashsearchError, match="miniatures must be uint8"):
        writer.add(*args, source_end=2, miniatures=np.zeros((2, 10), np.uint8))
    writer.add(*args, source_end=2, miniatures=np.zeros((2, MINIATURE_SIDE ** 2), np.uint8))
    with pytest.raises(HashsearchError, match="every batch or with none"):
        writer.add(*args, source_end=4)
    writer.abort()


def _layouts(n: int, seed: int) -> np.ndarray:
    """n random smooth miniatures: 4 x 4 blocks of light and dark."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 4, 4)).repeat(4, 1).repeat(4, 2).reshape(n, -1).astype(np.uint8)


def test_flat_miniatures_neither_pair_nor_crowd_out_copies():
    from hashsearch.config import COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR
    from hashsearch.engine.copies import copy_pairs
    items = _layouts(200, 0)
    copy = np.clip(items[7].astype(int) + 5, 0, 255).astype(np.uint8)[None]
    flat = np.zeros((9, MINIATURE_SIDE ** 2), np.uint8)          # blank images, or rows stored without one
    both = np.concatenate([items, copy, flat])
    pairs, _ = copy_pairs(both, COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR)
    assert pairs.tolist() == [[7, 200]]
    # a block of queries that is all flat finds nothing, and is no error
    pairs, _ = copy_pairs(both, COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR, queries=np.arange(201, 210))
    assert len(pairs) == 0


def test_since_finds_what_a_run_over_every_item_finds():
    """A crop variant edits the original's end only: a cropped copy added later is found from the original."""
    from hashsearch.bench.near_duplicates import EDITS
    from hashsearch.config import COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR
    from hashsearch.encoders.preprocess import miniatures, to_uint8_tensor
    from hashsearch.engine.copies import copy_pairs
    from PIL import Image
    rng = np.random.default_rng(1)
    base = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC)
            for _ in range(60)]
    later = [EDITS[e](base[5]) for e in ("crop", "rotate", "mirror")]
    m = miniatures(torch.stack([to_uint8_tensor(im, 32) for im in base + later]))
    every, every_dist = copy_pairs(m, COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR)
    since, since_dist = copy_pairs(m, COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR, queries=np.arange(60, 63))
    new = every.max(1) >= 60
    assert [5, 60] in every.tolist()
    # the same pairs at the same distances: the crop pair's, from the original's crop, is 0.03 (0.18 from the copy)
    assert since.tolist() == every[new].tolist()
    assert np.allclose(since_dist, every_dist[new], atol=1e-4), (since_dist, every_dist[new])


def test_a_few_items_are_paired_by_distance_alone():
    """With fewer items than the local scale's neighbour there is no scale: the distance decides."""
    from hashsearch.config import COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR
    from hashsearch.engine.copies import copy_pairs
    items = _layouts(3, 2)
    copy = np.clip(items[1].astype(int) * 0.9 + 3, 0, 255).astype(np.uint8)[None]
    pairs, _ = copy_pairs(np.concatenate([items, copy]), COPY_DISTANCE, COPY_RATIO, LOCAL_SCALE_NEIGHBOUR)
    assert pairs.tolist() == [[1, 3]]
