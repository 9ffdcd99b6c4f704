"""`hashsearch serve`: every endpoint, every error status and the token, through httpx against a live server."""
from __future__ import annotations

import io
import json
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import LiveServer, cli

TOKEN = "a-token-of-at-least-16-characters"
WRITABLE_UPLOAD_LIMIT_MB = 1      # small, so that an upload over it is cheap to send


@pytest.fixture(scope="module")
def paths(photo_collection):
    from hashsearch import Collection
    with Collection.open(photo_collection) as coll:
        return dict(zip(coll.ids().tolist(), coll.paths(np.arange(coll.n))))


@pytest.fixture(scope="module")
def server(photo_collection):
    with LiveServer(photo_collection) as s:
        yield s


@pytest.fixture
def writable(photo_collection, tmp_path):
    root = tmp_path / "coll"
    shutil.copytree(photo_collection, root)
    (tmp_path / "token").write_text(TOKEN + "\n")
    # Two workers whatever the machine's cores: a change made through one must show through the other.
    with LiveServer(root, "--token-file", tmp_path / "token", "--max-upload-mb", WRITABLE_UPLOAD_LIMIT_MB,
                    "--workers", 2) as s:
        s.root = root
        yield s


def png_bytes(path) -> bytes:
    return open(path, "rb").read()


