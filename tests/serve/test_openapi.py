"""The published OpenAPI schema states the limits the server enforces and every status it answers."""

from __future__ import annotations

import httpx
import pytest

from .conftest import TOKEN


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def schema(api) -> dict:
    return api.get("/openapi.json").json()


def _codes(schema: dict, method: str, path: str) -> set[int]:
    return {int(c) for c in schema["paths"][path][method.lower()]["responses"]}


def _component(schema: dict, ref_holder: dict) -> dict:
    return schema["components"]["schemas"][ref_holder["$ref"].rsplit("/", 1)[-1]]


def _body_schema(schema: dict, path: str) -> dict:
    return _component(schema, schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


def _answer(api, method: str, path: str, body=None, params=None, headers=None) -> int:
    return api.request(method, path, json=body, params=params, headers=headers).status_code


def test_schema_limits_are_the_servers_own(api, schema):
    """At each stated limit the server answers 200; one past it, a status the schema declares."""
    item = api.get("/v1/export").json()["example_item_ids"][0]
    others = api.get("/v1/export").json()["example_item_ids"][1:]
    limits = schema["info"]["x-limits"]
    assert limits == {  # conftest's server (and the default --max-audience-k)
        "max_k": 50, "max_items": 20, "max_batch": 4, "max_body_bytes": 4000, "max_audience_k": 10_000,
    }  # fmt: skip

    similar = f"/v1/items/{item}/similar"
    params = {p["name"]: p["schema"] for p in schema["paths"]["/v1/items/{item_id}/similar"]["get"]["parameters"]}
    k_max = params["k"]["maximum"]
    assert _answer(api, "GET", similar, params={"k": k_max}) == 200
    status = _answer(api, "GET", similar, params={"k": k_max + 1})
    assert status != 200 and status in _codes(schema, "GET", "/v1/items/{item_id}/similar")
    n_max = params["exclude"]["maxItems"]
    assert _answer(api, "GET", similar, params={"exclude": ",".join([others[0]] * n_max)}) == 200
    status = _answer(api, "GET", similar, params={"exclude": ",".join([others[0]] * (n_max + 1))})
    assert status != 200 and status in _codes(schema, "GET", "/v1/items/{item_id}/similar")

    rec = _body_schema(schema, "/v1/recommend")["properties"]
    assert rec["k"]["maximum"] == k_max and rec["history"]["maxItems"] == rec["exclude"]["maxItems"] == n_max
    for body in ({"history": [item], "k": k_max + 1}, {"history": [item] * (n_max + 1)}):
        status = _answer(api, "POST", "/v1/recommend", body)
        assert status != 200 and status in _codes(schema, "POST", "/v1/recommend")

    batch = _body_schema(schema, "/v1/similar")["properties"]["queries"]
    b_max = batch["maxItems"]
    assert _answer(api, "POST", "/v1/similar", {"queries": [{"item_id": item}] * b_max}) == 200
    status = _answer(api, "POST", "/v1/similar", {"queries": [{"item_id": item}] * (b_max + 1)})
    assert status != 200 and status in _codes(schema, "POST", "/v1/similar")
    assert _body_schema(schema, "/v1/recommend/batch")["properties"]["queries"]["maxItems"] == b_max

    big = {"history": [item], "exclude": ["x" * 100] * 50}  # over 4,000 bytes
    assert schema["paths"]["/v1/recommend"]["post"]["requestBody"]["description"].startswith("at most 4000 bytes")
    status = _answer(api, "POST", "/v1/recommend", big)
    assert status == 413 and status in _codes(schema, "POST", "/v1/recommend")
    malformed = api.post("/v1/recommend", content=b"{oops", headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and 400 in _codes(schema, "POST", "/v1/recommend")
    assert _answer(api, "GET", "/v1/items/nope/similar") in _codes(schema, "GET", "/v1/items/{item_id}/similar")


def test_admin_endpoint_declares_its_token_and_answers(api, schema):
    assert schema["components"]["securitySchemes"]["adminToken"] == {
        "type": "http", "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["adminToken"]["description"],
    }  # fmt: skip
    op = schema["paths"]["/v1/admin/reload"]["post"]
    assert op["security"] == [{"adminToken": []}]
    codes = _codes(schema, "POST", "/v1/admin/reload")
    assert {200, 401, 403, 409} <= codes
    assert _answer(api, "POST", "/v1/admin/reload") == 401
    assert _answer(api, "POST", "/v1/admin/reload", headers={"Authorization": "Bearer wrong"}) == 401
    assert _answer(api, "POST", "/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}) == 200
