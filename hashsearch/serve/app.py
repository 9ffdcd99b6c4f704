"""The HTTP API and the web page: FastAPI over a SearchService.  It only translates.

    POST   /search                 multipart `image`, or JSON {"id": ID}; k, mode, pool, radius as query parameters
    GET    /items/{id}             the item's metadata
    GET    /items/{id}/thumbnail   a JPEG thumbnail of its image
    POST   /items                  multipart `image` (repeatable): add; needs the bearer token
    DELETE /items/{id}             delete; needs the bearer token
    GET    /duplicates             a page of the near-duplicate groups: offset, limit (at most 100) groups
    GET    /duplicates.html        the page that reviews them, deleting items with the token
    GET    /info, /health          what `info --json` says; liveness with the generation
    GET    /openapi.json           the API's OpenAPI description
    GET    /                       the search page (static/index.html, app.js, style.css; nothing from elsewhere)

Errors are JSON {"error": "..."} with the status that says what went wrong;
bad input never gives a 500.
"""
from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import MODES, SearchConfig
from ..errors import HashsearchError
from .service import NoModel, NotAnImage, NotFound, ReadOnly, SearchService, TooLarge

STATIC = Path(__file__).with_name("static")
# A request that takes longer is answered 503: search is milliseconds, an add of a few images seconds.
REQUEST_TIMEOUT_SECONDS = 120
# Room for the multipart framing around an upload of the largest allowed size.
MULTIPART_OVERHEAD_BYTES = 1 << 16
# A body that is not an upload: {"id": 123} is a dozen bytes, so a few KB is room enough (orjson refuses a
# nest deeper than 1,024 with an error, where the standard parser would recurse).
SMALL_BODY_BYTES = 4096
# Images one POST /items may add; its body is bounded by this many of the largest allowed upload.
MAX_IMAGES_PER_ADD = 16


class FastJSON(JSONResponse):
    """JSON by orjson.  A 10-result answer took 2.8 us here, the standard encoder 35 us, and FastAPI's
    jsonable_encoder before it 287 us in all (under load from other jobs): routes return this themselves,
    so that FastAPI's encoder never walks an answer."""

    def render(self, content) -> bytes:
        return orjson.dumps(content)


def body_limit(scope, max_upload_bytes: int) -> int:
    """The most bytes a request's body may hold: an upload's size for a multipart search, MAX_IMAGES_PER_ADD
    of them for an add, SMALL_BODY_BYTES for anything else."""
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    if not content_type.startswith(b"multipart/"):
        return SMALL_BODY_BYTES
    images = MAX_IMAGES_PER_ADD if scope["path"] == "/items" else 1
    return images * max_upload_bytes + MULTIPART_OVERHEAD_BYTES


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Answers 413 to a request whose body passes its limit (body_limit), counted as it streams: a
    Content-Length is checked before a byte is read, and a chunked body is cut off at the limit, before a
    multipart parser spools it to disk or a JSON parser holds it in memory."""

    def __init__(self, app, limit_for):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(limit, scope, receive, send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        async def sending(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _BodyTooLarge:
            if not started:
                await self._refuse(limit, scope, receive, send)

    @staticmethod
    async def _refuse(limit: int, scope, receive, send):
        await FastJSON({"error": f"the request body is over its {limit}-byte limit"}, status_code=413)(
            scope, receive, send)


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def create_app(service: SearchService, *, token: str | None = None) -> FastAPI:
    """The API over `service`; changes need `token` as a bearer token, and without one they are refused."""
    # No /docs or /redoc: FastAPI builds them from a CDN's scripts, and this server's pages fetch nothing
    # from elsewhere.  The OpenAPI description itself is at /openapi.json.
    app = FastAPI(title="hashsearch", description="Image search with deep binary hash codes.",
                  version=__import__("hashsearch").__version__, default_response_class=FastJSON,
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.token = token
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    # The last added runs first: BodyLimit, then SearchById, then TimeLimit around every other route.
    app.add_middleware(TimeLimit, seconds=REQUEST_TIMEOUT_SECONDS)
    app.add_middleware(SearchById, service=service)
    app.add_middleware(BodyLimit, limit_for=lambda scope: body_limit(scope, service.max_upload_bytes))
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _status(exc: HashsearchError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, NotAnImage):
        return 415
    if isinstance(exc, ReadOnly):
        return 403
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, NoModel):
        return 409
    return 400


def error_answer(exc: HashsearchError | _Refused) -> JSONResponse:
    if isinstance(exc, _Refused):
        return FastJSON({"error": str(exc)}, status_code=exc.status)
    return FastJSON({"error": " ".join(str(exc).split())}, status_code=_status(exc))


async def _bad_input(request: Request, exc: HashsearchError) -> JSONResponse:
    return error_answer(exc)


async def _refused(request: Request, exc: _Refused) -> JSONResponse:
    return error_answer(exc)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=400)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


ERROR_HANDLERS = {HashsearchError: _bad_input, _Refused: _refused, RequestValidationError: _invalid,
                  StarletteHTTPException: _http}


class TimeLimit:
    """Answers 503 to a request not answered within `seconds`.  Plain ASGI: Starlette's BaseHTTPMiddleware
    (app.middleware("http")) costs about a third of a search's whole round trip."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, sending), self.seconds)
        except asyncio.TimeoutError:
            if not started:         # once headers are out, the client sees the connection end instead
                await FastJSON({"error": "the request took too long"}, status_code=503)(scope, receive, send)