def test_search_by_image_finds_the_item_itself(server, paths):
    item, path = next(iter(paths.items()))
    r = httpx.post(server.url + "/search", params={"k": 5}, files={"image": ("q.png", png_bytes(path))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == "q.png" and len(body["results"]) == 5
    first = body["results"][0]
    assert first["id"] == item and first["hamming"] == 0 and first["distance"] < 1e-3
    assert first["thumbnail"] == f"/items/{item}/thumbnail" and set(first) >= {"rank", "path", "label"}


def test_search_by_id_equals_the_cli_query(server, photo_collection):
    r = httpx.post(server.url + "/search", params={"k": 7, "mode": "bcs"}, json={"id": 4})
    assert r.status_code == 200, r.text
    cli_answer = json.loads(cli("query", photo_collection, "--id", 4, "-k", 7, "--mode", "bcs", "--json").stdout)
    expected = cli_answer["queries"][0]["results"]
    assert [h["id"] for h in r.json()["results"]] == [h["id"] for h in expected]
    assert [h["hamming"] for h in r.json()["results"]] == [h["hamming"] for h in expected]


def test_items_thumbnails_info_health(server, paths, photo_collection):
    item = next(iter(paths))
    meta = httpx.get(f"{server.url}/items/{item}").json()
    # the path relative to the source's folder: where the server keeps its files is not shown
    assert meta["id"] == item and meta["path"] == os.path.relpath(paths[item], photo_collection.parent / "photos")
    assert meta["label"].startswith("class")
    thumb = httpx.get(f"{server.url}/items/{item}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 160
    info = httpx.get(server.url + "/info").json()
    assert info["items"] == len(paths) and info["index"] == "flat"
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "generation": info["generation"],
                                                        "items": len(paths)}
    assert not any(str(v).startswith("/") for v in info.values()), info      # no absolute server path
    # no /docs: FastAPI's page loads its scripts from a CDN, and these pages fetch nothing from elsewhere
    assert httpx.get(server.url + "/docs").status_code == 404
    assert httpx.get(server.url + "/openapi.json").json()["info"]["title"] == "hashsearch"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text


@pytest.mark.parametrize("request_kw, status, needle", [
    ({"params": {"k": 0}, "json": {"id": 1}}, 400, "k must be positive"),
    ({"params": {"k": "many"}, "json": {"id": 1}}, 400, "k must be an integer"),
    ({"params": {"mode": "fast"}, "json": {"id": 1}}, 400, "mode must be one of"),
    ({"params": {"radius": 999}, "json": {"id": 1}}, 400, "radius must be an integer from 0"),
    ({"json": {"id": "one"}}, 400, "integer id"),
    ({"content": b"not json", "headers": {"content-type": "application/json"}}, 400, "send a multipart"),
    ({"json": {"id": 99999}}, 404, "not in collection"),
    ({"files": {"image": ("notes.txt", b"just some text")}}, 415, "not a usable image"),
    ({"files": {"image": ("a.png", b"x"), "other": ("b.png", b"y")}}, 415, "not a usable image"),
])
def test_bad_searches_are_json_errors_with_their_status(server, request_kw, status, needle):
    r = httpx.post(server.url + "/search", **request_kw)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_unknown_items_are_404(server):
    for path in ("/items/99999", "/items/99999/thumbnail", "/items/notanumber"):
        r = httpx.get(server.url + path)
        assert r.status_code in (404, 400) and "error" in r.json(), (path, r.text)
    assert httpx.get(server.url + "/items/99999").status_code == 404


def test_writes_need_the_token_and_are_refused_without_a_token_file(server, writable, paths):
    item, path = next(iter(paths.items()))
    assert httpx.delete(f"{server.url}/items/{item}").status_code == 403        # no --token-file: no changes
    assert httpx.post(server.url + "/items", files={"image": ("a.png", png_bytes(path))}).status_code == 403
    assert httpx.delete(f"{writable.url}/items/{item}").status_code == 401
    bad = {"Authorization": "Bearer " + "x" * len(TOKEN)}
    assert httpx.delete(f"{writable.url}/items/{item}", headers=bad).status_code == 401
    assert httpx.get(f"{writable.url}/items/{item}").status_code == 200       # nothing was deleted


def test_add_and_delete_through_the_api(writable, paths, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first = httpx.get(writable.url + "/health").json()
    images = []
    for seed in (1, 2):
        rgb = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "PNG")
        images.append(("image", (f"new{seed}.png", buffer.getvalue())))
    r = httpx.post(writable.url + "/items", files=images, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    ids, generation = r.json()["ids"], r.json()["generation"]
    assert len(ids) == 2 and ids[0] < ids[1] and min(ids) > max(paths) and generation > first["generation"]
    hit = httpx.post(writable.url + "/search", params={"k": 1}, files={"image": images[1][1]}).json()["results"][0]
    assert hit["id"] == ids[1] and hit["hamming"] == 0
    assert httpx.delete(f"{writable.url}/items/{ids[1]}", headers=auth).status_code == 200
    found = httpx.post(writable.url + "/search", params={"k": 10}, files={"image": images[1][1]}).json()
    assert ids[1] not in [h["id"] for h in found["results"]]
    for _ in range(12):         # new connections, spread over both workers: each has followed the delete
        assert httpx.get(f"{writable.url}/items/{ids[1]}").status_code == 404
        assert httpx.post(writable.url + "/search", json={"id": ids[1]}).status_code == 404
    assert httpx.delete(f"{writable.url}/items/{ids[1]}", headers=auth).status_code == 404
    not_image = httpx.post(writable.url + "/items", files={"image": ("x.png", b"nope")}, headers=auth)
    assert not_image.status_code == 415
    big = b"0" * (2 * WRITABLE_UPLOAD_LIMIT_MB << 20)
    too_big = httpx.post(writable.url + "/items", files={"image": ("big.png", big)}, headers=auth)
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]


def test_changes_from_another_process_are_picked_up_without_a_restart(writable, paths):
    item = sorted(paths)[5]
    before = httpx.get(writable.url + "/health").json()
    cli("delete", writable.root, "--id", item)
    after = httpx.get(writable.url + "/health").json()
    assert after["generation"] > before["generation"] and after["items"] == before["items"] - 1
    r = httpx.post(writable.url + "/search", params={"k": 60}, json={"id": sorted(paths)[6]})
    assert item not in [h["id"] for h in r.json()["results"]]
    assert httpx.post(writable.url + "/search", json={"id": item}).status_code == 404


def test_a_read_only_collection_is_searched_and_refuses_changes(photo_collection, tmp_path):
    root = tmp_path / "ro"
    shutil.copytree(photo_collection, root)
    (tmp_path / "token").write_text(TOKEN)
    os.system(f"mount --bind {root} {root} && mount -o remount,ro,bind {root}")     # root ignores chmod
    try:
        with LiveServer(root, "--token-file", tmp_path / "token") as s:
            assert httpx.post(s.url + "/search", json={"id": 1}).status_code == 200
            r = httpx.delete(s.url + "/items/1", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 403 and "read-only" in r.json()["error"]
    finally:
        os.system(f"umount {root}")


def test_serve_refuses_a_bad_token_file_and_a_bad_port_in_one_line(photo_collection, tmp_path):
    (tmp_path / "short").write_text("abc")
    r = cli("serve", photo_collection, "--token-file", tmp_path / "short", ok=False)
    assert "shorter than 16 characters" in r.stderr
    r = cli("serve", photo_collection, "--port", 70000, ok=False)
    assert "port must be from 1 to 65535" in r.stderr


def test_bench_serve_runs_clients_and_writes_without_errors_or_leaks(photo_collection):
    from hashsearch.bench.serve_load import run_serve_bench
    before = sorted(p.name for p in photo_collection.rglob("*"))
    r = run_serve_bench(photo_collection, clients=4, seconds=3, writes=True)
    by_id, by_image = r["search_by_id"], r["search_by_image"]
    assert by_id["count"] > 0 and by_image["count"] > 0 and by_id["p50_ms"] <= by_id["p99_ms"]
    assert by_id["per_second"] > 0 and r["model_images_per_second"] > 0
    assert r["errors"] == 0, r["first_errors"]
    assert r["deletes"] >= 1 and r["deleted_ids_returned"] == 0
    assert sorted(p.name for p in photo_collection.rglob("*")) == before        # it ran on a copy


def test_search_takes_the_neighbour_pool_from_the_query_string(server):
    """neighbour_pool=0 is the paper's pool alone; a bad value is the one-line 400 of every other parameter."""
    ok = httpx.post(server.url + "/search?k=5&neighbour_pool=0&neighbour_places=3", json={"id": 7})
    assert ok.status_code == 200 and ok.json()["results"][0]["id"] == 7
    bad = httpx.post(server.url + "/search?neighbour_pool=-1", json={"id": 7})
    assert bad.status_code == 400 and "neighbour-pool" in bad.json()["error"]
    bad = httpx.post(server.url + "/search?neighbour_places=x", json={"id": 7})
    assert bad.status_code == 400 and "neighbour_places must be an integer" in bad.json()["error"]


def test_results_are_described_without_reading_the_shards(photo_collection, monkeypatch):
    """Paths, labels and ids of results come from memory: a per-row h5py read cost more than the search."""
    import h5py
    from hashsearch.config import SearchConfig
    from hashsearch.serve.service import SearchService
    service = SearchService(photo_collection)
    try:
        service.search_id(2, SearchConfig(k=8))
        reads = []
        read = h5py.Dataset.__getitem__
        monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda ds, key: reads.append(ds.name) or read(ds, key))
        answer = service.search_id(3, SearchConfig(k=8))
        item = service.item(5)
        assert len(answer["results"]) == 8 and all(h["path"].endswith(".png") for h in answer["results"])
        assert item["path"].endswith(".png") and reads == []
    finally:
        service.close()


def test_the_service_makes_the_sketch_before_its_first_request(photo_collection, monkeypatch):
    """The first search that shortlists would project every row (0.3 s at 60,000 × 512-d): the service
    does it as it starts, not in its first request."""
    from hashsearch.config import SearchConfig
    from hashsearch.engine.sketch import Sketch
    from hashsearch.serve.service import SearchService
    service = SearchService(photo_collection)
    try:
        sketch = service.index._current().sketch
        assert sketch is not None and sketch._usable is True and sketch.parts
        monkeypatch.setattr(Sketch, "_project_missing", lambda self: pytest.fail("projected in a request"))
        assert len(service.search_id(3, SearchConfig(k=5))["results"]) == 5
    finally:
        service.close()


def test_a_search_by_id_is_answered_before_fastapis_routing(photo_collection, monkeypatch):
    """SearchById answers JSON searches in plain ASGI (FastAPI's routing took a quarter of their time), with the
    route's answers and errors; uploads and every other path still go through the router."""
    import asyncio
    from starlette.routing import Router
    from hashsearch.serve.app import create_app
    from hashsearch.serve.service import SearchService
    routed = []
    route = Router.__call__
    monkeypatch.setattr(Router, "__call__", lambda self, scope, receive, send: (
        scope["type"] == "http" and routed.append(scope["path"])) or route(self, scope, receive, send))
    service = SearchService(photo_collection)

    async def requests():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(service)), base_url="http://t") as c:
            found = await c.post("/search", params={"k": 3}, json={"id": 2})
            bad = await c.post("/search", params={"k": 0}, json={"id": 2})
            gone = await c.post("/search", json={"id": 99999})
            assert routed == []
            assert found.status_code == 200 and [h["rank"] for h in found.json()["results"]] == [1, 2, 3]
            assert found.json()["results"][0]["id"] == 2
            assert bad.status_code == 400 and "k must be positive" in bad.json()["error"]
            assert gone.status_code == 404 and "not in collection" in gone.json()["error"]
            await c.get("/health")
            await c.post("/search", files={"image": ("a.png", b"x")})
            assert routed == ["/health", "/search"]
    try:
        asyncio.run(requests())
    finally:
        service.close()


