"""The Ray cluster hashsearch's distributed commands run on: joined, or started on this machine.

A cluster started here listens on 127.0.0.1 only.  Ray binds its servers to
the node's address, which it takes from the network interfaces unless told
that this is a single-machine cluster (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
read when ray is first imported); it is checked after start-up, and a
cluster that came up on another address is stopped rather than used.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

from ..errors import HashsearchError

_LOOPBACK = ("127.0.0.1", "::1", "localhost")
# Restarts of an actor that died (a lost node, the OOM killer): enough for a few crashes of a long-lived
# one, and an actor its work keeps killing (a damaged shard, a hostile image) then fails instead of looping.
MAX_RESTARTS = 3


def import_ray(*, loopback: bool = False):
    """The ray module, or one line saying how to install it.  `loopback`: a cluster started by this
    process will be a single-machine one (only effective before ray's first import)."""
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")      # no network calls home from a search engine
    try:
        import ray
    except ImportError:
        raise HashsearchError("--ray needs Ray, which is not installed: pip install 'hashsearch[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None):
    """Ray, connected for the block.

    address None starts a local cluster of `num_cpus` CPUs [all of them] on 127.0.0.1 and stops it
    afterwards; "auto" or HOST:PORT joins a running one.  A process already connected (a library
    user's own ray.init) keeps its connection, and it is not closed here.
    """
    # A driver joining a cluster on this machine's loopback must call itself 127.0.0.1 as well.
    ray = import_ray(loopback=address is None or address.rsplit(":", 1)[0] in _LOOPBACK)
    if ray.is_initialized():
        yield ray
        return
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     logging_level=logging.ERROR, log_to_driver=False)
            node = ray.util.get_node_ip_address()
            if node not in _LOOPBACK:
                ray.shutdown()
                raise HashsearchError(f"the local Ray cluster came up on {node}, not 127.0.0.1; set "
                                      "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray is imported")
        else:
            _check_reachable(address)
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except HashsearchError:
        raise
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise HashsearchError(f"cannot {'start a local Ray cluster' if address is None else f'join the Ray cluster at {address}'}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# Ray retries an unreachable head for minutes; a wrong address should fail at once.
_CONNECT_SECONDS = 5
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _check_reachable(address: str) -> None:
    """A HOST:PORT that nothing answers on is one error now, not minutes of Ray's retries."""
    if address == "auto" or address.startswith("ray://"):
        return                  # Ray finds (or fails to find) a local cluster by itself, quickly
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise HashsearchError(f"--address must be auto or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_SECONDS) as conn:
            # Ray's head speaks gRPC: to an HTTP/2 preface it answers with a SETTINGS frame (type 4).
            conn.sendall(_HTTP2_PREFACE + _EMPTY_SETTINGS)
            head = conn.recv(9)
    except (OSError, ValueError) as exc:
        raise HashsearchError(f"no Ray cluster answers at {address}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(head) < 4 or head[3] != 4:
        raise HashsearchError(f"what answers at {address} is not a Ray cluster's head (no gRPC)")


def cluster_cpus(ray) -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def task_error(exc) -> HashsearchError | None:
    """The HashsearchError an actor raised (its own class, GenerationGone included), from Ray's wrapper of it,
    whose text carries the remote traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, HashsearchError) else None


def wait_started(ray, actors: list, timeout: float, what: str) -> None:
    """Return once every actor has started (its __init__ done or failed), or raise after `timeout` seconds
    saying why none came: Ray itself keeps retrying a worker process that cannot start, for ever."""
    _, waiting = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=len(actors), timeout=timeout)
    if waiting:
        raise HashsearchError(f"{len(waiting)} of {len(actors)} {what} actors did not start within {timeout:g} s: Ray "
                              "cannot start their worker processes (short of memory? see raylet.err in Ray's "
                              "session logs), or other work holds the cluster's CPUs; --start-timeout waits longer")


def check_resources(ray, cpus: float, gpus: float, actors: int) -> None:
    """Actors the cluster cannot place would wait for ever: say so now instead."""
    have = ray.cluster_resources()
    for name, each in (("GPU", gpus), ("CPU", cpus)):
        if each and each * actors > have.get(name, 0) + 1e-9:
            raise HashsearchError(f"{actors} actors of {each:g} {name} each need {each * actors:g} {name}s; the Ray "
                                  f"cluster has {have.get(name, 0):g}")
