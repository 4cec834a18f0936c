"""The gallery page at ``/``, rendered in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import HM_ROOT, TINY_TRAIN, compose_cfg, index_spec, needs_hm
from PIL import Image

from .conftest import Server, terminate

BROWSER = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)
needs_browser = pytest.mark.skipif(
    BROWSER is None, reason="no headless browser (apt-get install chromium; .ci/run installs it)"
)
# As root in a sandbox with no network: no sandbox, no GPU, no background connections.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000", "--window-size=1200,1000",
]  # fmt: skip


def browse(url: str, *args: str) -> str:
    """The browser's stdout after the page's scripts ran: the rendered DOM, unless ``args`` say otherwise."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [BROWSER, *FLAGS, f"--user-data-dir={profile}", *(args or ["--dump-dom"]), url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


class Page(HTMLParser):
    """What the gallery rendered: the query item, the result cards, texts by their element's id or class."""

    VOID = {"img", "input", "meta", "br", "link", "hr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.state, self.query_id, self.cards, self.texts = None, None, [], {}
        self._stack: list[str] = []
        self._card_depth: int | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class") or ""
        if tag == "body":
            self.state = a.get("data-state")
        if tag == "div" and cls == "query":
            self.query_id = a.get("data-item-id")
        if tag in self.VOID:
            return
        self._stack.append(a.get("id") or cls or tag)
        if tag == "div" and "result" in cls.split():
            self.cards.append({"item_id": a.get("data-item-id"), "text": []})
            self._card_depth = len(self._stack)

    def handle_endtag(self, tag):
        if tag in self.VOID or not self._stack:
            return
        if self._card_depth is not None and len(self._stack) == self._card_depth:
            self._card_depth = None
        self._stack.pop()

    def handle_data(self, data):
        if not data.strip() or not self._stack or self._stack[-1] in ("script", "style"):
            return
        self.texts.setdefault(self._stack[-1], []).append(data.strip())
        if self._card_depth is not None:
            self.cards[-1]["text"].append(data.strip())


def check_item_page(url: str, item_id: str, tmp_path: Path) -> Page:
    """Load the gallery for ``item_id``; its cards must be the API's similar items, with scores."""
    api = httpx.get(f"{url}/v1/items/{item_id}/similar", params={"k": 12}).json()
    meta = httpx.get(f"{url}/v1/items/{item_id}").json()
    page = Page(browse(f"{url}/?item={item_id}"))
    assert page.state == "item", page.texts.get("error")
    assert page.query_id == item_id
    assert meta["title"] in page.texts["title"]
    flag = page.texts["cold" if meta["is_cold"] else "warm"][0]
    assert flag.startswith("cold" if meta["is_cold"] else "warm")
    assert [c["item_id"] for c in page.cards] == [h["item_id"] for h in api["results"]]
    for card, hit in zip(page.cards, api["results"], strict=True):
        assert f"{hit['score']:.4f}" in card["text"] and hit["title"] in card["text"]
        assert ("cold" in card["text"]) == hit["is_cold"]
    shot = tmp_path / "gallery.png"
    browse(f"{url}/?item={item_id}", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return page


@needs_browser
def test_gallery_shows_an_item_and_its_similar_items(server, tmp_path):
    item_id = httpx.get(f"{server.url}/v1/export").json()["example_item_ids"][2]
    check_item_page(server.url, item_id, tmp_path)


@needs_browser
@pytest.mark.slow
def test_gallery_recommend_box(server):
    ids = httpx.get(f"{server.url}/v1/export").json()["example_item_ids"][:2]
    api = httpx.post(f"{server.url}/v1/recommend", json={"history": ids, "k": 12}, timeout=60).json()
    page = Page(browse(f"{server.url}/?history={','.join(ids)}"))
    assert page.state == "recommend", page.texts.get("error")
    assert [c["item_id"] for c in page.cards] == [h["item_id"] for h in api["results"]]
    assert all(
        f"because {h['because']}" in c["text"] for c, h in zip(page.cards, api["results"], strict=True)
    )


@needs_browser
def test_gallery_reports_an_unknown_item(server):
    page = Page(browse(f"{server.url}/?item=NO_SUCH_ITEM"))
    assert page.state == "error" and "404: unknown item id(s): NO_SUCH_ITEM" in page.texts["error"]


@pytest.fixture(scope="module")
def hm_export(tmp_path_factory) -> Path:
    """A two-batch ``hm_fusion`` model on the real H&M sample (16 px images), exported flat."""
    from towerrec.commands.train import train
    from towerrec.retrieval.writer import export_index

    root = tmp_path_factory.mktemp("hm")
    tiny = [o for o in TINY_TRAIN if not o.startswith("model.item_tower.image_encoder")]
    cfg = compose_cfg(
        "train",
        ["experiment=hm_fusion", f"data.root={HM_ROOT}", f"data.processed_dir={root / 'processed'}",
         "data.image_size=16", *tiny, "+trainer.limit_test_batches=2"],
        root / "run",
    )  # fmt: skip
    ckpt = train(cfg).run["best_checkpoint"]
    return export_index(ckpt, index_spec("flat"), root / "export", n_queries=50)


@needs_browser
@needs_hm
@pytest.mark.hm
@pytest.mark.slow
def test_gallery_on_an_hm_item(hm_export, tmp_path):
    from towerrec.retrieval import load_export

    items = load_export(hm_export).items
    # A never-bought article with a product photo and a real name: the cold-start case of a product page.
    cold = items[items["is_cold"] & items["image_path"].notna() & (items["title"] != items["item_id"])]
    item_id = cold["item_id"].iloc[0]
    server = Server(hm_export, log=tmp_path / "server.log")
    try:
        server.wait_ready()
        image = httpx.get(f"{server.url}/v1/items/{item_id}/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert image.content == Path(cold["image_path"].iloc[0]).read_bytes()  # the article's own photo
        check_item_page(server.url, item_id, tmp_path)
    finally:
        server.stop()


class Chromium:
    """Headless Chromium driven over the DevTools protocol: type into inputs, click, take screenshots.

    Real input events (``Input.insertText``, mouse press and release at the element's centre), so the
    page's own form handlers run, as they do for a person.
    """

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        flags = [f for f in FLAGS if not f.startswith("--virtual-time-budget")]
        self.proc = subprocess.Popen(
            [BROWSER, *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "chromium did not start"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._ids = itertools.count(1)

    def call(self, method: str, **params):
        n = next(self._ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == n:
                assert "error" not in msg, msg
                return msg["result"]

    def eval(self, expression: str):
        got = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in got, got
        return got["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.eval(expression)):
            if time.monotonic() > deadline:
                seen = self.eval("JSON.stringify({state: document.body.dataset.state, item: document.getElementById('item-id').value, "
                                 "history: document.getElementById('history').value, active: document.activeElement.id, "
                                 "error: document.getElementById('error').textContent})")  # fmt: skip
                pytest.fail(f"timed out waiting for {expression}; the page: {seen}")
            time.sleep(0.2)
        return value

    def rect(self, selector: str) -> dict:
        return self.eval(f"(r => ({{x: r.x, y: r.y, w: r.width, h: r.height}}))"
                         f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")  # fmt: skip

    def click(self, selector: str) -> None:
        r = self.rect(selector)
        x, y = r["x"] + r["w"] / 2, r["y"] + r["h"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)  # focus, as a person does
        self.eval("document.activeElement.select()")  # select what the field holds: typing replaces it
        self.call("Input.insertText", text=text)

    def goto(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def screenshot(self) -> np.ndarray:
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def close(self) -> None:
        self.ws.close()
        terminate(self.proc)


@pytest.fixture
def chromium(tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        browser.call("Emulation.setDeviceMetricsOverride", width=1200, height=2400, deviceScaleFactor=1, mobile=False)
        yield browser
    finally:
        browser.close()


def _crop(shot: np.ndarray, r: dict) -> np.ndarray:
    return shot[int(r["y"]) + 1 : int(r["y"] + r["h"]) - 1, int(r["x"]) + 1 : int(r["x"] + r["w"]) - 1]


def check_cards_drawn(browser: Chromium, n: int) -> None:
    """The screenshot shows ``n`` result cards: each card's box holds its picture and dark text."""
    browser.wait_for("[...document.images].every(i => i.complete)")
    shot = browser.screenshot()
    boxes = browser.eval("[...document.querySelectorAll('#results .result')].map(e => "
                         "(r => ({x: r.x, y: r.y, w: r.width, h: r.height}))(e.getBoundingClientRect()))")  # fmt: skip
    assert len(boxes) == n
    for box in boxes:
        card = _crop(shot, box)
        assert card.size and (card.sum(axis=2) < 200).mean() > 0.001  # text: near-black pixels
        assert len(np.unique(card.reshape(-1, 3), axis=0)) > 50  # a picture, not a flat box
    images = browser.eval("[...document.querySelectorAll('#results .result img')].map(e => "
                          "(r => ({x: r.x, y: r.y, w: r.width, h: r.height}))(e.getBoundingClientRect()))")  # fmt: skip
    assert images, "no product images drawn"
    for box in images:
        assert _crop(shot, box).std() > 5  # the product photo, not the grey placeholder


@needs_browser
@pytest.mark.slow
def test_gallery_forms_typed_and_clicked_show_result_cards(server, chromium):
    ids = httpx.get(f"{server.url}/v1/export").json()["example_item_ids"]
    chromium.goto(f"{server.url}/")
    chromium.wait_for("document.body.dataset.state === 'item'")  # the page opens on the first example
    assert chromium.eval("document.querySelector('.query').dataset.itemId") == ids[0]
    # The item form: type another id, click "Show similar".
    chromium.type("#item-id", ids[2])
    chromium.click("#item-form button")
    chromium.wait_for(f"document.querySelector('.query').dataset.itemId === {json.dumps(ids[2])}")
    api = httpx.get(f"{server.url}/v1/items/{ids[2]}/similar", params={"k": 12}).json()["results"]
    shown = chromium.eval("[...document.querySelectorAll('#results .result')].map(e => e.dataset.itemId)")
    assert shown == [h["item_id"] for h in api]
    check_cards_drawn(chromium, len(api))
    # The recommend form: type a history, click "Recommend".
    chromium.type("#history", f"{ids[0]},{ids[1]}")
    chromium.click("#rec-form button")
    chromium.wait_for("document.body.dataset.state === 'recommend'")
    api = httpx.post(f"{server.url}/v1/recommend", json={"history": ids[:2], "k": 12}, timeout=60).json()["results"]
    shown = chromium.eval("[...document.querySelectorAll('#results .result')].map(e => e.dataset.itemId)")
    assert shown == [h["item_id"] for h in api]
    check_cards_drawn(chromium, len(api))
