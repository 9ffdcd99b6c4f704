"""The `hashsearch` command line.  It only parses arguments and prints: the work, the defaults and the checks
live in the package, and every option here is generated from a config of hashsearch.config."""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import click

from .config import (ADD_SKIPS, WAIT_HELP, CompactConfig, DuplicatesBenchConfig, DuplicatesConfig, EncodeBenchConfig, EncodeConfig, EvalConfig,
                     ExhaustiveBenchConfig, IndexConfig, LiveBenchConfig, PeersBenchConfig, RayEncodeConfig, RaySearchConfig,
                     SearchConfig, ServeBenchConfig, ServeConfig, ShardedBenchConfig, TrainConfig)
from .errors import HashsearchError
from .fileio import atomic_write_bytes, check_output_file
from .options import click_options


class _Group(click.Group):
    """Bad input and a failing environment are one line on stderr and exit 1; --debug keeps the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (HashsearchError, OSError) as exc:
            # OSError here is the environment (disk full, permissions), not a bug.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, OSError) and exc.strerror:
                exc = f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
            # One line, whatever a library below put in its message (HDF5's span several).
            click.echo("hashsearch: error: " + " ".join(str(exc).split()), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            hint = {"encode": "; finished shards are kept, run the same command to resume",
                    "add": "; finished shards are kept, run the same command to add the rest",
                    "train": "; a labelled run keeps its last finished epoch, add --resume to continue"}
            click.echo(f"hashsearch: interrupted{hint.get(ctx.invoked_subcommand, '')}", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="hashsearch")
@click.pass_context
def main(ctx, debug):
    """Image retrieval with deep binary hash codes and coarse-to-fine search."""
    ctx.obj = {"debug": debug}


# C0 and C1 controls and Unicode's line breaks: a newline in a stored name would split a table's row in two,
# and an escape sequence would drive the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def readable(text) -> str:
    """A stored path or name for the terminal, on one line: the bytes of a name that is not UTF-8 and
    control characters shown as escapes (\\xNN, \\n, \\u2028)."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def _existing(path, what="path"):
    if not Path(path).exists():
        raise HashsearchError(f"{what} not found: {path}")
    return path


def _parse_ids(values) -> list[int]:
    ids = []
    for value in values:
        try:
            number = int(value)
        except ValueError:
            raise HashsearchError(f"id {value!r} is not an integer") from None
        if not -(1 << 63) <= number < (1 << 63):
            raise HashsearchError(f"id {value} does not fit in 64 bits")
        ids.append(number)
    return ids


def _report(json_path, run, format_report):
    """A benchmark's run: the output file checked before the work, the report printed, the JSON written."""
    if json_path:
        check_output_file(json_path, "--json")
    result = run()
    click.echo(format_report(result))
    if json_path:
        _write_json(json_path, result)


def _write_json(path, data):
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
    click.echo(f"wrote {path}")


_wait = click.option("--wait", is_flag=True, help=WAIT_HELP)


# -- train --------------------------------------------------------------------------
@main.command()
@click.argument("source")
@click_options(TrainConfig)
@click.option("--out", required=True, help="Checkpoint to write (rewritten after every epoch).")
def train(source, out, **options):
    """Train the hash network on a labelled SOURCE; --unsupervised fits codes to any SOURCE without labels."""
    from .encoders.train import train as run_train
    result = run_train(TrainConfig(source=source, out=out, **options))
    how = result["config"].get("training")
    if how and how.get("labels") is False:
        views = f" and {how['views']} views of each" if how.get("views") else ""
        backbone = (f"; its backbone comes from {how['backbone_weights']}, a model trained with labels"
                    if how.get("backbone_from_labelled_model") else "")
        cache = {"read": f"; F7 read from {options['features_cache']}",
                 "written": f"; F7 kept in {options['features_cache']}"}.get(result["features_cache"], "")
        click.echo(f"saved {out}: {result['config']['bits']} bits, {result['config']['backbone']}, codes fitted "
                   f"without labels ({how['method']} on the F7 of {how['images']} images{views}){backbone}{cache}")
        return
    last = result["history"][-1] if result["history"] else None
    if last:
        val = "n/a" if last["val_acc"] is None else f"{last['val_acc']:.4f}"
        click.echo(f"saved {out}: {result['config']['bits']} bits, {result['config']['backbone']}, "
                   f"held-out accuracy {val}")