def test_thumbnails_for_idx_and_synthetic_items_and_404_for_a_gone_file(idx_collection, collection,
                                                                        photo_collection, paths):
    from hashsearch.serve.service import NotFound, SearchService
    for root, item in ((idx_collection, 7), (collection, 11)):     # FILE#7, synthetic:11
        service = SearchService(root)
        try:
            assert service.item(item)["path"] in ("train-images-idx3-ubyte.gz#7", "synthetic:11")
            image = Image.open(io.BytesIO(service.thumbnail(item)))
            assert image.format == "JPEG" and image.size[0] > 0
        finally:
            service.close()
    service = SearchService(photo_collection)
    path = paths[4]
    os.rename(path, path + ".away")         # the item's file goes; the collection still names it
    try:
        with pytest.raises(NotFound, match="no image to show: missing file"):
            service.thumbnail(4)
    finally:
        os.rename(path + ".away", path)
        service.close()


def test_a_collection_without_a_model_is_searched_by_id_and_refuses_uploads(photo_collection, tmp_path, paths):
    from hashsearch.config import SearchConfig
    from hashsearch.serve.service import NoModel, SearchService
    root = tmp_path / "coll"
    shutil.copytree(photo_collection, root)
    (root / "model.pt").unlink()
    service = SearchService(root)
    try:
        assert service.search_id(3, SearchConfig(k=4))["results"][0]["id"] == 3
        with pytest.raises(NoModel, match="no model.pt"):
            service.search_image(png_bytes(paths[3]), "q.png", SearchConfig(k=4))
    finally:
        service.close()


