"""`hashsearch serve`: load once, then answer on uvicorn until stopped."""
from __future__ import annotations

from ..config import ServeConfig
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


def build_app(collection, config: ServeConfig):
    try:
        from .app import create_app
        from .service import SearchService
    except ImportError as exc:
        raise HashsearchError(f"serving needs the serve extra: pip install 'hashsearch[serve]' ({exc.name} is "
                              "missing)") from None
    token = read_token(config.token_file) if config.token_file else None
    service = SearchService(collection, max_upload_bytes=int(config.max_upload_mb * (1 << 20)))
    return create_app(service, token=token)


def run_server(collection, config: ServeConfig, log=print) -> None:
    import uvicorn
    app = build_app(collection, config)
    log(f"serving {collection} on http://{config.host}:{config.port}/  (API docs at /docs)")
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_keep_alive=5)
