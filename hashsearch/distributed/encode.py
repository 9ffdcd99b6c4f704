"""`hashsearch encode --ray`: encoder actors, each holding the model once, over chunks of SOURCE.

The driver keeps encode's reader-independent parts: the one writer (which
holds the collection's write lock, as every writer must), the resume point
and the rejects.  The actors run the reader and the model over chunks of
whole batches, aligned as encode aligns them, and the driver writes the
chunks' batches in SOURCE order.  So the collection is the one a
single-process encode writes, shard for shard, and a killed driver resumes
with the same command like any encode.

Why plain actors and not Ray Data's map_batches with an actor pool (both
measured, docs/scale.md): the writer needs the batches in SOURCE order and
aligned to --batch-size, as resume does.  Ray Data returned them out of order
unless told to preserve it, and cut its blocks of 100 rows into model calls
of 256 + 44, so its output would have to be re-cut; on 2 CPUs its read tasks
and the actor pool also waited on each other for good with ray.data.range
as input.  It was no faster end to end, and it is another 254 MB to install
(pyarrow, pandas).

An actor that dies is restarted by Ray, and the chunk it was encoding is
retried on it (MAX_RESTARTS times); encoding is deterministic, so the retried
chunk's batches are the same.
"""
from __future__ import annotations

import collections
import uuid

from ..config import EncodeConfig, RayEncodeConfig
from ..encoders.checkpoint import read_checkpoint
from ..encoders.encoder import Encoder
from ..encoders.runner import describe_encoder, encode_collection, encoded_batches
from ..encoders.sources import open_source
from ..errors import HashsearchError
from .cluster import MAX_RESTARTS, check_resources, cluster_cpus, import_ray, ray_cluster, task_error, wait_started

# Batches a chunk: enough to amortise starting the actor's loader workers, few enough that
# every actor gets chunks on a small SOURCE.
CHUNK_BATCHES = 8
# Chunks queued per actor: the next is ready when one finishes.
IN_FLIGHT = 2


class EncoderWorker:
    """What an encoder actor runs: the model, loaded once, and SOURCE opened once."""

    def __init__(self, model_path: str, source_spec: str, cfg: dict, device: str, threads: int):
        import torch
        torch.set_num_threads(threads)
        self.cfg = EncodeConfig(**cfg)
        self.encoder = Encoder.from_checkpoint(model_path, device=device, precision=self.cfg.precision)
        self.source = open_source(source_spec, data_dir=self.cfg.data_dir, limit=self.cfg.limit)

    def describe(self) -> dict:
        return describe_encoder(self.encoder) | {"items": len(self.source), "source": self.source.fingerprint()}

    def encode(self, first: int, end: int, start: int) -> list:
        return list(encoded_batches(self.encoder, self.source, range(first, end), self.cfg, start))


