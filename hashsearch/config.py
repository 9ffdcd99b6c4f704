"""Every option of hashsearch, declared once with its default, its help and, where it has one, its reason.

The library's functions take their defaults from these dataclasses and check
their values with them; the command line generates its options from them
(options.click_options), and the HTTP service reads them for its query
parameters.  Read top to bottom, this file is the list of every knob.

Nothing heavy is imported here, so `hashsearch --help` stays fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from .codes import check_bits
from .errors import HashsearchError
from .options import Options, cli_name, fraction, in_range, not_negative, option, positive, seed_range

MODES = ("bcs", "es", "hds")                   # Hamming only, exhaustive L2, hierarchical: eval reports them so
COARSE_KINDS = ("flat", "hash", "multihash")    # the faiss binary indexes of the coarse level
SYNTHETIC_CODES = ("class", "projection")       # how `bench`'s synthetic data stands in for H (bench/synthetic.py)
BASELINES = ("lsh", "itq")                     # codes eval can fit on F7 without training
# The model's arithmetic (encoders.encoder.autocast).  fp16 is a GPU's, reached through auto; the other two
# run on any device, which is what training needs: float16 training would need loss scaling, which it lacks.
ANY_DEVICE_PRECISIONS = ("fp32", "bf16")
PRECISIONS = ("auto", *ANY_DEVICE_PRECISIONS)  # auto: float16 on CUDA, float32 on a CPU
# The neighbour codes (engine/neighbours.py): their length, and how many of their nearest hds reranks beside
# H's pool.  Chosen on CIFAR-10 (README, "Faithful coarse search"): the shortest length and pool that
# keep both an edited copy's original and the exact L2 top 10 in the pool; shorter codes or a smaller
# pool lose the latter first.
NEIGHBOUR_BITS = 256
NEIGHBOUR_POOL = 500
# A search index holds a collection's F7 in RAM when it is at most this many MiB (50,000 x 512-d float16 is
# 49 MiB), so the rerank copies each candidate row (~0.1 us) instead of reading it from the page cache
# (~1-2 us): at a neighbour pool of 500 that is the larger part of a query (README, "Faithful coarse
# search").  Larger collections (1M x 4096-d is 8 GB) are read row by row and their RSS stays small.
FEATURES_IN_RAM_MB = 1024
# SSDH's weights of its two terms on H (encoders.train.hash_loss); 0 and 0 is the paper's softmax alone, the
# default because it measured better where `train` trains the backbone (docs/results.md, "SSDH's terms"): 15
# epochs of `small` on CIFAR-10 at 48 bits gave mAP@1000 0.7364 alone against 0.7074 with 2 and 1, and 4 epochs on
# Fashion-MNIST 0.8531 against 0.8427.  With the backbone frozen, 2 and 1 gained up to 0.012 (CIFAR-10, 12-64
# bits) or tied (Fashion-MNIST): `--freeze-backbone --binary-weight 2 --balance-weight 1`.
BINARY_WEIGHT = 0.0
BALANCE_WEIGHT = 0.0
# H can also learn the ITQ code of each training image's F7 beside the labels (encoders.train.hash_loss).  With the
# backbone frozen it is what lifts H above ITQ on a fine-tuned F7 at every length (docs/results.md, "ITQ's bits as
# a second target"): at 0.3, by 0.012-0.068 where softmax alone fell 0.003-0.005 below ITQ from 48 bits.  Off by
# default because the default trains the backbone, where F7, and so the target, would move under it.
ITQ_WEIGHT = 0.0
WAIT_HELP = "If another process is writing the collection, wait for it instead of failing."


# `hashsearch duplicates` (engine/duplicates.py).  A pair is two items whose F7 lie within DUPLICATE_DISTANCE
# of each other, measured in units of the collection's median F7 length so that one default serves models whose
# F7 differ in scale, or whose miniatures are alike (COPY_DISTANCE, below).  F7 is for the copies that stay
# close in it: the same picture re-encoded, a burst of shots.  Edited copies lie further from their original in
# F7 than class-mates do, so its threshold is kept tight: on CIFAR-10's test images with planted edited copies
# (README, "Near-duplicate groups") 0.15 added no pair to the miniatures' with either model; 0.25 added 251, 242
# of them false, with the fine-tuned one (pair precision 0.984 -> 0.915).  False groups are what users of photo
# libraries complain of first, so precision rules the default.
DUPLICATE_DISTANCE = 0.15
# Candidates are the pairs whose neighbour codes lie within this Hamming radius: on the same test set every
# pair within 0.3 of each other in F7 lay within 64 of 256 bits, with either model (at 0.35, 10 of 628 of the
# small model's did not); a wider radius only adds candidates to check.
DUPLICATE_RADIUS = 64
# --relative measures a pair against the items' distance to this nearest candidate: an item's local scale.  The
# 4th scored best on CIFAR-10's test set (docs/results.md, "Near-duplicate pairs"), whose planted groups hold 2 to
# 4 images; the 8th, a little behind it, stays outside a group of up to 8, as a burst of shots can be.
LOCAL_SCALE_NEIGHBOUR = 8
# Edited copies are also found by the items' miniatures (engine/copies.py): a pair whose descriptors lie within
# COPY_DISTANCE (unit-length descriptors: 0 alike, 2 opposite), in some variant, and within COPY_RATIO times the
# distance from one of them to its LOCAL_SCALE_NEIGHBOUR-th nearest item, is a pair whatever F7 says.  The ratio
# is what keeps look-alikes out: among 310 Fashion-MNIST garments (the test suite's), alike in shape and pose,
# with 5 planted groups of 3, the distance 0.3 alone paired 565 look-alikes beside the 15 planted pairs; with the
# ratio 0.5, 11; with 0.4, 2.  On CIFAR-10 with planted copies (README, "Near-duplicate groups") 0.3 and 0.4
# keep pair precision 0.984 at recall 0.968, with either model; 0.2 finds 0.926; 0.4 found 2 pairs more than 0.3.
COPY_DISTANCE = 0.3
COPY_RATIO = 0.4


def threshold(name: str, value) -> None:
    # 0 finds only identical F7; a negative or non-finite one would find nothing, or everything.
    not_negative(name, value)


@dataclass
class DuplicatesConfig(Options):
    max_distance: float = option(DUPLICATE_DISTANCE, "Pairs whose F7 lie within this L2 distance, in units of "
                                                     "the collection's median F7 length.", check=threshold)
    radius: int = option(DUPLICATE_RADIUS, "Candidate pairs: neighbour codes within this Hamming radius.",
                         check=not_negative)
    relative: float | None = option(None, "Also pairs whose F7 distance is at most this many times an item's "
                                          f"distance to its {LOCAL_SCALE_NEIGHBOUR}th nearest candidate (on CIFAR-10, "
                                          "pair precision 0.95 at 0.4-0.7, by model).", check=threshold)
    copy_distance: float | None = option(COPY_DISTANCE, "Also pairs whose miniatures, as they are or mirrored, "
                                                         "cropped or turned a little, lie within this distance "
                                                         "(0 alike, 2 opposite; 0: F7 alone).", check=threshold)
    min_group: int = option(2, "Report groups of at least this many items.", check=in_range(2, 1 << 31))
    limit_groups: int | None = option(None, "Report only the N largest groups.", check=positive)
    since: int | None = option(None, "Only groups holding an item added after this generation (only the new "
                                     "items are joined against the rest).", check=not_negative)


def gpu_share(name: str, value) -> None:
    # Ray places a fraction of one GPU, or whole GPUs: 1.5 is neither.
    not_negative(name, value)
    if value > 1 and value != int(value):
        raise HashsearchError(f"{name} must be a fraction of one GPU or a whole number of them, got {value}")


# Each loader worker is a process; past a few per core they only cost memory, and a huge count is a fork bomb.
check_workers = in_range(0, 64)


# Views lift the codes above ITQ alone at every code length measured, on CIFAR-10 and Fashion-MNIST alike, and
# each view costs one more backbone pass over SOURCE: with 4, training and encoding CIFAR-10 on 2 CPU cores stays
# within the project's goal of 2 hours (docs/results.md, "CIFAR-10 without labels" and "Fashion-MNIST without
# labels").
UNSUPERVISED_VIEWS = 4


def saw_labels(training: dict | None) -> bool:
    """Whether a model whose config records `training` has learned from class labels anywhere.

    A checkpoint of the labelled path records no `training`.  --unsupervised
    fits codes without labels, but its --weights may be the backbone of a
    model trained with them, and then the model as a whole has seen labels.
    """
    if not training or training.get("labels") is not False:
        return True
    return bool(training.get("backbone_from_labelled_model"))


@dataclass
class TrainConfig(Options):
    source: str = option(None, "Labelled SOURCE.", cli=False)
    out: str = option(None, "Checkpoint to write (rewritten after every epoch).", cli=False)
    bits: int = option(48, "Code length K (the paper uses 12, 32, 48; codes take ceil(K/8) bytes).",
                       check=lambda name, value: check_bits(value))
    # small learns from scratch, which needs labels; without them the codes come from a pretrained backbone's F7.
    backbone: str | None = option(None, "small, alexnet, efficientnet-lite0 (or -lite1, -lite2 where installed) "
                                        "[small; efficientnet-lite0 with --unsupervised].")
    unsupervised: bool = option(False, "Fit the codes without labels: ITQ on the pretrained backbone's F7, then H "
                                       "trained on augmented views (--views) (a SOURCE's labels, if any, are "
                                       "ignored).")
    views: int | None = option(None, "With --unsupervised: augmented views of each image whose F7 trains H for "
                                     f"--epochs, so that an image's views share its code [{UNSUPERVISED_VIEWS} with "
                                     "--unsupervised; 0: ITQ alone].", check=in_range(0, 64))
    features_cache: str | None = option(None, "With --unsupervised: a file keeping the backbone's F7 of SOURCE and "
                                              "of its views, read back by a later run made from the same inputs "
                                              "(another --bits then skips the backbone passes); one made from "
                                              "other inputs is refused.")
    weights: str | None = option(None, "Backbone weights: a local state_dict file, or a hashsearch checkpoint to "
                                       "reuse its backbone.")
    epochs: int = option(10, "Passes over the training set.", check=positive)
    batch_size: int = option(128, "Images per optimiser step.", check=positive)
    lr: float = option(1e-3, "Learning rate of the new layers (AdamW).", check=positive)
    # None: 1.0 from scratch, 0.1 with pretrained weights, which gives the new layers the paper's 10x.
    backbone_lr_mult: float | None = option(None, "Backbone rate / new-layer rate [1.0 from scratch, 0.1 pretrained].",
                                            check=not_negative)
    weight_decay: float = option(5e-4, "AdamW weight decay.", check=not_negative)
    warmup_epochs: float = option(0.5, "Linear warm-up, then cosine decay.", check=not_negative)
    freeze_backbone: bool = option(False, "Train only the latent and classifier layers on cached F7.")
    # SSDH's terms on H (encoders.train.hash_loss); 0 and 0 is the paper's softmax alone.
    binary_weight: float = option(BINARY_WEIGHT, "Weight of the term pushing H's activations to 0 or 1 (0: the "
                                                 "paper's softmax alone).", check=not_negative)
    balance_weight: float = option(BALANCE_WEIGHT, "Weight of the term keeping each bit of H set for half the "
                                                   "images.", check=not_negative)
    itq_weight: float = option(ITQ_WEIGHT, "With --freeze-backbone: weight of the term teaching H the ITQ code of "
                                           "each image's F7 beside its label (0.3 measured best).",
                               check=not_negative)
    precision: str = option("fp32", "Autocast to bfloat16: about 2x faster on CPUs with AVX512-BF16/AMX.",
                            choices=ANY_DEVICE_PRECISIONS)
    input_size: int | None = option(None, "Input side in pixels [the backbone's default].", check=positive)
    val_fraction: float = option(0.05, "Held out to report accuracy each epoch.", check=fraction)
    device: str = option("auto", "auto, cpu or cuda.")
    limit: int | None = option(None, "Use only the first N items of SOURCE.", check=positive)
    workers: int = option(2, "DataLoader worker processes.", check=check_workers)
    data_dir: str | None = option(None, "Where named datasets such as fashion-mnist live.")
    seed: int = option(0, "Seed of the initialisation and the data order.", check=seed_range)
    resume: bool = option(False, "Continue the run saved in --out.")
    quiet: bool = option(False, "No progress bars; the one line per epoch stays.")

    def __post_init__(self):
        if not self.source or not self.out:
            raise HashsearchError("training needs a SOURCE and --out")
        if self.backbone is None:
            self.backbone = "efficientnet-lite0" if self.unsupervised else "small"
        if self.views is None:
            self.views = UNSUPERVISED_VIEWS if self.unsupervised else 0
        if self.views and not self.unsupervised:
            raise HashsearchError("--views is for --unsupervised training")
        if self.features_cache is not None:
            self._check_features_cache()
        super().__post_init__()
        if self.unsupervised:
            self._refuse_what_unsupervised_would_ignore()
        elif self.itq_weight and not self.freeze_backbone:
            # ITQ is fitted once to F7: a backbone that trains would move F7 away from the codes H is taught.
            raise HashsearchError("--itq-weight needs --freeze-backbone: ITQ's codes are fitted once to F7, which "
                                  "a training backbone would change")

    def _check_features_cache(self):
        if not self.unsupervised:
            raise HashsearchError("--features-cache is for --unsupervised training")
        if not str(self.features_cache).strip():
            raise HashsearchError("--features-cache needs a file name")
        if Path(self.features_cache).resolve() == Path(self.out).resolve():
            raise HashsearchError("--features-cache and --out name the same file")

    def _refuse_what_unsupervised_would_ignore(self):
        # --unsupervised fits ITQ once and trains only H on views, with no held-out split and no schedule,
        # and writes its checkpoint once: an option it cannot honour is refused rather than dropped.
        refused = {name: "is for labelled training, not --unsupervised" for name in
                   ("backbone_lr_mult", "weight_decay", "warmup_epochs", "val_fraction", "resume", "binary_weight",
                    "balance_weight", "itq_weight")}
        if not self.views:
            refused.update(dict.fromkeys(("epochs", "batch_size", "lr"), "trains H on views, and --views 0 has none"))
        for f in fields(self):
            if f.name in refused and getattr(self, f.name) != f.default:
                raise HashsearchError(f"{cli_name(f)} {refused[f.name]}")
        if self.views and self.batch_size < 2:
            raise HashsearchError("--batch-size must be at least 2 with --views: each image's views are told apart "
                                  "from the other images in its batch")


@dataclass
class EncodeConfig(Options):
    limit: int | None = option(None, "Use only the first N items of SOURCE.", check=positive)
    # Large enough for the model's GEMMs to run at speed, small enough to bound memory.
    batch_size: int = option(256, "Images per model call.", check=positive)
    workers: int = option(2, "DataLoader worker processes that decode images.", check=check_workers)
    device: str = option("auto", "auto, cpu or cuda.")
    # 100,000 rows of 4096-d float16 make 800 MB shards: few files at 1M, and a crash redoes at most one.
    shard_size: int = option(100_000, "Rows per HDF5 shard.", check=positive)
    float32: bool = option(False, "Store features as float32 (default float16, half the disk, same ranking).")
    precision: str = option("auto", "Model arithmetic: auto is float16 on CUDA, float32 on CPU; bf16 is fast on "
                                    "CPUs with AVX512-BF16/AMX.", choices=PRECISIONS)
    overwrite: bool = option(False, "Replace an existing collection made differently.")
    data_dir: str | None = option(None, "Where named datasets such as fashion-mnist live.")
    quiet: bool = option(False, "No progress bars.")
    wait: bool = option(False, WAIT_HELP)

    @property
    def feature_dtype(self) -> str:
        return "float32" if self.float32 else "float16"


# What `add` takes of encode's options: the rest are fixed by the collection it adds to.
ADD_SKIPS = ("shard_size", "float32", "precision", "overwrite")


@dataclass
class SearchConfig(Options):
    """A query's parameters: Index.search's defaults, `hashsearch query`'s options and the service's.

    Their checks are Index.search's own, which needs the collection to make them (k is capped at its items,
    radius bounded by its bits, nflip by its hash key).
    """
    k: int = option(10, "Results per query.", flag="-k")
    # A pool well past k, for collections of any size; `bench` measures what a smaller pool trades at 1M (README).
    # 0 is for collections whose H codes say nothing of F7's neighbours (the class-like codes of bench's 1M rows):
    # their lookup then costs time and adds no answer.
    pool: int = option(200, "Coarse candidate pool of H's codes: the rows hds reranks by L2 (0: none; the "
                            "neighbour codes' and the cells' rows alone, which then may take every place).")
    radius: int | None = option(None, "Take the candidates within this Hamming radius instead (at most --pool).")
    nflip: int | None = option(None, "Bucket probing depth for hash indexes [the one it was built with].")
    # Both unset, they are what build-index measured best on the collection (engine/tuning.py) where the search
    # shortlists by the sketch; one set leaves the other at 0.  Elsewhere (F7 not in RAM, k past
    # neighbour_places, an index without cells, a radius, --ray) the cells are not searched and the pool,
    # unless set, is NEIGHBOUR_POOL.
    neighbour_pool: int | None = option(None, "hds: candidates the neighbour codes add to the pool (0: H's pool "
                                              "alone, the paper's search, unless --neighbour-cells) [with "
                                              "--neighbour-cells unset: the index's tuned pool where the cells "
                                              f"can be searched, else {NEIGHBOUR_POOL}].", check=not_negative)
    neighbour_cells: int | None = option(None, "hds: sketch cells whose nearest rows join the pool, where F7 is "
                                               "held in RAM and k is within --neighbour-places [with "
                                               "--neighbour-pool unset: the index's tuned count, else 0].",
                                         check=not_negative)
    mode: str = option("hds", "hds: Hamming pool, then L2 on F7; bcs: Hamming only; es: exhaustive L2.",
                       choices=MODES)
    # An edited copy or a look-alike belongs at the top; deeper down, H's class-level order is what the
    # paper's hds gives (README, "Faithful coarse search": the class mAP this keeps).
    neighbour_places: int = option(10, "hds: the first places that rows found only by the neighbour codes may "
                                       "take; past them, H's pool ranks alone (with --pool 0, every place is "
                                       "theirs).", check=positive)


@dataclass
class RayConfig(Options):
    """Where a --ray run runs (hashsearch.distributed)."""
    ray: bool = option(False, "Run on a Ray cluster (pip install 'hashsearch[ray]').")
    # A cluster started here listens on 127.0.0.1 only; reaching other machines is the user's explicit choice.
    address: str | None = option(None, "Ray cluster to join: auto, or HOST:PORT of its head [start one on this "
                                       "machine, on 127.0.0.1 only].")
    # Ray waits without end, and without a word, for actors whose worker processes cannot start (plasma's mmap
    # failing under a memory limit, say).  An actor starts in seconds, an encoder's with its model loaded: one
    # that has not in two minutes is not coming, or the cluster's CPUs are held by other work.
    start_timeout: float = option(120.0, "Seconds the Ray actors may take to start before the run stops and says "
                                         "why.", check=in_range(0.1, 86_400))

    def __post_init__(self):
        super().__post_init__()
        if self.address is not None and not self.ray:
            raise HashsearchError("--address is for --ray runs; add --ray")
        if self.start_timeout != RayConfig.start_timeout and not self.ray:
            raise HashsearchError("--start-timeout is for --ray runs; add --ray")


@dataclass
class RayEncodeConfig(RayConfig):
    # One per core is this machine's best (README); on a cluster, one per GPU.
    actors: int = option(2, "Encoder actors for --ray, each holding the model once.", check=in_range(1, 4096))
    gpus_per_actor: float = option(0, "GPUs each encoder actor takes for --ray (0: encode on CPUs).",
                                   check=gpu_share)
    # Loader processes inside actors fight the other actors for the cores: on a small machine they slow
    # encoding down (README, "Scale-out"), so an actor decodes its own images unless asked.
    actor_workers: int = option(0, "Loader processes inside each encoder actor for --ray (0: it decodes its "
                                   "images itself; more actors use more cores).", check=check_workers)


@dataclass
class RaySearchConfig(RayConfig):
    # Each partition costs one actor call a query, far more than a search on one machine (README,
    # "Scale-out"); more pay off once one machine's memory or cores no longer hold the collection.
    partitions: int = option(2, "Partitions of the collection for --ray, one actor each (at most its shards).",
                             check=in_range(1, 4096))


@dataclass
class IndexConfig(Options):
    """`build-index`'s settings: the coarse index's kind and its hashing (see engine.coarse)."""
    coarse: str = option("flat", "Coarse index kind.", choices=COARSE_KINDS)
    hash_bits: int | None = option(None, "Bits per hash key (hash, multihash) [about 16 codes a bucket].",
                                   check=positive)
    nhash: int | None = option(None, "Number of hash tables (multihash) [bits / hash-bits].", check=positive)
    nflip: int | None = option(None, "Bits flipped when probing buckets [hash 2, multihash 0].", check=not_negative)
    # H groups images by class, so its nearest codes are class-mates rather than the query's neighbours:
    # ITQ codes fitted to F7 keep those, and the README's "Faithful coarse search" measures what they buy.
    neighbour_bits: int | None = option(None, "Length of the neighbour codes fitted to F7 for hds's neighbour pool; "
                                              f"0 for none [{NEIGHBOUR_BITS}, or F7's dimension if smaller].",
                                        check=not_negative)
    # A hash index finds only codes that match one of its slices exactly, which real images' neighbour codes
    # mostly do not (README, "Faithful coarse search"): flat ranks every code exactly.
    neighbour_coarse: str = option("flat", "Index kind over the neighbour codes.", choices=COARSE_KINDS)
    # Kept across builds, so that an index built after adds and deletes answers as the followed one does.
    refit: bool = option(False, "Fit the neighbour codes to the current rows again instead of keeping the "
                                "collection's.")
    # The measured choice is kept with the cells for the same reason, and it is timed: measure again after a
    # collection has grown past what it was measured on, or on the machine that will serve it.
    retune: bool = option(False, "Measure hds's default neighbour sources again (engine/tuning.py), keeping the "
                                 "collection's projection and cells.")

    def neighbour_bits_for(self, feature_dim: int, rows: int) -> int:
        """The neighbour codes' length for `rows` live rows of `feature_dim`-d F7: PCA has no more directions
        than either, so a small collection gets shorter codes (none below 8 rows)."""
        if self.neighbour_bits is not None:
            return self.neighbour_bits
        return min(NEIGHBOUR_BITS, feature_dim // 8 * 8, rows // 8 * 8)


@dataclass
class CompactConfig(Options):
    # Rewriting costs a shard's worth of I/O, and a few dead rows cost searches almost nothing.
    threshold: float = option(0.2, "Rewrite the shards in which more than this share of rows is deleted.",
                              check=fraction)


@dataclass
class EvalConfig(Options):
    mode: str = option("all", "Ranking to score, or all of them.", choices=MODES + ("all",))
    # The paper scores mAP at 1000; precision@k is reported up to the same depth.
    topk: int = option(1000, "Ranking depth for mAP and precision@k.", check=positive)
    pool: int | None = option(None, "Coarse pool of hds [max(topk, 1000); query's with --near-duplicates].",
                              check=positive)
    map_all: bool = option(False, "mAP over the full ranking instead of the top k.")
    baselines: str = option("", "Also rank with baseline codes fitted on DATABASE's F7 features, comma-separated: "
                                "lsh,itq.")
    # One fit is one draw: a baseline's mAP moves with its seed by as much as the gaps it is compared with
    # (docs/results.md, the baselines' seed ranges), so it is reported as the mean and sd over seeds.
    baseline_seeds: int = option(10, "Seeds 0..N-1 each baseline is fitted with; its row gives the mean and sd of "
                                      "their mAP.", check=positive)
    baseline_bits: int | None = option(None, "Code length of the baselines [the database's].", check=positive)
    neighbour_pool: int | None = option(SearchConfig.neighbour_pool, "hds's neighbour pool, as query's "
                                        f"--neighbour-pool (used where DATABASE's index has neighbour codes) "
                                        f"[{NEIGHBOUR_POOL} for the ranking; query's for --near-duplicates].",
                                        check=not_negative)
    neighbour_cells: int | None = option(SearchConfig.neighbour_cells, "--near-duplicates: hds's sketch cells, as "
                                                                       "query's --neighbour-cells.",
                                         check=not_negative)
    near_duplicates: int | None = option(None, "Instead of --queries: edit N database images in every way of "
                                               "bench/near_duplicates.py and report how often each ranking finds "
                                               "the original.", check=positive)
    seed: int = option(0, "Which images --near-duplicates edits.", check=seed_range)

    def modes(self) -> tuple:
        return MODES if self.mode == "all" else (self.mode,)

    def near_duplicate_search(self) -> SearchConfig:
        """What --near-duplicates searches with: query's defaults, and this run's pools where given."""
        return SearchConfig(neighbour_pool=self.neighbour_pool, neighbour_cells=self.neighbour_cells,
                            **({} if self.pool is None else {"pool": self.pool}))

    def baseline_methods(self) -> tuple:
        methods = tuple(dict.fromkeys(b.strip().lower() for b in self.baselines.split(",") if b.strip()))
        for b in methods:
            if b not in BASELINES:
                raise HashsearchError(f"unknown baseline {b!r} in --baselines; choose from {','.join(BASELINES)}")
        return methods

    def hds_pool(self) -> int:
        # Deep enough that hds can fill a top-k ranking, and never below 1000.
        return self.pool or max(self.topk, 1000)


@dataclass
class TimedQueries(Options):
    """The queries a search benchmark times."""
    queries: int = option(200, "Held-out queries.", check=positive)
    # Batch 1 (the paper's setting) is always timed; a larger batch adds a batched column.
    batch: int = option(256, "Queries per search call for the batched column.", check=positive)


@dataclass
class NeighbourCodesBuild(Options):
    """How a benchmark builds hashsearch's neighbour codes, as build-index would."""
    neighbour_bits: int | None = option(None, "Neighbour codes of the coarse index, as build-index's "
                                              "--neighbour-bits.", check=not_negative)
    neighbour_coarse: str = option(IndexConfig.neighbour_coarse, "Index kind over the neighbour codes, as "
                                                                 "build-index's --neighbour-coarse.",
                                   choices=COARSE_KINDS)

    def build_options(self) -> dict:
        """These as Index.build's keyword arguments: the ones given (neighbour_bits None is build-index's
        default length)."""
        return {key: value for key, value in (("neighbour_bits", self.neighbour_bits),
                                              ("neighbour_coarse", self.neighbour_coarse)) if value is not None}


