"""`hashsearch duplicates` and Index.duplicates: planted groups of a small real folder (Fashion-MNIST PNGs)
are found, each pair once, without deleted items; --since reports only the new groups; the contact sheet
names only the collection's items; bad input is one line and a non-zero exit."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import ImageEnhance

from conftest import FMNIST, cli, fashion_with_copies
from hashsearch.engine import Index
from hashsearch.engine.duplicates import group_pairs
from hashsearch.errors import HashsearchError

N_IMAGES = 300
PLANTED = (3, 40, 77, 150, 222)          # each gets an exact copy and a slightly brightened one
ADDED = (10, 99)                         # copies of these come in a later `add`
# Below the distance of any two different garments here (0.052 and up with the session model), above that of
# a copy (0.02 at most), in units of the median F7 length.
MAX_DISTANCE = "0.035"
# These tests are of F7's pairs: the miniatures' (tests/test_copies.py) would add look-alike garments.
F7_ALONE = ("--copy-distance", "0")


def _copies(image, folder, stem: str) -> list[str]:
    exact, brighter = folder / f"{stem}~copy.png", folder / f"{stem}~bright.png"
    image.save(exact)
    ImageEnhance.Brightness(image).enhance(1.01).save(brighter)
    return [str(exact), str(brighter)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, model):
    """300 Fashion-MNIST test images as PNG files, 5 of them with two copies, encoded and indexed; and a
    folder of copies of 2 more, to add later."""
    return fashion_with_copies(tmp_path_factory.mktemp("dups"), model, N_IMAGES, PLANTED, ADDED, _copies)


@pytest.fixture
def planted_copy(planted, tmp_path):
    root = tmp_path / "coll"
    shutil.copytree(planted["root"], root)
    return root


def _ids_of(root, paths) -> set[int]:
    with Index.open(root) as index:
        coll = index.collection
        return set(coll.ids()[coll.rows_for_paths(paths)].tolist())


def _reported(result) -> list[set[int]]:
    """The groups of the command's output, as sets of ids."""
    return [{int(item.split(":", 1)[0]) for item in re.split(r"  +", line) if item}
            for line in result.stdout.splitlines() if line.strip()]


def test_planted_groups_are_found(planted):
    result = cli("duplicates", planted["root"], "--max-distance", MAX_DISTANCE, *F7_ALONE)
    found = _reported(result)
    wanted = [_ids_of(planted["root"], g) for g in planted["groups"]]
    assert sorted(map(sorted, found)) == sorted(map(sorted, wanted)), (found, wanted)
    # the most central item comes first, at distance 0 from itself
    for line in result.stdout.splitlines():
        assert "(" not in line.split("  ")[0]


def test_the_library_returns_each_pair_once_with_its_distance(planted):
    with Index.open(planted["root"]) as index:
        found = index.duplicates(max_distance=float(MAX_DISTANCE), copy_distance=0)
    pairs = found.pairs
    assert pairs.dtype == np.int64 and pairs.shape == (15, 2)        # 5 groups of 3: 3 pairs each
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    assert found.distances.shape == (15,) and (found.distances <= float(MAX_DISTANCE)).all()


def test_no_pair_is_reported_twice_by_the_join():
    from hashsearch.engine.duplicates import hamming_join
    codes = np.zeros((6, 4), np.uint8)          # six identical codes: every pair is found from both ends
    pairs = hamming_join(codes, 0)
    assert len(pairs) == 15 and len({tuple(p) for p in pairs.tolist()}) == 15
    assert (pairs[:, 0] < pairs[:, 1]).all()
    only = hamming_join(codes, 0, queries=np.array([2, 4]))
    assert {tuple(p) for p in only.tolist()} == {(a, b) for a in range(6) for b in range(a + 1, 6) if {a, b} & {2, 4}}


def test_a_group_that_chains_is_split_around_centres():
    # 0-1-2-3-4-5-6 in a line: no item is near all the others, so the chain becomes stars
    pairs = np.array([[k, k + 1] for k in range(6)], np.int64)
    labels, centres = group_pairs(7, pairs, np.full(6, 0.1, np.float32))
    groups = [set(np.flatnonzero(labels == g).tolist()) for g in range(len(centres))]
    for g, centre in zip(groups, centres):
        assert all(abs(m - centre) <= 1 for m in g), groups      # every member a partner of its centre
    assert set().union(*groups) <= set(range(7)) and len(groups) >= 2
    # a star stays whole, centred on its hub
    star = np.array([[0, 3], [1, 3], [2, 3]], np.int64)
    labels, centres = group_pairs(4, star, np.full(3, 0.1, np.float32))
    assert centres.tolist() == [3] and (labels == 0).all()


