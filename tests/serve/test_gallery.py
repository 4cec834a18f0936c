"""The gallery page at ``/``, rendered in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from conftest import HM_ROOT, TINY_TRAIN, compose_cfg, index_spec, needs_hm

from .conftest import Server

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
    from towerrec.retrieval import export_index
    from towerrec.train import train

    root = tmp_path_factory.mktemp("hm")
    tiny = [o for o in TINY_TRAIN if not o.startswith("model.item_tower.image_encoder")]
    cfg = compose_cfg(
        "train",
        ["experiment=hm_fusion", f"data.root={HM_ROOT}", f"data.processed_dir={root / 'processed'}",
         "data.image_size=16", *tiny, "+trainer.limit_test_batches=2"],
        root / "run",
    )  # fmt: skip
    ckpt = train(cfg)["best_checkpoint"]
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
