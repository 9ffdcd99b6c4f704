"""The options of `hashsearch eval` and `hashsearch bench`, each declared once (see hashsearch.options)."""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.coarse import KINDS as COARSE_KINDS
from ..options import Options, not_negative, option, positive

# The rankings eval can score: Hamming only, exhaustive L2, hierarchical.
EVAL_MODES = ("bcs", "es", "hds")
# Baseline codes eval can fit on the database's F7 features.
BASELINES = ("lsh", "itq")


@dataclass
class EvalConfig(Options):
    mode: str = option("all", "Ranking to score, or all of them.", choices=EVAL_MODES + ("all",))
    # The paper scores mAP at 1000; precision@k is reported up to the same depth.
    topk: int = option(1000, "Ranking depth for mAP and precision@k.", check=positive)
    pool: int | None = option(None, "Coarse pool of hds [max(topk, 1000)].", check=positive)
    map_all: bool = option(False, "mAP over the full ranking instead of the top k.")
    baselines: str = option("", "Also rank with baseline codes fitted on DATABASE's F7 features, comma-separated: "
                                "lsh,itq.")

    def modes(self) -> tuple:
        return EVAL_MODES if self.mode == "all" else (self.mode,)

    def baseline_methods(self) -> tuple:
        from ..errors import HashsearchError
        methods = tuple(dict.fromkeys(b.strip().lower() for b in self.baselines.split(",") if b.strip()))
        for b in methods:
            if b not in BASELINES:
                raise HashsearchError(f"unknown baseline {b!r} in --baselines; choose from {','.join(BASELINES)}")
        return methods

    def hds_pool(self) -> int:
        # Deep enough that hds can fill a top-k ranking, and never below 1000.
        return self.pool or max(self.topk, 1000)


@dataclass
class ExhaustiveBenchConfig(Options):
    n: int = option(1_000_000, "Synthetic collection size.", check=positive)
    dim: int = option(4096, "Feature dimension (fc7 is 4096-d).", check=positive)
    bits: int = option(128, "Code length.", check=positive)
    queries: int = option(200, "Held-out queries.", check=positive)
    # Batch 1 (the paper's setting) is always timed; a larger batch adds a batched column.
    batch: int = option(256, "Queries per search call for the batched column.", check=positive)
    # Measured at 1M x 128 bits (README): recall@10 0.987 at ~0.13 ms a query, and
    # pools above 32 add reads without adding recall.
    pool: int = option(32, "Coarse candidate pool.", check=positive)
    radius: int | None = option(None, "Rerank only the candidates within this Hamming radius (at most --pool).",
                                check=not_negative)
    # multihash with 16-bit slices is the fastest exact-enough coarse level at 1M (README).
    coarse: str = option("multihash", "Coarse index kind.", choices=COARSE_KINDS)
    hash_bits: int | None = option(None, "Bits per hash key of a hash or multihash coarse index.", check=positive)
    nhash: int | None = option(None, "Tables of a multihash coarse index.", check=positive)
    nflip: int | None = option(None, "Bits flipped when probing a hash or multihash coarse index.",
                               check=not_negative)
    collection: str | None = option(None, "Benchmark a real encoded collection instead of synthetic data.")
    seed: int = option(0, "Seed of the synthetic data and the queries.")
    cache_dir: str | None = option(None, "Where synthetic collections are cached.")


@dataclass
class EncodeBenchConfig(Options):
    # Enough batches for a steady rate, few enough for a quick run; the other settings are encode's own.
    limit: int = option(10_000, "Images to encode.", check=positive)