def test_deleted_items_never_appear(planted_copy, planted):
    gone = [planted["groups"][0][1], planted["groups"][1][0]]
    gone_ids = _ids_of(planted_copy, gone)
    cli("delete", planted_copy, *[a for p in gone for a in ("--path", p)])
    result = cli("duplicates", planted_copy, "--max-distance", MAX_DISTANCE, *F7_ALONE, "--json", planted_copy / "d.json")
    reported = set().union(*_reported(result))
    assert not reported & gone_ids
    with Index.open(planted_copy) as index:
        assert not set(index.duplicates(max_distance=float(MAX_DISTANCE), copy_distance=0).pairs.ravel().tolist()) & gone_ids
    data = json.loads((planted_copy / "d.json").read_text())
    assert not {item["id"] for g in data["groups"] for item in g["items"]} & gone_ids
    assert len(data["groups"]) == 5          # the two groups lost one member each and keep two


def test_since_reports_only_the_new_groups(planted_copy, planted):
    with Index.open(planted_copy) as index:
        before = index.generation
    cli("add", planted_copy, planted["later"], "--workers", 0, "--device", "cpu", "--quiet")
    every = _reported(cli("duplicates", planted_copy, "--max-distance", MAX_DISTANCE, *F7_ALONE))
    assert len(every) == 7
    new = _reported(cli("duplicates", planted_copy, "--max-distance", MAX_DISTANCE, *F7_ALONE, "--since", before))
    wanted = [_ids_of(planted_copy, g) for g in planted["new_groups"]]
    assert sorted(map(sorted, new)) == sorted(map(sorted, wanted))
    assert _reported(cli("duplicates", planted_copy, "--max-distance", MAX_DISTANCE, *F7_ALONE, "--since", before + 1)) == []


def test_the_html_names_only_items_of_the_collection(planted_copy, planted):
    # a deletion shifts the live items' positions against their rows: the sheet must still name the right ones
    cli("delete", planted_copy, "--path", str(planted_copy.parent / "nothing"), ok=False)
    cli("delete", planted_copy, "--id", 0, "--id", 1)
    missing = planted["groups"][2][2]
    moved = missing + ".moved"
    os.rename(missing, moved)
    try:
        cli("duplicates", planted_copy, "--max-distance", MAX_DISTANCE, *F7_ALONE, "--html", planted_copy / "sheet.html")
    finally:
        os.rename(moved, missing)
    page = (planted_copy / "sheet.html").read_text()
    with Index.open(planted_copy) as index:
        coll = index.collection
        live = dict(zip(coll.ids()[coll.live_rows()].tolist(), coll.paths(coll.live_rows())))
    named = re.findall(r"id (\d+) \([^)]*\)<br>([^<]*)</figcaption>", page)
    assert len(named) == 15
    for item_id, path in named:
        assert live[int(item_id)] == path.replace("&amp;", "&")
    assert page.count("data:image/jpeg;base64,") == 14 and page.count("no image") == 1


def test_thumbnails_of_idx_members_are_read(collection):
    from hashsearch.encoders.item_images import ItemImages
    from hashsearch.encoders.sources import open_source
    if not os.path.isdir(FMNIST):
        pytest.skip("dataset-fashion-mnist not installed")
    source = open_source("fashion-mnist:test", limit=3)
    assert ItemImages(None).load(source.path(2)).tobytes() == source.load(2).tobytes()


@pytest.mark.parametrize("args, message", [
    (["--max-distance", "-1"], "max-distance must be zero or more"),
    (["--max-distance", "nan"], "max-distance must be finite"),
    (["--max-distance", "inf"], "max-distance must be finite"),
    (["--relative", "-1"], "relative must be zero or more"),
    (["--relative", "nan"], "relative must be finite"),
    (["--copy-distance", "-0.1"], "copy-distance must be zero or more"),
    (["--copy-distance", "inf"], "copy-distance must be finite"),
    (["--radius", "-3"], "radius must be zero or more"),
    (["--radius", "999"], "radius must be a whole number of bits from 0"),
    (["--since", "99"], None),
])
def test_bad_thresholds_are_one_line(planted, args, message):
    result = cli("duplicates", planted["root"], *args, ok=message is None and None)
    if message:
        assert result.exit_code != 0 and message in result.stderr.splitlines()[-1], result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    else:
        assert result.exit_code == 0 and result.stdout == ""      # nothing added after generation 99