@dataclass
class BenchData(TimedQueries):
    """The data `bench exhaustive` and `bench peers` search: a synthetic collection, or a real one."""
    n: int = option(1_000_000, "Synthetic collection size.", check=positive)
    dim: int = option(4096, "Feature dimension (fc7 is 4096-d).", check=positive)
    bits: int = option(128, "Code length.", check=positive)
    collection: str | None = option(None, "Benchmark a real encoded collection instead of synthetic data.")
    query_collection: str | None = option(None, "With --collection: take the queries from this collection's rows "
                                                "(held out, such as the test split) instead of the database's own.")
    seed: int = option(0, "Seed of the synthetic data and the queries.", check=seed_range)
    synthetic_codes: str = option("class", "Synthetic H codes: class (shared by a cluster, as class-trained codes "
                                           "are) or projection (a random projection of each row's F7, which keeps "
                                           "its neighbours).", choices=SYNTHETIC_CODES)
    cache_dir: str | None = option(None, "Where synthetic collections are cached.")


@dataclass
class HeadlineSearch(Options):
    """The 1M headline settings of `bench exhaustive` (README), which the other benchmarks search with."""
    hash_bits: int = option(18, "Bits per slice of the multihash index.", check=positive)
    # At 1M rows a smaller pool loses true neighbours and a larger one adds reads without adding recall
    # (README, "Hierarchical vs exhaustive search at 1M images").
    pool: int = option(32, "Coarse candidate pool.", check=positive)
    radius: int = option(12, "Rerank only candidates within this Hamming radius.", check=not_negative)


