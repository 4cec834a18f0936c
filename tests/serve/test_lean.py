"""The lean similar-items route answers exactly as the FastAPI route it stands in front of."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
from fastapi.testclient import TestClient
from starlette.routing import Match

from towerrec.retrieval import load_export
from towerrec.serve.app import create_app
from towerrec.serve.lean import PARAMS_KEY, LeanSimilar
from towerrec.serve.options import ServeSettings

# (query string, the lean route takes it). Everything it does not take, the FastAPI route answers.
QUERIES = [
    ("", True),
    ("k=3", True),
    ("k=50", True),
    ("k=51", True),  # valid for the schema, over this server's --max-k: the lean route answers the 422
    ("k=3&exclude={b}", True),
    ("k=3&exclude={b},{c}", True),
    ("exclude={b}&exclude={c}&k=4", True),
    ("exclude=%20{b}%20,,", True),
    ("exclude=GONE1,{b}", True),  # 404 naming the unknown id
    ("k=0", False),
    ("k=ten", False),
    ("k=", False),
    ("k=1001", False),
    ("k=3&k=4", False),
    ("colour=red", False),
    ("k=3&colour=red&exclude={b}", False),
]


@pytest.fixture(scope="module")
def apps(serve_exports):
    """A client of the app as served, and one of the same app without the lean route."""
    settings = ServeSettings(export=str(serve_exports["served"]), max_k=50, max_items=20)
    index = load_export(serve_exports["served"])
    lean, plain = create_app(settings, index), create_app(settings, index)
    plain.router.routes[:] = [r for r in plain.router.routes if not isinstance(r, LeanSimilar)]
    assert any(isinstance(r, LeanSimilar) for r in lean.router.routes)
    # Not entered: the lifespan (a SIGHUP handler) needs the main thread, and no endpoint here needs it.
    return TestClient(lean), TestClient(plain), index


def fill(query: str, index) -> str:
    a, b, c = index.items["item_id"].astype(str).head(3)
    return query.format(a=a, b=b, c=c)


@pytest.mark.parametrize(("query", "taken"), QUERIES)
def test_lean_route_answers_as_the_fastapi_route(apps, query, taken):
    lean, plain, index = apps
    item = index.items["item_id"].astype(str).iloc[0]
    path = f"/v1/items/{item}/similar?{fill(query, index)}"
    got, want = lean.get(path), plain.get(path)
    assert (got.status_code, got.headers["content-type"], got.content) == (
        want.status_code,
        want.headers["content-type"],
        want.content,
    )
    scope = {
        "type": "http",
        "method": "GET",
        "path": path.partition("?")[0],
        "query_string": path.partition("?")[2].encode(),
    }
    route = next(r for r in lean.app.router.routes if isinstance(r, LeanSimilar))
    match, child = route.matches(scope)
    assert (match is Match.FULL) == taken
    if taken:
        assert child[PARAMS_KEY].k == int(parse_qs(query).get("k", ["10"])[0])


def test_lean_route_leaves_other_methods_and_unknown_items_alike(apps):
    lean, plain, index = apps
    item = index.items["item_id"].astype(str).iloc[0]
    for method, path in [
        ("HEAD", f"/v1/items/{item}/similar"),
        ("POST", f"/v1/items/{item}/similar"),
        ("GET", "/v1/items/NOT-AN-ITEM/similar?k=3"),
        ("GET", f"/v1/items/{item}/similar/extra"),
    ]:
        got, want = lean.request(method, path), plain.request(method, path)
        assert (got.status_code, got.content) == (want.status_code, want.content), (method, path)
    assert lean.get("/v1/items/NOT-AN-ITEM/similar?k=3").status_code == 404
