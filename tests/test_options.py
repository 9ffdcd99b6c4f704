"""Each option is declared once, in hashsearch.config: the CLI and the library take their defaults and help from it."""
from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from conftest import cli
from hashsearch import config as cfg
from hashsearch.cli import main
from hashsearch.errors import HashsearchError

# Every command whose options come from a config, with the fields it leaves out.
COMMANDS = [
    (("train",), cfg.TrainConfig, ()),
    (("encode",), cfg.EncodeConfig, ()),
    (("encode",), cfg.RayEncodeConfig, ()),
    (("add",), cfg.EncodeConfig, cfg.ADD_SKIPS),
    (("compact",), cfg.CompactConfig, ()),
    (("build-index",), cfg.IndexConfig, ()),
    (("query",), cfg.SearchConfig, ()),
    (("query",), cfg.RaySearchConfig, ()),
    (("eval",), cfg.EvalConfig, ()),
    (("bench", "exhaustive"), cfg.ExhaustiveBenchConfig, ()),
    (("bench", "encode"), cfg.EncodeBenchConfig, ()),
    (("bench", "encode"), cfg.EncodeConfig, ("limit", "shard_size", "float32", "overwrite", "quiet", "wait")),
    (("bench", "live"), cfg.LiveBenchConfig, ()),
    (("bench", "serve"), cfg.ServeBenchConfig, ()),
    (("bench", "sharded"), cfg.ShardedBenchConfig, ()),
    (("bench", "peers"), cfg.PeersBenchConfig, ()),
    (("bench", "duplicates"), cfg.DuplicatesBenchConfig, ()),
    (("duplicates",), cfg.DuplicatesConfig, ()),
    (("serve",), cfg.ServeConfig, ()),
    (("serve",), cfg.RaySearchConfig, ()),
]


def command(path):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("path, config, skip", COMMANDS, ids=[" ".join(c[0]) + f" {c[1].__name__}" for c in COMMANDS])
def test_every_cli_option_takes_its_default_and_help_from_the_config(path, config, skip):
    params = {p.name: p for p in command(path).params}
    fields = [f for f in dataclasses.fields(config) if f.metadata.get("cli") and f.name not in skip]
    assert fields
    for f in fields:
        param = params.get(f.name)
        assert param is not None, f"{' '.join(path)} has no option for {config.__name__}.{f.name}"
        assert param.default == f.default, (f.name, param.default, f.default)
        assert param.help == f.metadata["help"], f.name
        if f.metadata.get("choices"):
            assert list(param.type.choices) == [str(c) for c in f.metadata["choices"]], f.name


def test_no_command_declares_a_default_of_its_own():
    """Options that are not a config's have no default but None, False or empty (the CLI only translates)."""
    from_configs = {(tuple(p), f.name) for p, c, skip in COMMANDS for f in dataclasses.fields(c) if f.name not in skip}
    own_defaults = []
    for path in [("train",), ("encode",), ("add",), ("delete",), ("compact",), ("build-index",), ("query",), ("info",),
                 ("eval",), ("bench", "exhaustive"), ("bench", "encode"), ("bench", "live"), ("bench", "serve"), ("bench", "sharded"), ("bench", "peers"), ("bench", "duplicates"),
                 ("duplicates",), ("serve",)]:
        for p in command(path).params:
            unset = type(p.default).__name__ == "Sentinel"       # click 8.3's "no default given"
            if p.param_type_name == "option" and (path, p.name) not in from_configs \
                    and not unset and p.default not in (None, False, ()):
                own_defaults.append((path, p.name, p.default))
    # the one left: where `bench exhaustive --scaling` draws, a file name rather than a setting
    assert own_defaults == [(("bench", "exhaustive"), "plot_path", "bench-scaling.png")]


def test_library_functions_default_to_the_config():
    from hashsearch.engine import Index
    from hashsearch.retrieval import run_query
    from hashsearch.bench.encode_speed import run_encode_bench
    from hashsearch.engine.index import search_params
    params = inspect.signature(run_encode_bench).parameters
    for name in ("batch_size", "workers", "device", "precision"):
        assert params[name].default == getattr(cfg.EncodeConfig, name), name
    # searches take one SearchConfig value, or its fields as options, and nothing else
    for func in (Index.search, run_query):
        params = inspect.signature(func).parameters
        assert params["params"].default is None and params["options"].kind is inspect.Parameter.VAR_KEYWORD
    assert search_params() == cfg.SearchConfig()
    assert search_params(7, mode="bcs") == cfg.SearchConfig(k=7, mode="bcs")
    with pytest.raises(HashsearchError, match="unknown search parameter 'poool'"):
        search_params(poool=3)


@pytest.mark.parametrize("config, field, value, message", [
    (cfg.EncodeConfig, "batch_size", 0, "batch-size must be positive, got 0"),
    (cfg.EncodeConfig, "workers", -1, "workers must be zero or more, got -1"),
    (cfg.EncodeConfig, "precision", "fp8", "precision must be one of auto, fp32, bf16"),
    (cfg.EncodeConfig, "shard_size", "100", "shard-size must be an integer"),
    (cfg.EvalConfig, "topk", 2**70, "topk is too large"),
    (cfg.CompactConfig, "threshold", 1.0, "threshold must be at least 0 and below 1"),
    (cfg.IndexConfig, "coarse", "ivf", "coarse must be one of flat, hash, multihash"),
    (cfg.ExhaustiveBenchConfig, "batch", True, "batch must be an integer"),
])
def test_library_configs_check_like_the_cli(config, field, value, message):
    with pytest.raises(HashsearchError, match=message):
        config(**{field: value})


def test_eval_json_is_always_a_list_of_rows(collection, tmp_path):
    for mode, rows in (("bcs", 1), ("all", 3)):
        out = tmp_path / f"{mode}.json"
        cli("eval", collection, "--queries", collection, "--mode", mode, "--topk", 20, "--json", out)
        data = json.loads(out.read_text())
        assert isinstance(data, list) and len(data) == rows and all("map" in row for row in data)


def test_bench_subcommands_and_their_old_spellings_are_the_same_command(tmp_path):
    for args in (["bench", "exhaustive"], ["bench", "--exhaustive"]):
        r = cli(*args, "--n", 0, ok=False)
        assert "n must be positive, got 0" in r.stderr
    r = cli("bench", "--encode", "synthetic:10", "--model", tmp_path / "nope.pt", ok=False)
    assert "model not found" in r.stderr