@dataclass
class ExhaustiveBenchConfig(BenchData, NeighbourCodesBuild):
    pool: int = option(HeadlineSearch.pool, "Coarse candidate pool of H's codes, as query's --pool (0: none).",
                       check=not_negative)
    radius: int | None = option(None, "Rerank only the candidates within this Hamming radius (at most --pool).",
                                check=not_negative)
    # multihash with 16-bit slices is the fastest coarse level that keeps recall at 1M (README, "What the engine
    # does, and why"); the headline's wider slices trade a little recall for speed once a radius cuts the reads.
    coarse: str = option("multihash", "Coarse index kind.", choices=COARSE_KINDS)
    hash_bits: int | None = option(None, "Bits per hash key of a hash or multihash coarse index.", check=positive)
    nhash: int | None = option(None, "Tables of a multihash coarse index.", check=positive)
    nflip: int | None = option(None, "Bits flipped when probing a hash or multihash coarse index.",
                               check=not_negative)
    neighbour_pool: int | None = option(SearchConfig.neighbour_pool, "hds's neighbour pool, as query's "
                                                                     "--neighbour-pool.", check=not_negative)
    neighbour_cells: int | None = option(SearchConfig.neighbour_cells, "hds's sketch cells, as query's "
                                                                       "--neighbour-cells.", check=not_negative)

    def __post_init__(self):
        super().__post_init__()
        # Refused before minutes of data and index building, where the search itself would refuse it.
        if self.pool == 0 and (self.radius is not None or self.neighbour_bits == 0
                               or (self.neighbour_pool == 0 and not self.neighbour_cells)):
            raise HashsearchError("--pool 0 searches the neighbour codes or the cells alone: it needs neighbour "
                                  "codes, no --radius, and --neighbour-pool or --neighbour-cells above 0")


