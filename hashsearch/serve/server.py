"""`hashsearch serve`: load once, then answer on uvicorn until stopped."""
from __future__ import annotations

import functools
import os

from ..config import RaySearchConfig, ServeConfig
from ..errors import HashsearchError
from ..fileio import read_regular


def read_token(path) -> str:
    try:
        token = read_regular(path, 4096).decode("utf-8").strip()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise HashsearchError(f"cannot read the token file {path}: {exc}") from None
    if len(token) < 16:     # a short token can be guessed
        raise HashsearchError(f"the token in {path} is shorter than 16 characters")
    return token


def build_app(collection, config: ServeConfig, index=None):
    try:
        from .app import create_app
        from .service import SearchService
    except ImportError as exc:
        raise HashsearchError(f"serving needs the serve extra: pip install 'hashsearch[serve]' ({exc.name} is "
                              "missing)") from None
    token = read_token(config.token_file) if config.token_file else None
    service = SearchService(collection, max_upload_mb=config.max_upload_mb, index=index)
    return create_app(service, token=token)


def run_server(collection, config: ServeConfig, log=print, ray: RaySearchConfig | None = None) -> None:
    """`hashsearch serve`: until interrupted.  `ray` searches over partitions on Ray.

    With several workers (serve/workers.py), each process holds its own service (collection, index, model)
    and follows the collection's generations.  The parent builds the app once first, so that a bad
    collection, index, model or token is one line here, not a worker that dies at start."""
    import uvicorn
    from ..config import serve_workers, usable_cores
    from ..retrieval import search_index
    on_ray = ray is not None and ray.ray
    workers = serve_workers(config)
    if on_ray and config.workers not in (None, 1):
        raise HashsearchError("--ray serves from one process: its partitions already run on the cluster's workers")
    if on_ray or workers == 1:
        with search_index(collection, ray=ray) as index:
            app = build_app(collection, config, index=index)
            where = f", {ray.partitions} partitions on Ray" if on_ray else ""
            log(f"serving {collection} on http://{config.host}:{config.port}/{where}  (OpenAPI at /openapi.json)")
            uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_keep_alive=5)
        return
    from .workers import serve_in_workers
    build_app(collection, config).state.service.close()
    # Each spawned worker gets its share of the cores for BLAS, OpenMP (faiss) and torch, which read these as
    # they load.  With every core each, a query's 4096 x 256 neighbour projection took about 6 of a 9 ms
    # search by id at 1M with 2 workers (py-spy), their threads spinning against each other's; with a core
    # each, the whole request took 1 ms.
    threads = str(max(1, usable_cores() // workers))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    log(f"serving {collection} on http://{config.host}:{config.port}/ with {workers} worker processes  "
        f"(OpenAPI at /openapi.json)")
    serve_in_workers(workers, config.host, config.port, functools.partial(build_app, str(collection), config), log)


class ServerProcess:
    """`hashsearch serve ROOT` in a process of its own on 127.0.0.1 and a free port, answering /health once
    constructed; stopped (and waited for) by stop() or on leaving a `with` block.  Benchmarks and tests use it."""

    def __init__(self, root, *args, start_seconds: float = 60):
        import socket
        import subprocess
        import sys
        import tempfile
        import time
        import urllib.request
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # stderr to a file, not a pipe: a pipe nobody reads would block a long run's server once full.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "hashsearch.cli", "serve", str(root), "--port",
                                      str(self.port), *[str(a) for a in args]],
                                     stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + start_seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise HashsearchError(f"the server did not start: {self.log.read().strip()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise HashsearchError(f"the server did not answer /health within {start_seconds:.0f} s")

    def stop(self) -> None:
        import subprocess
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