class RayMapper:
    """encode's mapper on Ray: `actors` EncoderWorker actors with `gpus_per_actor` GPUs each."""

    def __init__(self, model_path, source_spec: str, cfg: EncodeConfig, *, actors: int, gpus_per_actor: float = 0,
                 actor_workers: int = RayEncodeConfig.actor_workers,
                 start_timeout: float = RayEncodeConfig.start_timeout):
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            raise HashsearchError("RayMapper needs a Ray connection: open one with hashsearch.distributed.ray_cluster")
        RayEncodeConfig(ray=True, actors=actors, gpus_per_actor=gpus_per_actor, actor_workers=actor_workers,
                        start_timeout=start_timeout)
        self.start_timeout = start_timeout
        read_checkpoint(model_path)     # a bad checkpoint is its own error here, not an actor that dies loading it
        self.cfg = cfg
        # Fractional CPUs, so that the actors fit on a cluster of fewer CPUs (whole ones would wait forever).
        cpus = min(1.0, cluster_cpus(ray) / actors)
        check_resources(ray, cpus, gpus_per_actor, actors)
        device = "cuda" if gpus_per_actor else cfg.device
        worker, token = ray.remote(EncoderWorker), uuid.uuid4().hex[:8]
        self.actors = [worker.options(num_cpus=cpus, num_gpus=gpus_per_actor, max_restarts=MAX_RESTARTS,
                                      max_task_retries=MAX_RESTARTS, name=f"hashsearch-encoder-{token}-{i}")
                       .remote(str(model_path), source_spec, cfg.given() | {"workers": actor_workers}, device,
                               max(1, int(cpus)))
                       for i in range(actors)]
        self.source_spec = source_spec
        self._described = None

    def describe(self) -> dict:
        """The model, as every actor loaded it; each must see the same SOURCE."""
        if self._described is None:
            wait_started(self._ray, self.actors, self.start_timeout, "encoder")
            described = [self._get(a.describe.remote(), "loading the model") for a in self.actors]
            if any(d != described[0] for d in described):
                raise HashsearchError(f"the encoder actors see different models or SOURCEs at {self.source_spec} "
                                      "(every node must see the same files at the same paths)")
            self._described = described[0]
        return self._described

    def batches(self, source, indices: range, start: int = 0):
        """The batches of indices[start:], in order, encoded by the actors chunk by chunk."""
        described = self.describe()
        if (described["items"], described["source"]) != (len(source), source.fingerprint()):
            raise HashsearchError(f"the encoder actors see another {self.source_spec} than this process "
                                  "(run the driver where the SOURCE is the same on every node)")
        size = self.cfg.batch_size
        # whole batches, aligned as encoded_batches aligns them, from the one holding `start`
        first = indices[0] + (max(start, indices[0]) - indices[0]) // size * size
        end = indices[-1] + 1
        batches = -(-(end - first) // size)
        # a multiple of the actors' count of chunks of about equal size, so that none is left working alone
        count = len(self.actors) * -(-batches // (len(self.actors) * CHUNK_BATCHES))
        step = size * -(-batches // count)
        chunks = [(a, min(a + step, end)) for a in range(first, end, step)]
        pending = collections.deque()
        for j, (a, b) in enumerate(chunks):
            pending.append(((a, b), self.actors[j % len(self.actors)].encode.remote(a, b, start)))
            if len(pending) >= IN_FLIGHT * len(self.actors):
                yield from self._next(pending)
        while pending:
            yield from self._next(pending)

    def _next(self, pending) -> list:
        (a, b), future = pending.popleft()
        return self._get(future, f"encoding items {a}..{b - 1}")

    def _get(self, future, what: str):
        ray = self._ray
        try:
            return ray.get(future)
        except ray.exceptions.RayTaskError as exc:
            raise task_error(exc) or HashsearchError(f"an encoder actor failed {what}: {exc.cause!r}") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise HashsearchError(f"an encoder actor died {what} ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:300]}); run the same command to resume") from None
        except ray.exceptions.RayError as exc:
            raise HashsearchError(f"Ray failed {what}: {type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:300]}") from None

    def close(self) -> None:
        actors, self.actors = self.actors, []
        for actor in actors:
            self._ray.kill(actor, no_restart=True)


def encode_on_ray(model_path, source_spec: str, out, *, log=print, ray: RayEncodeConfig | None = None,
                  **options) -> dict:
    """`hashsearch encode --ray`: encode_collection with its model in Ray actors.  `ray` says where and how
    many (RayEncodeConfig); `options` are EncodeConfig's fields.  The collection is the one encode writes."""
    ray = ray or RayEncodeConfig(ray=True)
    cfg = EncodeConfig(**options)
    with ray_cluster(ray.address):
        mapper = RayMapper(model_path, source_spec, cfg, actors=ray.actors, gpus_per_actor=ray.gpus_per_actor,
                           actor_workers=ray.actor_workers, start_timeout=ray.start_timeout)
        try:
            return encode_collection(model_path, source_spec, out, log=log, mapper=mapper, **options)
        finally:
            mapper.close()      # also when encode refused SOURCE before it took the mapper over