@dataclass
class DuplicatesBenchConfig(Options):
    # A tenth of the images with 1-3 copies each: about 2,000 planted pairs among 12,000 images of CIFAR-10.
    share: float = option(0.1, "Share of SOURCE's images that get 1 to 3 edited copies.", check=fraction)
    seed: int = option(0, "Which images are edited, and how.", check=seed_range)
    distances: str = option("0.1,0.2,0.25,0.3,0.35,0.4,0.5", "Thresholds (duplicates' --max-distance) to "
                                                             "score, comma-separated.")
    copy_distances: str = option("0.15,0.2,0.25,0.3", "Thresholds of the miniatures (duplicates' --copy-distance) "
                                                      "to score beside F7's default, comma-separated.")
    work: str | None = option(None, "Folder for the test set, its collection and the synthetic one, reused by a "
                                    "later run [a temporary one, removed].")
    relative: float | None = option(None, "duplicates' --relative for every threshold scored.", check=threshold)
    synthetic_n: int = option(0, "Also time `hashsearch duplicates` on a synthetic collection of this many "
                                 "items with planted duplicates (0: skip).", check=not_negative)
    synthetic_dim: int = option(512, "F7 dimension of the synthetic collection (the small backbone's).",
                                check=positive)


@dataclass
class EncodeBenchConfig(Options):
    # Enough batches for a steady rate, few enough for a quick run; the other settings are encode's own.
    limit: int = option(10_000, "Images to encode.", check=positive)