# -- encode, add, delete, compact -------------------------------------------------------
@main.command()
@click.argument("source")
@click.option("--model", "model_path", required=True, help="Checkpoint from `hashsearch train`.")
@click.option("--out", required=True, help="Collection directory to write (or resume).")
@click_options(EncodeConfig)
@click_options(RayEncodeConfig)
def encode(source, model_path, out, ray, address, start_timeout, actors, gpus_per_actor, actor_workers, **options):
    """Encode SOURCE into a collection of codes and F7 features (with --ray, on Ray actors)."""
    distributed = RayEncodeConfig(ray=ray, address=address, start_timeout=start_timeout, actors=actors,
                                  gpus_per_actor=gpus_per_actor, actor_workers=actor_workers)
    _existing(model_path, "model")
    if distributed.ray:
        from .distributed.encode import encode_on_ray
        encode_on_ray(model_path, source, out, log=click.echo, ray=distributed, **options)
        return
    from .encoders.runner import encode_collection
    encode_collection(model_path, source, out, log=click.echo, **options)


@main.command()
@click.argument("collection")
@click.argument("source")
@click_options(EncodeConfig, skip=ADD_SKIPS)
def add(collection, source, **options):
    """Encode the new images of SOURCE with COLLECTION's model and add them (paths already present, or repeated
    in SOURCE, are skipped)."""
    from .encoders.runner import add_to_collection
    add_to_collection(collection, source, log=click.echo, **options)


@main.command()
@click.argument("collection")
@click.option("--id", "ids", multiple=True, help="Id of an item to delete (repeatable).")
@click.option("--ids-file", type=click.Path(dir_okay=False), help="A file of ids, one per line.")
@click.option("--path", "paths", multiple=True, help="Stored path of an item to delete (repeatable).")
@_wait
def delete(collection, ids, ids_file, paths, wait):
    """Delete items from COLLECTION: no search returns them once this returns."""
    from .shards import delete_items, read_ids_file
    ids = list(ids) + (read_ids_file(ids_file) if ids_file else [])
    manifest = delete_items(collection, ids=_parse_ids(ids), paths=list(paths), wait=wait)
    click.echo(f"deleted; {collection} now holds {manifest['items']} items "
               f"({manifest['deleted']} awaiting compaction), generation {manifest['generation']}")


@main.command()
@click.argument("collection")
@click_options(CompactConfig)
@_wait
def compact(collection, threshold, wait):
    """Rewrite COLLECTION's shards without their deleted rows; ids stay, disk space comes back."""
    from .engine.compact import compact as run_compact
    report = run_compact(collection, threshold, wait=wait)
    click.echo(f"compacted {collection}: {report['rewritten']} shard(s) rewritten, {report['items']} items in "
               f"{report['shards']} shard(s), generation {report['generation']}")


# -- build-index ----------------------------------------------------------------------
@main.command("build-index")
@click.argument("collection")
@click_options(IndexConfig)
@click.option("--out", help="Write the index to this directory instead of into the collection.")
@_wait
def build_index(collection, coarse, out, wait, **params):
    """Build the coarse binary index of COLLECTION (folding in rows added since the last build)."""
    from .engine import Index
    with Index.build(collection, coarse, out=out, wait=wait, **params) as index:
        click.echo(f"built {coarse} index over {index.meta['ntotal']} codes in {index.meta['build_seconds']:.2f}s "
                   f"-> {out or Path(collection) / 'index'}")


