"""The search page in a real browser: Debian's chromium, driven by Playwright, against `hashsearch serve`.

No browser is downloaded: `make test` installs /usr/bin/chromium (`make browser`), and its absence
fails these tests rather than skipping them.  A failing test leaves a screenshot of the page and
prints where.  HASHSEARCH_DOCS_SCREENSHOT=1 rewrites docs/serve-page.png, the README's picture.
"""
from __future__ import annotations

import base64
import json
import os
import re
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import LiveServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_MS = 5_000          # each click, wait and expectation
PAGE_LOAD_MS = 10_000    # a navigation
VIEWPORT = {"width": 1000, "height": 700}
K = 12
REPO = Path(__file__).resolve().parents[1]
DOCS_SHOT = REPO / "docs" / "serve-page.png"


def _missing_chromium() -> str:
    return (f"{CHROMIUM} is missing: the browser tests drive Debian's chromium. Install it with "
            "`make browser` (apt-get install chromium); `make test` does that first.")


def test_chromium_is_installed():
    if not Path(CHROMIUM).exists():
        pytest.fail(_missing_chromium(), pytrace=False)


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(photo_collection):
    """`hashsearch serve` over the photo collection, checked to serve this checkout's page."""
    import hashsearch
    with LiveServer(photo_collection) as live:
        static = Path(hashsearch.__file__).parent / "serve" / "static"
        for name in ("app.js", "style.css"):
            with urllib.request.urlopen(f"{live.url}/static/{name}", timeout=5) as r:
                assert r.read() == (static / name).read_bytes(), (
                    f"the server serves another checkout's {name}: run it with PYTHONPATH={REPO}")
        yield live


@pytest.fixture(scope="module")
def items(photo_collection) -> dict[int, str]:
    """id -> image path of every item of the photo collection."""
    from hashsearch.shards import Collection
    import numpy as np
    with Collection.open(photo_collection) as coll:
        return dict(zip(coll.ids().tolist(), coll.paths(np.arange(coll.n))))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(_missing_chromium(), pytrace=False)
    from playwright.sync_api import expect, sync_playwright
    expect.set_options(timeout=STEP_MS)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000)
        yield b
        b.close()


@pytest.fixture
def page(browser, request, tmp_path):
    """A fresh page; when the test fails, a screenshot of it is saved and its path printed."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(STEP_MS)
    context.set_default_navigation_timeout(PAGE_LOAD_MS)
    pg = context.new_page()
    console: list[str] = []
    pg.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: console.append(f"page error: {e}"))
    failed_before = request.session.testsfailed
    yield pg
    if request.session.testsfailed > failed_before:     # the call phase of this test failed
        shot = tmp_path / f"{request.node.name}.png"
        try:
            pg.screenshot(path=str(shot), timeout=STEP_MS)
            print(f"screenshot of the failed page: {shot}")
        except Exception as exc:  # noqa: BLE001 - the test's own failure is the one to report
            print(f"no screenshot: {exc}")
        print("browser console:", *console, sep="\n  ")
    context.close()


# -- helpers ---------------------------------------------------------------------------------
def api_search(server, item_id: int, k: int, mode: str) -> dict:
    req = urllib.request.Request(f"{server.url}/search?k={k}&mode={mode}", method="POST",
                                 data=json.dumps({"id": item_id}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def card_ids(page) -> list[int]:
    return [int(i) for i in page.locator("figure.hit").evaluate_all("cards => cards.map(c => c.dataset.id)")]


def wait_for_results(page, first_id: int, k: int = K) -> list[int]:
    """Wait until the grid shows k cards led by `first_id`, with every thumbnail loaded; their ids."""
    from playwright.sync_api import expect
    cards = page.locator("figure.hit")
    expect(cards).to_have_count(k)
    expect(cards.first).to_have_attribute("data-id", str(first_id))
    page.wait_for_function("() => [...document.querySelectorAll('figure.hit img')]"
                           ".every(img => img.complete && img.naturalWidth > 0)")
    expect(page.locator("#error")).to_be_hidden()
    return card_ids(page)


def assert_exact_match_first(page, item_id: int) -> None:
    """The first card is the query's own image: Hamming 0, L2 about 0."""
    caption = page.locator("figure.hit").first.locator("figcaption").inner_text()
    m = re.search(r"#(\d+)\s+Hamming (\d+) · L2 ([0-9.]+)$", caption)
    assert m, caption
    assert (int(m[1]), int(m[2])) == (item_id, 0), caption
    assert float(m[3]) < 1e-2, caption


