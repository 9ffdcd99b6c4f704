"""`hashsearch bench peers` at a small N: its rows, and recall@10 computed as it says."""
from __future__ import annotations

import json

import numpy as np

from conftest import cli
from hashsearch import Collection, Index
from hashsearch.bench.metrics import recall_at_k
from hashsearch.bench.peers import ground_truth
from hashsearch.bench.synthetic import SyntheticSpec, generate_collection, make_queries

N, DIM, BITS, NQ = 3000, 64, 32, 20
FIELDS = {"method", "params", "recall_at_10", "batch1_ms", "batched_qps", "build_s", "rss_mb", "disk_bytes"}


def test_ground_truth_is_the_exact_top_10_by_l2(tmp_path):
    coll = generate_collection(tmp_path / "c", N, DIM, BITS)
    _, feats, _ = make_queries(coll, NQ)
    everything = coll.features(np.arange(coll.n))
    exact = np.argsort(((everything[None] - feats[:, None]) ** 2).sum(-1), axis=1)[:, :10]
    assert recall_at_k(ground_truth(coll, feats), coll.ids()[exact]) >= 0.99     # float ties aside


def test_bench_peers_rows_and_recall(tmp_path):
    out, plot = tmp_path / "peers.json", tmp_path / "peers.png"
    printed = cli("bench", "--peers", "--n", N, "--dim", DIM, "--bits", BITS, "--queries", NQ, "--batch", 8,
                  "--methods", "hashsearch,faiss-ivf-sqfp16", "--cache-dir", tmp_path, "--json", out,
                  "--plot", plot).stdout
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["hashsearch", "faiss-ivf-sqfp16"]
    for row in rows:
        assert FIELDS <= set(row), row
        assert 0 <= row["recall_at_10"] <= 1 and row["batch1_ms"] > 0 and row["batched_qps"] > 0
        assert row["rss_mb"] > 0 and row["disk_bytes"] > 0 and row["sweep"]
        assert row["method"] in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reported recall is what Index gives at the chosen setting, scored against the exact top 10
    coll = Collection.open(tmp_path / SyntheticSpec(n=N, dim=DIM, bits=BITS).name)
    codes, feats, _ = make_queries(coll, NQ)
    chosen = rows[0]["params"]
    index = Index.build(coll.root, "multihash", out=tmp_path / "index", hash_bits=10)
    found = index.search(codes, feats, 10, pool=chosen["pool"], radius=chosen["radius"],
                         neighbour_pool=chosen["neighbour pool"]).ids
    assert recall_at_k(found, ground_truth(coll, feats)) == rows[0]["recall_at_10"]
    sweep = {tuple(s["params"]): s["recall_at_10"] for s in rows[0]["sweep"]}
    knob = (chosen["pool"], chosen["radius"], chosen["neighbour pool"], chosen["neighbour cells"])
    assert sweep[knob] == rows[0]["recall_at_10"]


def test_unknown_method_is_one_error(tmp_path):
    cli("bench", "peers", "--n", 100, "--methods", "hashsearch,nope", "--cache-dir", tmp_path, ok=False)


def test_bench_peers_builds_the_neighbour_codes_it_is_given(tmp_path):
    """--neighbour-bits reaches hashsearch's build: without neighbour codes its sweep leaves out the settings
    that search them alone (pool 0), which would otherwise stop the run."""
    sweeps = {}
    for bits in (0, 16):
        out = tmp_path / f"peers{bits}.json"
        cli("bench", "peers", "--n", N, "--dim", DIM, "--bits", BITS, "--queries", NQ, "--batch", 8,
            "--methods", "hashsearch", "--neighbour-bits", bits, "--neighbour-coarse", "multihash",
            "--cache-dir", tmp_path, "--json", out)
        sweeps[bits] = {tuple(s["params"]): s["recall_at_10"] for s in json.loads(out.read_text())[0]["sweep"]}
    assert not [knob for knob in sweeps[0] if knob[0] == 0]
    alone = [recall for knob, recall in sweeps[16].items() if knob[0] == 0]
    assert len(alone) == 3 and min(alone) > 0.3, sweeps[16]
