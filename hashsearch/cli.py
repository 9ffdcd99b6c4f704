"""The `hashsearch` command line.  It only parses arguments and prints: the work lives in the package."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import HashsearchError
from .fileio import atomic_write_bytes, check_output_file


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
                    "train": "; the last finished epoch is saved, add --resume to continue"}
            click.echo(f"hashsearch: interrupted{hint.get(ctx.invoked_subcommand, '')}", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="hashsearch")
@click.pass_context
def main(ctx, debug):
    """Image retrieval with deep binary hash codes and coarse-to-fine search."""
    ctx.obj = {"debug": debug}


def _positive(name, value):
    if value is not None and value <= 0:
        raise HashsearchError(f"{name} must be positive, got {value}")
    return value


def _not_negative(name, value):
    if value is not None and value < 0:
        raise HashsearchError(f"{name} must be zero or more, got {value}")
    return value


def _encode_precision(help_text):
    return click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
                        show_default=True, help=help_text)


_WAIT_HELP = "If another process is writing the collection, wait for it instead of failing."


def readable(path: str) -> str:
    """A stored path for the terminal: bytes of a name that is not UTF-8 shown as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _existing(path, what="path"):
    if not Path(path).exists():
        raise HashsearchError(f"{what} not found: {path}")
    return path