class SearchById:
    """POST /search with a JSON body {"id": ID}, answered in plain ASGI, on the event loop.

    A search by id is a fraction of a millisecond, less than a hop to a worker thread and back (a second
    core is served by a second worker process), and FastAPI's routing, request object and route call took
    a quarter of its time in process (0.24 of 0.91 ms, CIFAR-10's 50,000 items, 512-d).  So it never enters
    FastAPI: the query string and the body are read here, by the same functions the routes use, and errors
    get the same answers.  It sits inside BodyLimit, which bounds the body, and outside TimeLimit, whose
    task per request could not stop a search that holds the loop anyway.  Uploads go on to the route.
    """

    def __init__(self, app, service: SearchService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/search" or scope["method"] != "POST" \
                or dict(scope["headers"]).get(b"content-type", b"").startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        try:
            # as Starlette reads a query string: latin-1, blanks kept, the last of a repeated name
            params = search_params(dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)))
            body = b""
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return      # the client went away
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            answer = FastJSON(with_thumbnails(self.service.search_id(item_id_of(body), params)))
        except (HashsearchError, _Refused) as exc:
            answer = error_answer(exc)
        await answer(scope, receive, send)


# The dependencies are async, though none of them waits: FastAPI would run a plain function in a worker thread.
async def _service(request: Request) -> SearchService:
    return request.app.state.service


Service = Annotated[SearchService, Depends(_service)]


async def authorised(request: Request) -> None:
    token = request.app.state.token
    if token is None:
        raise _Refused(403, "changes are disabled: start the server with --token-file to allow them")
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
        raise _Refused(401, "a valid 'Authorization: Bearer <token>' header is required")


def search_params(q: Mapping[str, str]) -> SearchConfig:
    """k, pool, radius, neighbour_pool, neighbour_cells, neighbour_places and mode from the query string's
    parameters; SearchConfig checks their ranges."""
    values = {}
    for name in ("k", "pool", "radius", "neighbour_pool", "neighbour_cells", "neighbour_places"):
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


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/")


async def read_upload(request: Request, limit: int, field: str = "image") -> list[tuple[str, bytes]]:
    """Every file in the multipart `field`, as (name, bytes); none of them over `limit` bytes (the whole body
    is bounded by BodyLimit)."""
    form = await request.form(max_files=MAX_IMAGES_PER_ADD, max_part_size=limit + 1)
    files = [f for f in form.getlist(field) if hasattr(f, "read")]
    out = []
    for f in files:
        data = await f.read(limit + 1)
        if len(data) > limit:
            raise _Refused(413, f"upload {f.filename} is over the {limit}-byte limit")
        out.append((f.filename or "upload", data))
    return out


async def read_one_image(request: Request, limit: int) -> tuple[str, bytes]:
    uploads = await read_upload(request, limit)
    if len(uploads) != 1:
        raise _Refused(400, "send exactly one image in the multipart field 'image'")
    return uploads[0]


def item_id_of(body: bytes) -> int:
    """The id of a JSON body {"id": ID}."""
    try:
        body = orjson.loads(body)     # a nest too deep is a JSONDecodeError, not a RecursionError
    except ValueError:
        raise _Refused(400, "send a multipart 'image' or a JSON body {\"id\": ID}") from None
    item = body.get("id") if isinstance(body, dict) else None
    if isinstance(item, bool) or not isinstance(item, int):
        raise _Refused(400, "the JSON body must be {\"id\": ID} with an integer id")
    return item


def with_thumbnails(answer: dict) -> dict:
    for hit in answer["results"]:
        hit["thumbnail"] = f"/items/{hit['id']}/thumbnail"
    return answer


router = APIRouter()


@router.post("/search")
async def search(request: Request):
    """Search by an uploaded image (a JSON {"id": ID} body is answered by SearchById before it gets here)."""
    service, params = request.app.state.service, search_params(request.query_params)
    name, data = await read_one_image(request, service.max_upload_bytes)
    answer = await run_in_threadpool(service.search_image, data, name, params)
    return FastJSON(with_thumbnails(answer))


@router.get("/items/{item_id}")
async def item(item_id: int, service: Service):
    return FastJSON(service.item(item_id))


@router.get("/items/{item_id}/thumbnail")
async def thumbnail(item_id: int, service: Service):
    data = await run_in_threadpool(service.thumbnail, item_id)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.post("/items", dependencies=[Depends(authorised)])
async def add(request: Request, service: Service):
    if not is_multipart(request):
        raise _Refused(400, "send the images as multipart fields named 'image'")
    return await run_in_threadpool(service.add, await read_upload(request, service.max_upload_bytes))


@router.delete("/items/{item_id}", dependencies=[Depends(authorised)])
async def delete(item_id: int, service: Service):
    return await run_in_threadpool(service.delete, item_id)


@router.get("/duplicates")
async def duplicates(service: Service, offset: int = 0, limit: int = 20):
    # Finding the groups takes seconds on a large collection (once per generation): a thread, not the loop.
    return FastJSON(await run_in_threadpool(service.duplicates, offset, limit))


@router.get("/duplicates.html", include_in_schema=False)
async def duplicates_page():
    return FileResponse(STATIC / "duplicates.html", media_type="text/html")


@router.get("/info")
async def info(service: Service):
    return await run_in_threadpool(service.info)


@router.get("/health")
async def health(service: Service):
    return FastJSON(service.health())


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html")