def open_page(page, server, query: str = f"?k={K}") -> None:
    page.goto(f"{server.url}/{query}")
    page.wait_for_load_state("load")


# -- the tests -------------------------------------------------------------------------------
def test_search_by_choosing_a_file(page, server, items):
    item_id = sorted(items)[7]
    open_page(page, server)
    page.set_input_files("#file", items[item_id])
    ids = wait_for_results(page, item_id)
    assert_exact_match_first(page, item_id)
    assert len(set(ids)) == K
    assert page.locator("#preview").is_visible()
    assert re.search(rf"{K} results", page.locator("#status").inner_text())
    # the README's picture of the page, with these real results
    shot = page.screenshot(type="png")
    if os.environ.get("HASHSEARCH_DOCS_SCREENSHOT"):
        import io
        image = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=64)
        image.save(DOCS_SHOT, optimize=True)
        print(f"saved {DOCS_SHOT}")


def test_search_by_pasting_an_image(page, server, items):
    item_id = sorted(items)[21]
    data = base64.b64encode(Path(items[item_id]).read_bytes()).decode()
    open_page(page, server)
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "clipboard.png", { type: "image/png" }));
        document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
    }""", data)
    wait_for_results(page, item_id)
    assert_exact_match_first(page, item_id)


def test_clicking_a_card_searches_by_it(page, server, items):
    start = sorted(items)[3]
    open_page(page, server, f"?id={start}&k={K}")
    ids = wait_for_results(page, start)
    target = ids[2]
    page.locator(f"figure.hit[data-id='{target}']").click()
    page.wait_for_url(re.compile(rf"[?&]id={target}(&|$)"))
    after = wait_for_results(page, target)
    assert_exact_match_first(page, target)
    assert after == [h["id"] for h in api_search(server, target, K, "hds")["results"]]


def test_shared_url_gives_the_api_results(page, server, items):
    item_id = sorted(items)[40]
    api = api_search(server, item_id, 5, "bcs")["results"]
    expected = [h["id"] for h in api]       # bcs ranks by Hamming alone: the item may tie with others
    assert len(expected) == 5 and api[0]["hamming"] == 0
    open_page(page, server, f"?id={item_id}&k=5&mode=bcs")
    assert wait_for_results(page, expected[0], k=5) == expected
    assert page.locator("figure.hit").first.locator("figcaption").inner_text().endswith("\nHamming 0")
    assert page.locator("#k").input_value() == "5"
    assert page.locator("#mode").input_value() == "bcs"
    assert page.locator("#preview").is_visible()


def test_back_returns_to_the_previous_results(page, server, items):
    from playwright.sync_api import expect
    first, uploaded = sorted(items)[10], sorted(items)[30]
    open_page(page, server, f"?id={first}&k={K}")
    by_id = wait_for_results(page, first)

    page.set_input_files("#file", items[uploaded])      # a search by image is a step of its own
    by_image = wait_for_results(page, uploaded)
    expect(page).not_to_have_url(re.compile(r"[?&]id="))

    clicked = by_image[1]
    page.locator(f"figure.hit[data-id='{clicked}']").click()
    page.wait_for_url(re.compile(rf"[?&]id={clicked}(&|$)"))
    by_click = wait_for_results(page, clicked)
    assert by_click != by_image

    page.go_back()
    assert wait_for_results(page, uploaded) == by_image
    expect(page).not_to_have_url(re.compile(r"[?&]id="))
    page.go_back()
    page.wait_for_url(re.compile(rf"[?&]id={first}(&|$)"))
    assert wait_for_results(page, first) == by_id
    page.go_forward()
    assert wait_for_results(page, uploaded) == by_image


def test_a_file_that_is_not_an_image_shows_an_error(page, server, items, tmp_path):
    from playwright.sync_api import expect
    item_id = sorted(items)[5]
    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not a picture\n")
    open_page(page, server, f"?id={item_id}&k={K}")
    wait_for_results(page, item_id)

    page.set_input_files("#file", str(notes))
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("notes.txt is not a usable image")
    text = error.inner_text()
    assert not re.search(r"[{}\[\]]|Traceback|undefined|null|object Object", text), text
    expect(page.locator("figure.hit")).to_have_count(0)
    expect(page.locator("#preview")).to_be_hidden()


def test_changing_k_and_mode_searches_again(page, server, items):
    from playwright.sync_api import expect
    item_id = sorted(items)[12]
    open_page(page, server, f"?id={item_id}&k={K}")
    wait_for_results(page, item_id)
    page.fill("#k", "3")
    page.press("#k", "Enter")          # must not submit the form and reload a blank page
    page.wait_for_url(re.compile(rf"[?&]id={item_id}&k=3&mode=hds$"))
    assert wait_for_results(page, item_id, k=3) == [h["id"] for h in api_search(server, item_id, 3, "hds")["results"]]
    page.select_option("#mode", "bcs")
    page.wait_for_url(re.compile(r"[?&]k=3&mode=bcs$"))
    expected = [h["id"] for h in api_search(server, item_id, 3, "bcs")["results"]]
    assert wait_for_results(page, expected[0], k=3) == expected
    expect(page.locator("#k")).to_have_value("3")


def test_an_idx_collection_shows_its_thumbnails(page, idx_collection):
    """Items stored as IDX members (FILE#i, as Fashion-MNIST's are) have thumbnails: every card's image loads."""
    with LiveServer(idx_collection) as live:
        open_page(page, live, "?id=6&k=8")
        wait_for_results(page, 6, k=8)          # waits for every thumbnail to load with pixels
        assert page.locator("figure.hit .placeholder").count() == 0


def test_an_item_whose_file_is_gone_shows_a_placeholder(page, photo_collection, items):
    from playwright.sync_api import expect
    item_id = sorted(items)[15]
    with LiveServer(photo_collection) as server:         # its own: no thumbnail cached by another test
        expected = [h["id"] for h in api_search(server, item_id, 6, "hds")["results"]]
        gone = expected[2]
        os.rename(items[gone], items[gone] + ".away")
        try:
            open_page(page, server, f"?id={item_id}&k=6")
            expect(page.locator("figure.hit")).to_have_count(6)
            expect(page.locator(f"figure.hit[data-id='{gone}'] .placeholder")).to_have_text("no image")
            assert page.locator("figure.hit .placeholder").count() == 1 and card_ids(page) == expected
        finally:
            os.rename(items[gone] + ".away", items[gone])


def test_the_duplicates_page_shows_groups_with_their_thumbnails(page, photo_collection, items, tmp_path):
    import shutil
    from playwright.sync_api import expect
    from conftest import cli
    root = tmp_path / "coll"
    shutil.copytree(photo_collection, root)
    (tmp_path / "copies").mkdir()
    shutil.copy(items[sorted(items)[5]], tmp_path / "copies" / "copy.png")     # the same image again
    cli("add", root, tmp_path / "copies", "--workers", 0, "--quiet")
    with LiveServer(root) as server:
        with urllib.request.urlopen(f"{server.url}/duplicates?limit=100", timeout=60) as r:
            groups = json.load(r)["groups"]
        page.goto(f"{server.url}/duplicates.html")
        expect(page.locator("section.group")).to_have_count(min(len(groups), 10))
        first = page.locator("section.group").first
        expect(first.locator("figure.hit")).to_have_count(len(groups[0]["items"]))
        expect(first.locator("figure.hit.centre")).to_have_count(1)
        page.wait_for_function("() => [...document.querySelectorAll('figure.hit img')]"
                               ".every(img => img.complete && img.naturalWidth > 0)")
        assert any(sorted(items)[5] in [i["id"] for i in g["items"]] for g in groups)