@dataclass
class LinkedBenchCollection(HeadlineSearch):
    """Benchmarks that work on a hard-linked copy of `bench exhaustive`'s synthetic collection."""
    n: int = option(BenchData.n, "Rows of the synthetic collection (`bench exhaustive`'s, linked, not copied).",
                    check=positive)


@dataclass
class LiveBenchConfig(LinkedBenchCollection):
    # The case: 10,000 new images into a 1M collection.
    add: int = option(10_000, "Rows appended to time an add.", check=positive)
    delta: float = option(0.10, "Share of N added after the index was built, for the search timing.", check=fraction)
    deleted: float = option(0.05, "Share of N deleted after the index was built.", check=fraction)
    queries: int = option(TimedQueries.queries, "Held-out queries timed at batch 1.", check=positive)


@dataclass
class ShardedBenchConfig(LinkedBenchCollection, TimedQueries):
    partitions: str = option("1,2,4", "Partition counts to time, comma-separated.")


@dataclass
class PeersBenchConfig(BenchData, NeighbourCodesBuild):
    methods: str = option("all", "Methods to run, comma-separated: hashsearch, faiss-binary-hnsw, usearch-hamming, "
                                 "milvus-lite, faiss-ivf-sqfp16, faiss-ivf-pq, hnswlib, or all.")