# -- train --------------------------------------------------------------------------
@main.command()
@click.argument("source")
@click.option("--bits", default=48, show_default=True, help="Code length K (the paper uses 12, 32, 48; codes take ceil(K/8) bytes).")
@click.option("--backbone", default="small", show_default=True, help="small, alexnet or efficientnet-lite0.")
@click.option("--weights", help="Backbone weights: a local state_dict file, or a hashsearch checkpoint to reuse its backbone.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True, help="Learning rate of the new layers.")
@click.option("--backbone-lr-mult", type=float, help="Backbone rate / new-layer rate [1.0 from scratch, 0.1 pretrained].")
@click.option("--weight-decay", default=5e-4, show_default=True)
@click.option("--warmup-epochs", default=0.5, show_default=True)
@click.option("--freeze-backbone", is_flag=True, help="Train only the latent and classifier layers on cached F7.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Autocast to bfloat16: about 2x faster on CPUs with AVX512-BF16/AMX.")
@click.option("--input-size", type=int, help="Input side in pixels [the backbone's default].")
@click.option("--val-fraction", default=0.05, show_default=True, help="Held out to report accuracy each epoch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--limit", type=int, help="Use only the first N items of SOURCE.")
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--data-dir", help="Where named datasets such as fashion-mnist live.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars; the one line per epoch stays.")
@click.option("--out", required=True, help="Checkpoint to write (rewritten after every epoch).")
def train(source, out, **opts):
    """Train the hash network on a labelled SOURCE."""
    from .encoders.train import TrainConfig, train as run_train
    for name in ("epochs", "batch_size", "limit", "input_size", "lr"):
        _positive(name.replace("_", "-"), opts[name])
    for name in ("workers", "weight_decay", "warmup_epochs", "val_fraction"):
        _not_negative(name.replace("_", "-"), opts[name])
    result = run_train(TrainConfig(source=source, out=out, **opts))
    last = result["history"][-1] if result["history"] else None
    if last:
        val = "n/a" if last["val_acc"] is None else f"{last['val_acc']:.4f}"
        click.echo(f"saved {out}: {result['config']['bits']} bits, {result['config']['backbone']}, "
                   f"held-out accuracy {val}")


# -- encode --------------------------------------------------------------------------
@main.command()
@click.argument("source")
@click.option("--model", "model_path", required=True, help="Checkpoint from `hashsearch train`.")
@click.option("--out", required=True, help="Collection directory to write (or resume).")
@click.option("--limit", type=int)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--shard-size", default=100_000, show_default=True, help="Rows per HDF5 shard.")
@click.option("--float32", "float32", is_flag=True, help="Store features as float32 (default float16).")
@_encode_precision("Model arithmetic: auto is float16 on CUDA, float32 on CPU; bf16 is fast on CPUs with AVX512-BF16/AMX.")
@click.option("--overwrite", is_flag=True, help="Replace an existing collection made differently.")
@click.option("--data-dir")
@click.option("--quiet", is_flag=True)
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
def encode(source, model_path, out, limit, batch_size, workers, device, shard_size, float32, precision, overwrite,
           data_dir, quiet, wait):
    """Encode SOURCE into a collection of codes and F7 features."""
    from .encoders.runner import encode_collection
    _existing(model_path, "model")
    _positive("limit", limit)
    _positive("shard-size", shard_size)
    _not_negative("workers", workers)
    encode_collection(model_path, source, out, limit=limit, batch_size=batch_size, workers=workers,
                      device=device, shard_size=shard_size, feature_dtype="float32" if float32 else "float16",
                      overwrite=overwrite, quiet=quiet, data_dir=data_dir, precision=precision, wait=wait,
                      log=click.echo)


# -- add / delete / compact -------------------------------------------------------------
@main.command()
@click.argument("collection")
@click.argument("source")
@click.option("--limit", type=int, help="Use only the first N items of SOURCE.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--data-dir")
@click.option("--quiet", is_flag=True)
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
def add(collection, source, limit, batch_size, workers, device, data_dir, quiet, wait):
    """Encode the new images of SOURCE with COLLECTION's model and add them (paths already present are skipped)."""
    from .encoders.runner import add_to_collection
    _positive("limit", limit)
    _not_negative("workers", workers)
    add_to_collection(collection, source, limit=limit, batch_size=batch_size, workers=workers, device=device,
                      quiet=quiet, data_dir=data_dir, wait=wait, log=click.echo)


@main.command()
@click.argument("collection")
@click.option("--id", "ids", multiple=True, help="Id of an item to delete (repeatable).")
@click.option("--ids-file", type=click.Path(dir_okay=False), help="A file of ids, one per line.")
@click.option("--path", "paths", multiple=True, help="Stored path of an item to delete (repeatable).")
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
def delete(collection, ids, ids_file, paths, wait):
    """Delete items from COLLECTION: no search returns them once this returns."""
    from .shards import delete_items
    ids = list(ids)
    if ids_file:
        _existing(ids_file, "ids file")
        ids += Path(ids_file).read_text(encoding="utf-8", errors="replace").split()
    manifest = delete_items(collection, ids=_parse_ids(ids), paths=list(paths), wait=wait)
    click.echo(f"deleted; {collection} now holds {manifest['items']} items "
               f"({manifest['deleted']} awaiting compaction), generation {manifest['generation']}")


@main.command()
@click.argument("collection")
@click.option("--threshold", default=0.2, show_default=True,
              help="Rewrite the shards in which more than this share of rows is deleted.")
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
def compact(collection, threshold, wait):
    """Rewrite COLLECTION's shards without their deleted rows; ids stay, disk space comes back."""
    from .engine.compact import compact as run_compact
    report = run_compact(collection, threshold, wait=wait)
    click.echo(f"compacted {collection}: {report['rewritten']} shard(s) rewritten, {report['items']} items in "
               f"{report['shards']} shard(s), generation {report['generation']}")


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


# -- build-index ----------------------------------------------------------------------
@main.command("build-index")
@click.argument("collection")
@click.option("--coarse", default="flat", show_default=True, type=click.Choice(["flat", "hash", "multihash"]))
@click.option("--hash-bits", type=int, help="Bits per hash key (hash, multihash).")
@click.option("--nhash", type=int, help="Number of hash tables (multihash).")
@click.option("--nflip", type=int, help="Bits flipped when probing buckets [hash 2, multihash 0].")
@click.option("--out", help="Write the index to this directory instead of into the collection.")
@click.option("--wait", is_flag=True, help=_WAIT_HELP)
def build_index(collection, coarse, hash_bits, nhash, nflip, out, wait):
    """Build the coarse binary index of COLLECTION (folding in rows added since the last build)."""
    from .engine import Index
    with Index.build(collection, coarse, out=out, wait=wait, hash_bits=hash_bits, nhash=nhash, nflip=nflip) as index:
        click.echo(f"built {coarse} index over {index.meta['ntotal']} codes in {index.meta['build_seconds']:.2f}s "
                   f"-> {out or Path(collection) / 'index'}")


# -- query ------------------------------------------------------------------------------
@main.command()
@click.argument("collection")
@click.option("--image", "images", multiple=True, help="Query image (repeatable).")
@click.option("--id", "ids", multiple=True, help="Query by the id of a collection item (repeatable).")
@click.option("-k", "k", default=10, show_default=True)
@click.option("--pool", default=None, type=int, help="Coarse candidate pool size [200].")
@click.option("--radius", type=int, help="Take the candidates within this Hamming radius instead (at most --pool).")
@click.option("--nflip", type=int, help="Bucket probing depth for hash indexes.")
@click.option("--mode", default="hds", show_default=True, type=click.Choice(["hds", "bcs", "es"]))
@click.option("--model", "model_path", help="Checkpoint for --image queries [COLLECTION/model.pt].")
@click.option("--index", "index_dir", help="Index directory [COLLECTION/index].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def query(collection, images, ids, k, pool, radius, nflip, mode, model_path, index_dir, as_json):
    """Find the k nearest items of COLLECTION to each query."""
    from .retrieval import run_query
    _positive("k", k)
    _positive("pool", pool)
    _not_negative("radius", radius)
    _not_negative("nflip", nflip)
    if not images and not ids:
        raise HashsearchError("give at least one --image or --id")
    report = run_query(collection, images=images, ids=_parse_ids(ids), k=k, pool=pool, radius=radius, nflip=nflip,
                       mode=mode, model_path=model_path, index_dir=index_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for q in report["queries"]:
        click.echo(f"query: {q['query']}")
        click.echo(f"  {'rank':>4}  {'id':>8}  {'ham':>4}  {'distance':>10}  {'label':<12} path")
        for r in q["results"]:
            dist = "" if r["distance"] is None else f"{r['distance']:.4f}"
            click.echo(f"  {r['rank']:>4}  {r['id']:>8}  {r['hamming']:>4}  {dist:>10}  {str(r['label']):<12} "
                       f"{readable(r['path'])}")


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
                click.echo(f"{key:>16}: {value}")
        for problem in report.get("problems", []):
            click.echo(f"{'problem':>16}: {problem}")
    if verify and report["problems"]:
        sys.exit(1)


# -- eval --------------------------------------------------------------------------------
@main.command("eval")
@click.argument("database")
@click.option("--queries", "queries_path", required=True, help="Collection of query items (with labels).")
@click.option("--mode", default="all", show_default=True, type=click.Choice(["bcs", "es", "hds", "all"]))
@click.option("--topk", default=1000, show_default=True, help="Ranking depth for mAP and precision@k.")
@click.option("--pool", type=int, help="Coarse pool of hds [max(topk, 1000)].")
@click.option("--map-all", is_flag=True, help="mAP over the full ranking instead of the top k.")
@click.option("--json", "json_path", help="Write the metrics to this JSON file.")
@click.option("--plot", "plot_path", help="Write precision@k curves to this PNG.")
@click.option("--pr-plot", "pr_plot_path", help="Write the precision-recall curve of the Hamming ranking to this PNG.")
@click.option("--baselines", "baselines_text", default="", metavar="TEXT",
              help="Also rank with baseline codes fitted on DATABASE's F7 features, comma-separated: lsh,itq.")
def evaluate(database, queries_path, mode, topk, pool, map_all, json_path, plot_path, pr_plot_path, baselines_text):
    """Retrieval quality of DATABASE for the labelled --queries (the paper's protocol)."""
    from .bench.baselines import METHODS
    from .bench.evaluate import evaluate as run_eval, format_table
    from .shards import Collection
    _positive("topk", topk)
    _positive("pool", pool)
    modes = ("bcs", "es", "hds") if mode == "all" else (mode,)
    baselines = tuple(dict.fromkeys(b.strip().lower() for b in baselines_text.split(",") if b.strip()))
    for b in baselines:
        if b not in METHODS:
            raise HashsearchError(f"unknown baseline {b!r} in --baselines; choose from {','.join(METHODS)}")
    for path, what in ((json_path, "--json"), (plot_path, "--plot"), (pr_plot_path, "--pr-plot")):
        if path:
            check_output_file(path, what)
    db, queries = Collection.open(database), Collection.open(queries_path)
    results = run_eval(db, queries, modes=modes, topk=topk, pool=pool, map_all=map_all, baselines=baselines)
    click.echo(format_table(results))
    if json_path:
        _write_json(json_path, results if len(results) > 1 else results[0])
    if plot_path:
        from .bench.plots import plot_precision_at_k
        plot_precision_at_k(results, plot_path)
        click.echo(f"wrote {plot_path}")
    if pr_plot_path:
        from .bench.metrics import pr_curve_hamming
        from .bench.plots import plot_pr_curve
        curve = pr_curve_hamming(queries.codes(), db.codes(), queries.labels(), db.labels())
        plot_pr_curve({f"hashsearch, {db.bits} bits": curve}, pr_plot_path, title="Hamming ranking")
        click.echo(f"wrote {pr_plot_path}")


# -- bench -------------------------------------------------------------------------------
@main.command()
@click.option("--exhaustive", is_flag=True, help="Hierarchical vs binary-only vs exhaustive search speed.")
@click.option("--encode", "encode_source", metavar="SOURCE", help="Encode throughput on SOURCE: pipeline vs model alone.")
@click.option("--n", default=1_000_000, show_default=True, help="Synthetic collection size.")
@click.option("--dim", default=4096, show_default=True)
@click.option("--bits", default=128, show_default=True)
@click.option("--queries", default=200, show_default=True)
@click.option("--batch", default=1, show_default=True, help="Queries per search call.")
@click.option("--pool", type=int, help="Coarse candidate pool.")
@click.option("--radius", type=int, help="Rerank only the candidates within this Hamming radius (at most --pool).")
@click.option("--coarse", type=click.Choice(["flat", "hash", "multihash"]), help="Coarse index kind.")
@click.option("--hash-bits", type=int, help="Bits per hash key of a hash or multihash coarse index.")
@click.option("--nhash", type=int, help="Tables of a multihash coarse index.")
@click.option("--nflip", type=int, help="Bits flipped when probing a hash or multihash coarse index.")
@click.option("--collection", help="Benchmark a real encoded collection instead of synthetic data.")
@click.option("--scaling", is_flag=True, help="Run N = 10k, 100k and 1M and plot latency against N.")
@click.option("--plot", "plot_path", default="bench-scaling.png", show_default=True, help="PNG for --scaling.")
@click.option("--cache-dir", help="Where synthetic collections are cached.")
@click.option("--seed", default=0, show_default=True)
@click.option("--model", "model_path", help="Checkpoint for --encode.")
@click.option("--limit", default=10_000, show_default=True, help="Images for --encode.")
@click.option("--batch-size", default=256, show_default=True, help="Batch size for --encode.")
@click.option("--workers", default=2, show_default=True, help="Loader workers for --encode.")
@click.option("--device", default="auto", show_default=True)
@_encode_precision("Model arithmetic for --encode (see `encode --help`).")
@click.option("--json", "json_path", help="Write the results to this JSON file.")
def bench(exhaustive, encode_source, n, dim, bits, queries, batch, pool, radius, coarse, hash_bits, nhash, nflip, collection,
          scaling, plot_path, cache_dir, seed, model_path, limit, batch_size, workers, device, precision, json_path):
    """Benchmarks: --exhaustive (search speed) or --encode SOURCE (encode throughput)."""
    if exhaustive == bool(encode_source):
        raise HashsearchError("choose one benchmark: --exhaustive or --encode SOURCE")
    if json_path:
        check_output_file(json_path, "--json")
    if scaling:
        check_output_file(plot_path, "--plot")
    if encode_source:
        from .bench.encode_speed import format_encode_report, run_encode_bench
        if not model_path:
            raise HashsearchError("--encode needs --model")
        _existing(model_path, "model")
        _positive("limit", limit)
        _positive("batch-size", batch_size)
        _not_negative("workers", workers)
        result = run_encode_bench(model_path, encode_source, limit=limit, batch_size=batch_size,
                                  workers=workers, device=device, precision=precision)
        click.echo(format_encode_report(result))
    else:
        from .bench import speed
        for name, value in (("n", n), ("dim", dim), ("queries", queries), ("batch", batch), ("pool", pool)):
            _positive(name, value)
        _not_negative("radius", radius)
        common = dict(dim=dim, bits=bits, queries=queries, batch=batch, pool=pool, radius=radius, coarse=coarse,
                      seed=seed, cache_dir=cache_dir, hash_bits=hash_bits, nhash=nhash, nflip=nflip)
        if scaling:
            result = speed.run_scaling(**common)
            for r in result:
                click.echo(speed.format_report(r))
            speed.plot_scaling(result, plot_path)
            click.echo(f"wrote {plot_path}")
        else:
            result = speed.run_exhaustive_bench(n=n, collection=collection, **common)
            click.echo(speed.format_report(result))
    if json_path:
        _write_json(json_path, result)


def _write_json(path, data):
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