# -- hostile input, round 2 ----------------------------------------------------------------------
def _send_chunked(url: str, path: str, content_type: str, total: int, piece: int = 1 << 16,
                  first: bytes = b"") -> tuple[int, int]:
    """POST `first`, then `total` bytes, to `path` as a chunked body, stopping once the server answers:
    (status, bytes sent)."""
    import select
    import socket
    host, port = url.rsplit("//", 1)[1].split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        if first:
            sock.sendall(f"{len(first):x}\r\n".encode() + first + b"\r\n")
        chunk = f"{piece:x}\r\n".encode() + b"{" * piece + b"\r\n"
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += piece
        except OSError:         # the server answered and closed while we were still sending
            pass
        answer = sock.recv(4096).decode("latin-1")
    return int(answer.split()[1]), sent


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=xyz", "text/plain"])
def test_a_chunked_body_is_cut_off_at_its_limit(writable, content_type):
    # a well-formed start of a file part: the multipart parser would spool all the rest to disk
    part = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n") if content_type.startswith("multipart/") else b""
    status, sent = _send_chunked(writable.url, "/search", content_type, total=64 << 20, first=part)
    assert status == 413
    assert sent < 16 << 20          # refused long before the 64 MB were sent (the upload limit here is 1 MB)


def test_a_json_nest_too_deep_is_a_400(server):
    r = httpx.post(server.url + "/search", content=b"[" * 2000 + b"]" * 2000,      # deeper than a parser recurses
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON body" in r.json()["error"]
    r = httpx.post(server.url + "/search", content=b'{"id": 1, "pad": "' + b"x" * 10_000 + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_concurrent_deletes_of_one_id_are_one_200_and_the_rest_404(writable):
    from concurrent.futures import ThreadPoolExecutor
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda _: httpx.delete(f"{writable.url}/items/9", headers=auth, timeout=60).status_code,
                              range(10)))
    assert sorted(codes) == [200] + [404] * 9, codes


