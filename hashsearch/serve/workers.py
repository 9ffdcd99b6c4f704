"""Several processes answering on one port, each with a listening socket of its own (SO_REUSEPORT).

Why not uvicorn's own workers: they share one listening socket, and a client's keep-alive connections go
to whichever process accepts first.  Under a load generator's 32 connections one worker often got all of
them and the other none: 980 searches a second against 1,840 when they happened to split (wrk, 2 cores,
measured).  With a socket each, the kernel spreads new connections over the processes by their address.

Each worker loads the collection, its index and the model itself (they are spawned, not forked: torch's
and faiss's threads do not survive a fork), follows the generations on its own, and stops with the parent.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket

from ..errors import HashsearchError

# Connections waiting to be accepted, per worker: room for bursts of new clients.
LISTEN_BACKLOG = 2048


def listening_socket(host: str, port: int, *, shared: bool) -> socket.socket:
    """A TCP socket listening on host:port; with `shared`, one of several on that port (SO_REUSEPORT)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HashsearchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise HashsearchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve_in_workers(workers: int, host: str, port: int, make_app, log=print) -> None:
    """Run `workers` processes, each serving make_app() (a picklable function) on host:port, until this
    process is interrupted or terminated, or a worker stops; then stop them all."""
    # The port must be free of anyone else's listener: a probe without SO_REUSEPORT fails if one is there.
    listening_socket(host, port, shared=False).close()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(make_app, host, port), name=f"hashsearch-worker-{i}")
             for i in range(workers)]
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for proc in procs:
            proc.start()
        multiprocessing.connection.wait([p.sentinel for p in procs])     # until one stops
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if not stopping:
        codes = sorted({p.exitcode for p in procs if p.exitcode})
        if codes:
            raise HashsearchError(f"a worker process stopped (exit code {codes[0]}); the server stopped with it")


def _worker(make_app, host: str, port: int) -> None:
    import uvicorn
    _stop_with_parent()
    app = make_app()
    sock = listening_socket(host, port, shared=True)
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[sock])


def _stop_with_parent() -> None:
    # A parent killed outright (kill -9) cannot stop its workers: the kernel sends them SIGTERM instead.
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:       # the parent died before the line above
        os._exit(1)