# -- query ------------------------------------------------------------------------------
@main.command()
@click.argument("collection")
@click.option("--image", "images", multiple=True, help="Query image (repeatable).")
@click.option("--id", "ids", multiple=True, help="Query by the id of a collection item (repeatable).")
@click_options(SearchConfig)
@click.option("--model", "model_path", help="Checkpoint for --image queries [COLLECTION/model.pt].")
@click.option("--index", "index_dir", help="Index directory [the collection's own].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click_options(RaySearchConfig)
def query(collection, images, ids, model_path, index_dir, as_json, ray, address, start_timeout, partitions,
          **search):
    """Find the k nearest items of COLLECTION to each query (with --ray, over partitions on Ray actors)."""
    from .retrieval import run_query
    distributed = RaySearchConfig(ray=ray, address=address, start_timeout=start_timeout, partitions=partitions)
    report = run_query(collection, images=images, ids=_parse_ids(ids), model_path=model_path, index_dir=index_dir,
                       ray=distributed, **search)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for q in report["queries"]:
        click.echo(f"query: {readable(q['query'])}")
        click.echo(f"  {'rank':>4}  {'id':>8}  {'ham':>4}  {'distance':>10}  {'label':<12} path")
        for r in q["results"]:
            dist = "" if r["distance"] is None else f"{r['distance']:.4f}"
            click.echo(f"  {r['rank']:>4}  {r['id']:>8}  {r['hamming']:>4}  {dist:>10}  {readable(r['label']):<12} "
                       f"{readable(r['path'])}")


# -- duplicates -------------------------------------------------------------------------
@main.command()
@click.argument("collection")
@click_options(DuplicatesConfig)
@click.option("--json", "json_path", help="Write the groups to this JSON file.")
@click.option("--html", "html_path", help="Write a contact sheet of the groups, with thumbnails, to this HTML file.")
def duplicates(collection, json_path, html_path, **options):
    """Groups of near-duplicate items of COLLECTION: one group a line, its most central item first."""
    from .engine import Index
    from .duplicates_report import describe_groups, format_group, html_contact_sheet
    for path, what in ((json_path, "--json"), (html_path, "--html")):
        if path:
            check_output_file(path, what)
    config = DuplicatesConfig(**options)
    with Index.open(collection) as index:
        found = index.duplicates(config)
        report = describe_groups(index.collection, found, config)
    for group in report["groups"]:
        click.echo(format_group(group, readable))
    click.echo(f"{len(report['groups'])} group(s) of {report['items']} live items "
               f"({report['pairs']} pairs within {config.max_distance} of each other)", err=True)
    # stdout holds the groups alone, one a line, for scripts; what was written is said on stderr
    if json_path:
        atomic_write_bytes(json_path, (json.dumps(report, indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}", err=True)
    if html_path:
        atomic_write_bytes(html_path, html_contact_sheet(report).encode())
        click.echo(f"wrote {html_path}", err=True)


# -- serve ------------------------------------------------------------------------------
@main.command()
@click.argument("collection")
@click_options(ServeConfig)
@click_options(RaySearchConfig)
def serve(collection, ray, address, start_timeout, partitions, **options):
    """Serve COLLECTION over HTTP: a JSON API (described at /openapi.json) and a search page at /; --ray searches on Ray."""
    from .serve.server import run_server
    run_server(collection, ServeConfig(**options), log=click.echo,
               ray=RaySearchConfig(ray=ray, address=address, start_timeout=start_timeout, partitions=partitions))


# -- info -----------------------------------------------------------------------------
@main.command()
@click.argument("collection")
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", is_flag=True, help="Re-check every shard against the manifest checksums.")
def info(collection, as_json, verify):
    """Describe COLLECTION."""
    from .retrieval import collection_info
    report = collection_info(collection, verify=verify)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if key != "problems":
                click.echo(f"{key:>16}: {readable(value)}")
        for problem in report.get("problems", []):
            click.echo(f"{'problem':>16}: {readable(problem)}")
    if verify and report["problems"]:
        sys.exit(1)


# -- eval --------------------------------------------------------------------------------
@main.command("eval")
@click.argument("database")
@click.option("--queries", "queries_path", help="Collection of query items (with labels).")
@click_options(EvalConfig)
@click.option("--json", "json_path", help="Write the metrics to this JSON file: a list, one row per ranking.")
@click.option("--plot", "plot_path", help="Write precision@k curves to this PNG.")
@click.option("--pr-plot", "pr_plot_path", help="Write the precision-recall curve of the Hamming ranking to this PNG.")
def evaluate(database, queries_path, json_path, plot_path, pr_plot_path, **options):
    """Retrieval quality of DATABASE for the labelled --queries (the paper's protocol), or for edited copies
    of its own images (--near-duplicates N)."""
    from .bench.evaluate import evaluate_collections, format_table
    from .bench.plots import plot_pr_curve, plot_precision_at_k
    for path, what in ((json_path, "--json"), (plot_path, "--plot"), (pr_plot_path, "--pr-plot")):
        if path:
            check_output_file(path, what)
    config = EvalConfig(**options)
    if config.near_duplicates:
        return _near_duplicates(database, config, queries_path, json_path)
    if not queries_path:
        raise HashsearchError("give --queries, a collection of labelled query items, or --near-duplicates N")
    results, curve = evaluate_collections(database, queries_path, config, pr_curve=bool(pr_plot_path))
    click.echo(format_table(results))
    if json_path:
        _write_json(json_path, results)
    if plot_path:
        plot_precision_at_k(results, plot_path)
        click.echo(f"wrote {plot_path}")
    if pr_plot_path:
        plot_pr_curve({f"hashsearch, {results[0]['bits']} bits": curve}, pr_plot_path, title="Hamming ranking")
        click.echo(f"wrote {pr_plot_path}")


def _near_duplicates(database, config: EvalConfig, queries_path, json_path) -> None:
    from .bench.near_duplicates import format_near_duplicates, run_near_duplicates
    if queries_path:
        raise HashsearchError("--near-duplicates makes its own queries; leave out --queries")
    report = run_near_duplicates(database, config.near_duplicates, config.seed, config.near_duplicate_search())
    click.echo(format_near_duplicates(report))
    if json_path:
        _write_json(json_path, report)


# -- bench -------------------------------------------------------------------------------
class _BenchGroup(click.Group):
    """`bench exhaustive` and `bench encode SOURCE`; `bench --exhaustive` and `bench --encode SOURCE` still work."""

    def parse_args(self, ctx, args):
        if args and args[0] in ("--exhaustive", "--peers"):
            args = [args[0][2:], *args[1:]]
        elif args and args[0] == "--encode" and len(args) > 1:
            args = ["encode", args[1], *args[2:]]
        elif args and args[0].startswith("--encode="):
            args = ["encode", args[0].split("=", 1)[1], *args[1:]]
        return super().parse_args(ctx, args)


_json_results = click.option("--json", "json_path", help="Write the results to this JSON file.")


@main.group(cls=_BenchGroup)
def bench():
    """Benchmarks: `exhaustive` (search speed against the paper's baseline), `encode SOURCE` (throughput),
    `live` (what adds and deletes cost), `serve COLLECTION` (the HTTP service under load), `sharded`
    (partitioned search on Ray)."""


def _config_bench(name: str, config: type, summary: str):
    """`bench NAME` with CONFIG's options and --json: it runs run_NAME_bench of hashsearch.bench.NAME and prints
    its format_NAME_report.  The module is imported when the command runs, so that --help stays fast."""
    @bench.command(name, help=summary)
    @click_options(config)
    @_json_results
    def command(json_path, **options):
        module = importlib.import_module(f"{__package__}.bench.{name}")
        run, format_report = getattr(module, f"run_{name}_bench"), getattr(module, f"format_{name}_report")
        _report(json_path, lambda: run(**options), format_report)
    return command


@bench.command("exhaustive")
@click_options(ExhaustiveBenchConfig)
@click.option("--scaling", is_flag=True, help="Run N = 10k, 100k and 1M and plot latency against N.")
@click.option("--plot", "plot_path", default="bench-scaling.png", show_default=True, help="PNG for --scaling.")
@_json_results
def bench_exhaustive(scaling, plot_path, json_path, **options):
    """Hierarchical vs binary-only vs exhaustive search speed."""
    from .bench import speed
    if json_path:
        check_output_file(json_path, "--json")
    config = ExhaustiveBenchConfig(**options)
    if scaling:
        check_output_file(plot_path, "--plot")
        result = speed.run_scaling(**{k: v for k, v in config.given().items() if k != "n"})
        for r in result:
            click.echo(speed.format_report(r))
        speed.plot_scaling(result, plot_path)
        click.echo(f"wrote {plot_path}")
    else:
        result = speed.run_exhaustive_bench(**config.given())
        click.echo(speed.format_report(result))
    if json_path:
        _write_json(json_path, result)


@bench.command("encode")
@click.argument("source")
@click.option("--model", "model_path", required=True, help="Checkpoint to encode with.")
@click_options(EncodeBenchConfig)
@click_options(EncodeConfig, skip=("limit", "shard_size", "float32", "overwrite", "quiet", "wait"))
@_json_results
def bench_encode(source, model_path, limit, json_path, **options):
    """Encode throughput on SOURCE: the whole pipeline against the model alone."""
    from .bench.encode_speed import format_encode_report, run_encode_bench
    _existing(model_path, "model")
    _report(json_path, lambda: run_encode_bench(model_path, source, limit=limit, **options), format_encode_report)


bench_live = _config_bench("live", LiveBenchConfig, "What a live collection costs: an add into N rows, and search "
                                                    "with a delta and tombstones.")


@bench.command("peers")
@click_options(PeersBenchConfig)
@click.option("--json", "json_path", help="Write one row per method to this JSON file.")
@click.option("--plot", "plot_path", help="Write recall@10 against batch-1 latency to this PNG.")
def bench_peers(json_path, plot_path, **options):
    """hashsearch against faiss, usearch, hnswlib and milvus-lite on the same data (pip install 'hashsearch[peers]')."""
    from .bench.peers import format_peers_report, plot_peers, run_peers_bench, table_rows
    for path, what in ((json_path, "--json"), (plot_path, "--plot")):
        if path:
            check_output_file(path, what)
    result = run_peers_bench(**options)
    click.echo(format_peers_report(result))
    if json_path:
        _write_json(json_path, table_rows(result))
    if plot_path:
        plot_peers(result, plot_path)
        click.echo(f"wrote {plot_path}")


@bench.command("duplicates")
@click.argument("source")
@click.option("--model", "model_path", required=True, help="Checkpoint to encode the test set with.")
@click_options(DuplicatesBenchConfig)
@_json_results
def bench_duplicates(source, model_path, json_path, **options):
    """Pair precision, recall and time of `duplicates` on SOURCE's images with planted edited copies."""
    from .bench.duplicates import format_duplicates_report, run_duplicates_bench
    _existing(model_path, "model")
    _report(json_path, lambda: run_duplicates_bench(source, model_path, **options), format_duplicates_report)


bench_sharded = _config_bench("sharded", ShardedBenchConfig, "Partitioned search on a local Ray cluster against one "
                                                             "process (pip install 'hashsearch[ray]').")


@bench.command("serve")
@click.argument("collection")
@click_options(ServeBenchConfig)
@_json_results
def bench_serve(collection, json_path, **options):
    """Concurrent clients against `hashsearch serve COLLECTION` on 127.0.0.1 (the collection is not changed)."""
    from .bench.serve_load import format_serve_report, run_serve_bench
    _report(json_path, lambda: run_serve_bench(collection, **options), format_serve_report)


if __name__ == "__main__":
    main()
