"""``POST /v1/audience``: off without a token, customer lists with it, and no customer id in the log."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from towerrec.retrieval import load_export
from towerrec.retrieval.customers import Campaign, Filters, load_audiences
from towerrec.retrieval.writer import export_index
from towerrec.serve.app import ServeSettings, create_app

from .conftest import Server

TOKEN = "audience-test-token"


@pytest.fixture(scope="module")
def customer_export(tiny_ckpt, tmp_path_factory):
    from conftest import index_spec

    return export_index(
        tiny_ckpt, index_spec("flat"), tmp_path_factory.mktemp("aud") / "flat", n_queries=50, users=True
    )


def _body(items, k=10, **extra):
    return {"campaigns": [{"items": items, "k": k}], **extra}


def test_closed_without_a_token(customer_export):
    index = load_export(customer_export)
    item = str(index.items["item_id"].iloc[0])
    # No lifespan (its SIGHUP handler needs the main thread): the routes are what is tested here.
    closed = TestClient(create_app(ServeSettings(export=str(customer_export)), index))
    r = closed.post("/v1/audience", json=_body([item]), headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 403 and "audience endpoint is off" in r.json()["detail"]
    assert "customer_id" not in r.text
    opened = TestClient(create_app(ServeSettings(export=str(customer_export), audience_token=TOKEN), index))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = opened.post("/v1/audience", json=_body([item]), headers=headers)
        assert r.status_code == 401 and "customer_id" not in r.text
    r = opened.post("/v1/audience", json=_body([item]), headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and len(r.json()["audiences"][0]["customers"]) == 10


def test_audiences_over_http_and_nothing_about_customers_in_the_log(customer_export, tmp_path):
    aud = load_audiences(customer_export)
    items = aud.items.items["item_id"].astype(str).iloc[[4, 5]].tolist()
    expected = aud.audience(Campaign([items[0]], 8))
    opt_out = expected["customer_id"].iloc[:2].tolist()
    server = Server(customer_export, "--audience-token", TOKEN, log=tmp_path / "server.log")
    try:
        server.wait_ready()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
            r = client.post("/v1/audience", json=_body([items[0]], 8))
            assert r.status_code == 200, r.text
            got = r.json()["audiences"][0]["customers"]
            assert [c["customer_id"] for c in got] == expected["customer_id"].tolist()
            assert [c["rank"] for c in got] == list(range(1, 9))
            r = client.post("/v1/audience", json=_body([items[0]], 8, exclude=opt_out))
            assert not set(opt_out) & {c["customer_id"] for c in r.json()["audiences"][0]["customers"]}
            batch = {
                "campaigns": [{"items": [items[0]], "k": 15}, {"items": [items[1]], "k": 15}],
                "max_per_customer": 1,
                "aggregate": "mean",
            }
            r = client.post("/v1/audience", json=batch)
            ids = [c["customer_id"] for a in r.json()["audiences"] for c in a["customers"]]
            assert len(ids) == 30 and len(set(ids)) == 30
            want = aud.batch([Campaign([items[0]], 15), Campaign([items[1]], 15)], Filters(), "mean", 1)
            assert ids == want["customer_id"].tolist()
            for body, status, message in [
                (_body(["no-such-item"]), 404, "unknown item id"),
                (_body([]), 422, "empty campaign"),
                (_body([items[0]], len(aud) + 1), 422, "beyond the"),
                (_body([items[0]], segments=["colour=red"]), 422, "unknown column"),
            ]:
                r = client.post("/v1/audience", json=body)
                assert r.status_code == status and message in r.json()["detail"], r.text
                assert "\n" not in r.json()["detail"]
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "POST /v1/audience" in log  # the access log is on
    assert not [c for c in aud.customers["customer_id"] if c in log]


def test_audience_limits_are_stated_and_enforced(customer_export):
    """``k`` up to ``--max-audience-k`` (422 above), campaigns up to ``--max-batch`` and ids per list up
    to ``--max-items`` (413 above), each stated in the published schema."""
    index = load_export(customer_export)
    items = index.items["item_id"].astype(str).tolist()
    settings = ServeSettings(
        export=str(customer_export), audience_token=TOKEN, max_audience_k=12, max_batch=2, max_items=3
    )
    client = TestClient(create_app(settings, index), headers={"Authorization": f"Bearer {TOKEN}"})
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["CampaignIn"]["properties"]
    assert props["k"]["maximum"] == 12 and props["items"]["maxItems"] == 3
    request = schema["components"]["schemas"]["AudienceRequest"]["properties"]
    assert request["campaigns"]["maxItems"] == 2 and request["exclude"]["maxItems"] == 3
    assert schema["info"]["x-limits"]["max_audience_k"] == 12
    codes = {int(c) for c in schema["paths"]["/v1/audience"]["post"]["responses"]}

    def post(body):
        return client.post("/v1/audience", json=body)

    r = post(_body(items[:3], 12, exclude=["a", "b", "c"]))
    assert r.status_code == 200 and len(r.json()["audiences"][0]["customers"]) == 12, r.text
    two = {"campaigns": [{"items": [items[0]], "k": 12}, {"items": [items[1]], "k": 12}]}
    assert post(two).status_code == 200, post(two).text
    for body, status, words in [
        (_body([items[0]], 13), 422, "campaigns.0.k: 13 is above this server's max_audience_k of 12"),
        ({"campaigns": [{"items": [items[0]], "k": 5}, {"items": [items[1]], "k": 13}]}, 422, "campaigns.1.k"),
        ({"campaigns": [{"items": [items[0]], "k": 5}] * 3}, 413, "3 campaigns in one batch"),
        (_body(items[:4], 5), 413, "4 ids in one list, over this server's limit of 3"),
        (_body([items[0]], 5, exclude=["a", "b", "c", "d"]), 413, "4 ids in one list"),
    ]:
        r = post(body)
        assert r.status_code == status and status in codes, r.text
        assert words in r.json()["detail"] and "\n" not in r.json()["detail"]
