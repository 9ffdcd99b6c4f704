"""The HTTP API and the web page: FastAPI over a SearchService.  It only translates.

    POST   /search                 multipart `image`, or JSON {"id": ID}; k, mode, pool, radius as query parameters
    GET    /items/{id}             the item's metadata
    GET    /items/{id}/thumbnail   a JPEG thumbnail of its image
    POST   /items                  multipart `image` (repeatable): add; needs the bearer token
    DELETE /items/{id}             delete; needs the bearer token
    GET    /info, /health          what `info --json` says; liveness with the generation
    GET    /                       the search page (static/index.html, app.js, style.css; nothing from elsewhere)

Errors are JSON {"error": "..."} with the status that says what went wrong;
bad input never gives a 500.
"""
from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import MODES, SearchConfig
from ..errors import HashsearchError
from .service import NotAnImage, NotFound, ReadOnly, SearchService, TooLarge

STATIC = Path(__file__).with_name("static")
# A request that takes longer is answered 503: search is milliseconds, an add of a few images seconds.
REQUEST_TIMEOUT_SECONDS = 120


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _status(exc: HashsearchError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, NotAnImage):
        return 415
    if isinstance(exc, ReadOnly):
        return 403
    if isinstance(exc, TooLarge):
        return 413
    return 400


def create_app(service: SearchService, *, token: str | None = None) -> FastAPI:
    app = FastAPI(title="hashsearch", description="Image search with deep binary hash codes.",
                  version=__import__("hashsearch").__version__)

    @app.exception_handler(HashsearchError)
    async def _bad_input(request: Request, exc: HashsearchError):
        return JSONResponse({"error": " ".join(str(exc).split())}, status_code=_status(exc))

    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.middleware("http")
    async def _timeout(request: Request, call_next):
        try:
            return await asyncio.wait_for(call_next(request), REQUEST_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            return JSONResponse({"error": "the request took too long"}, status_code=503)

    def search_params(request: Request) -> SearchConfig:
        q = request.query_params
        values = {}
        for name in ("k", "pool", "radius"):
            if q.get(name) not in (None, ""):
                try:
                    values[name] = int(q[name])
                except ValueError:
                    raise _Refused(400, f"{name} must be an integer, got {q[name]!r}") from None
        if q.get("mode"):
            if q["mode"] not in MODES:
                raise _Refused(400, f"mode must be one of {', '.join(MODES)}, got {q['mode']!r}")
            values["mode"] = q["mode"]
        return SearchConfig(**values)

    def with_thumbnails(answer: dict) -> dict:
        for hit in answer["results"]:
            hit["thumbnail"] = f"/items/{hit['id']}/thumbnail"
        return answer

    async def read_upload(request: Request, field: str = "image") -> list[tuple[str, bytes]]:
        limit = service.max_upload_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit + (1 << 16):
            raise _Refused(413, f"the upload is over the {limit}-byte limit")
        form = await request.form(max_part_size=limit + 1)
        files = [f for f in form.getlist(field) if hasattr(f, "read")]
        out = []
        for f in files:
            data = await f.read(limit + 1)
            if len(data) > limit:
                raise _Refused(413, f"upload {f.filename} is over the {limit}-byte limit")
            out.append((f.filename or "upload", data))
        return out

    def authorised(request: Request) -> None:
        if token is None:
            raise _Refused(403, "changes are disabled: start the server with --token-file to allow them")
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
            raise _Refused(401, "a valid 'Authorization: Bearer <token>' header is required")

    @app.post("/search")
    async def search(request: Request):
        params = search_params(request)
        if request.headers.get("content-type", "").startswith("multipart/"):
            uploads = await read_upload(request)
            if len(uploads) != 1:
                raise _Refused(400, "send exactly one image in the multipart field 'image'")
            name, data = uploads[0]
            answer = await run_in_threadpool(service.search_image, data, name, params)
        else:
            try:
                body = await request.json()
            except ValueError:
                raise _Refused(400, "send a multipart 'image' or a JSON body {\"id\": ID}") from None
            item = body.get("id") if isinstance(body, dict) else None
            if isinstance(item, bool) or not isinstance(item, int):
                raise _Refused(400, "the JSON body must be {\"id\": ID} with an integer id")
            answer = await run_in_threadpool(service.search_id, item, params)
        return with_thumbnails(answer)

    @app.get("/items/{item_id}")
    async def item(item_id: int):
        return await run_in_threadpool(service.item, item_id)

    @app.get("/items/{item_id}/thumbnail")
    async def thumbnail(item_id: int):
        data = await run_in_threadpool(service.thumbnail, item_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/items")
    async def add(request: Request):
        authorised(request)
        if not request.headers.get("content-type", "").startswith("multipart/"):
            raise _Refused(400, "send the images as multipart fields named 'image'")
        return await run_in_threadpool(service.add, await read_upload(request))

    @app.delete("/items/{item_id}")
    async def delete(item_id: int, request: Request):
        authorised(request)
        return await run_in_threadpool(service.delete, item_id)

    @app.get("/info")
    async def info():
        return await run_in_threadpool(service.info)

    @app.get("/health")
    async def health():
        return await run_in_threadpool(service.health)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