@dataclass
class ServeConfig(Options):
    # Loopback unless asked: a search service with an upload endpoint is not for the whole network by default.
    host: str = option("127.0.0.1", "Address to listen on.")
    port: int = option(8000, "Port to listen on.", check=in_range(1, 65535))
    token_file: str | None = option(None, "File holding the bearer token that POST /items and DELETE /items "
                                          "require; without it, changes are refused.")
    # A phone photo is a few MB; 20 MB leaves room without letting one request fill the memory.
    max_upload_mb: float = option(20, "Largest upload accepted, in MB.", check=positive)
    workers: int | None = option(None, "Worker processes answering requests, each with the collection, its index "
                                       "and the model loaded (default: one per CPU core, at most 8).",
                                 check=in_range(1, 64))


def serve_workers(config: ServeConfig) -> int:
    """How many processes `serve` answers with.  A search by id is ~0.5 ms of Python, numpy and faiss, and one
    process runs one at a time (the GIL), so one process per core is what uses them all (README, "Serving":
    measured 1 and 2 workers on 2 cores).  Past 8, each worker's copy of the model and index costs more
    memory than the cores it would fill are likely to be worth."""
    if config.workers is not None:
        return config.workers
    return max(1, min(8, usable_cores()))


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system says it, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class ServeBenchConfig(Options):
    clients: int = option(32, "Concurrent clients.", check=in_range(1, 1024))
    seconds: float = option(60, "How long the clients run each kind of search: by id, then by upload.",
                            check=in_range(1, 3600))
    workers: int | None = option(None, "Worker processes of the server (default: serve's).", check=in_range(1, 64))
    writes: bool = option(False, "Add and delete items through the API while the clients run.")
    seed: int = option(0, "Seed of the clients' choices.", check=seed_range)