def test_deleting_the_last_item_leaves_an_empty_collection_that_is_served(writable, paths, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ids = sorted(paths)
    (tmp_path / "ids").write_text(" ".join(map(str, ids[1:])))
    cli("delete", writable.root, "--ids-file", tmp_path / "ids")
    assert httpx.delete(f"{writable.url}/items/{ids[0]}", headers=auth).status_code == 200
    health = httpx.get(writable.url + "/health")
    assert health.status_code == 200 and health.json()["items"] == 0
    found = httpx.post(writable.url + "/search", files={"image": ("q.png", png_bytes(paths[ids[0]]))})
    assert found.status_code == 200 and found.json()["results"] == []
    assert httpx.get(writable.url + "/info").json()["items"] == 0


def test_uploads_go_only_into_the_collections_own_folder_under_their_formats_extension(writable, paths, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    png = png_bytes(paths[3])
    r = httpx.post(writable.url + "/items", files={"image": ("page.html", png)}, headers=auth, timeout=120)
    assert r.status_code == 200, r.text
    assert [p.suffix for p in (writable.root / "uploads").iterdir()] == [".png"]      # not the client's .html
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(writable.root / "uploads")
    (writable.root / "uploads").symlink_to(outside)
    r = httpx.post(writable.url + "/items", files={"image": ("b.png", png_bytes(paths[4]))}, headers=auth)
    assert r.status_code == 400 and "outside the collection" in r.json()["error"]
    assert list(outside.iterdir()) == []


def test_duplicates_are_paged_and_follow_deletes(writable, paths):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    added = httpx.post(writable.url + "/items", files={"image": ("copy.png", png_bytes(paths[5]))}, headers=auth,
                       timeout=120)
    copy = added.json()["ids"][0]
    r = httpx.get(writable.url + "/duplicates", params={"limit": 100}, timeout=120)
    assert r.status_code == 200, r.text
    groups = [[item["id"] for item in g["items"]] for g in r.json()["groups"]]
    assert any(set(g) >= {5, copy} for g in groups), groups
    assert all(not os.path.isabs(item["path"]) for g in r.json()["groups"] for item in g["items"])
    page = httpx.get(writable.url + "/duplicates", params={"offset": r.json()["groups_total"], "limit": 5}).json()
    assert page["groups"] == [] and page["groups_total"] == r.json()["groups_total"]
    for bad in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}):
        assert httpx.get(writable.url + "/duplicates", params=bad).status_code == 400, bad
    assert httpx.delete(f"{writable.url}/items/{copy}", headers=auth).status_code == 200
    after = httpx.get(writable.url + "/duplicates", params={"limit": 100}, timeout=120).json()
    assert all(item["id"] != copy for g in after["groups"] for item in g["items"])