def test_a_collection_without_index_or_items_is_refused(collection_copy):
    shutil.rmtree(collection_copy / "index")
    manifest = json.loads((collection_copy / "manifest.json").read_text())
    manifest.pop("index")
    (collection_copy / "manifest.json").write_text(json.dumps(manifest))
    assert "no index in" in cli("duplicates", collection_copy, ok=False).stderr
    cli("build-index", collection_copy)
    with Index.open(collection_copy) as index:
        ids = index.ids.tolist()
    cli("delete", collection_copy, *[a for i in ids for a in ("--id", i)])
    assert "is empty" in cli("duplicates", collection_copy, ok=False).stderr


def test_an_index_without_neighbour_codes_is_refused(collection_copy):
    cli("build-index", collection_copy, "--neighbour-bits", 0)
    assert "has no neighbour codes" in cli("duplicates", collection_copy, ok=False).stderr
    with Index.open(collection_copy) as index, pytest.raises(HashsearchError, match="no neighbour codes"):
        index.duplicates()


def test_a_directory_or_fifo_html_is_refused_before_any_work(tmp_path):
    fifo = tmp_path / "sheet.html"
    os.mkfifo(fifo)
    # the collection does not even exist: the output is checked first
    r = cli("duplicates", tmp_path / "nope", "--html", fifo, ok=False)
    assert "is a FIFO" in r.stderr
    r = cli("duplicates", tmp_path / "nope", "--html", tmp_path, ok=False)
    assert "is a directory" in r.stderr


def test_bench_duplicates_scores_its_planted_pairs_with_a_relative_work_folder(model, tmp_path, monkeypatch):
    """The test set names its copies relative to its own folder, so a --work given relative to the current
    directory (and the same test set reused from another) still finds every planted pair in the collection."""
    from hashsearch.encoders.sources import SyntheticSource
    photos = tmp_path / "photos"
    for i in range(30):
        (photos / str(i % 3)).mkdir(parents=True, exist_ok=True)
        SyntheticSource(30).load(i).save(photos / str(i % 3) / f"{i:03d}.png")
    monkeypatch.chdir(tmp_path)
    runs = []
    for where in (tmp_path, tmp_path / "photos"):
        monkeypatch.chdir(where)
        work = os.path.relpath(tmp_path / "work", where)
        result = cli("bench", "duplicates", photos, "--model", model, "--work", work, "--share", "0.2",
                     "--distances", "0.5", "--json", tmp_path / f"{len(runs)}.json")
        runs.append(json.loads((tmp_path / f"{len(runs)}.json").read_text()))
        assert "precision" in result.stdout
    truth = json.loads((tmp_path / "work" / "testset" / "truth.json").read_text())
    assert all(not os.path.isabs(p) for group in truth["groups"] for p in group)
    planted = sum(len(g) * (len(g) - 1) // 2 for g in truth["groups"])
    assert runs[0]["planted_pairs"] == runs[1]["planted_pairs"] == planted > 0


def test_relative_finds_copies_by_their_items_local_scale(planted):
    """--relative keeps a pair whose distance is small beside its items' distance to their 8th nearest
    candidate, where the absolute threshold alone is too tight to find it; it never drops an absolute pair."""
    with Index.open(planted["root"]) as index:
        exact = index.duplicates(max_distance=0.0, copy_distance=0)
        relative = index.duplicates(max_distance=0.0, relative=0.3, copy_distance=0)
        wanted = set()
        for group in planted["groups"]:
            ids = sorted(_ids_of(planted["root"], group))
            wanted |= {(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]}
    exact_pairs, relative_pairs = set(map(tuple, exact.pairs.tolist())), set(map(tuple, relative.pairs.tolist()))
    assert exact_pairs < wanted, exact_pairs        # identical F7 only: the brightened copies are missed
    assert relative_pairs == wanted, (relative_pairs - wanted, wanted - relative_pairs)
