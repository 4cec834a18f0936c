"""The endpoints, one router per concern: pages and health, the export and its items, item and
history queries, audiences (customer data) and admin. Each handler validates its request through its
dependencies and calls the same :class:`~towerrec.retrieval.ItemIndex` methods ``towerrec-similar``
calls.

A single query (``GET .../similar``, ``POST /v1/recommend``) is checked on the event loop and handed to
its export's micro-batcher (:mod:`towerrec.serve.batching`): the queries that arrive while one search
runs are searched together, on the thread pool, so a FAISS search or a user-tower pass never blocks
the event loop. Batch requests are plain ``def`` functions (FastAPI runs them on its thread pool).
Answers are returned as JSON directly (the response models document them in OpenAPI without
re-validating every result).
"""

from __future__ import annotations

import io
import mimetypes
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from towerrec.retrieval import ExportError, ItemIndex, UnknownItemError
from towerrec.retrieval.hits import Hit
from towerrec.serve.deps import (
    HolderDep,
    Limits,
    LimitsDep,
    ServedDep,
    query_context,
    require_admin,
    require_audience_token,
)
from towerrec.serve.openapi import ADMIN, AUDIENCE, BAD_BODY, BATCH, NOT_FOUND, QUERY, RECOMMEND
from towerrec.serve.schemas import (
    AudienceRequest,
    BatchResults,
    ItemOut,
    RecommendBatch,
    RecommendRequest,
    Results,
    SimilarBatch,
    SimilarQuery,
    SimilarRequest,
)
from towerrec.serve.state import Served

API = "/v1"


class AnswerJSON(JSONResponse):
    """A query's answer as JSON, encoded by orjson (the same JSON; the standard library's encoder cost
    a tenth of a served request's time)."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def unknown(index: ItemIndex, ids: list[str]) -> str:
    """The 404 reason: which of ``ids`` the export does not hold (the first five)."""
    missing = []
    for i in dict.fromkeys(ids):
        try:
            index.rows([i])
        except UnknownItemError:
            missing.append(i)
    shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
    return f"unknown item id(s): {shown}"


def split_ids(values: list[str]) -> list[str]:
    """Query-string ids: repeated parameters and comma-joined lists both work."""
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


# ---------------------------------------------------------------------------------------- pages, health
pages = APIRouter()


@pages.get("/", response_class=HTMLResponse, include_in_schema=False)
async def gallery() -> HTMLResponse:
    return HTMLResponse(resources.files("towerrec.serve").joinpath("static/gallery.html").read_text())


@pages.get("/healthz", tags=["health"])
async def healthz() -> dict:
    """Alive."""
    return {"status": "ok"}


@pages.get("/readyz", tags=["health"])
async def readyz(served: ServedDep) -> JSONResponse:
    """Ready: an export is loaded and verified."""
    return JSONResponse({"ready": True, "items": len(served.index), "manifest_sha256": served.sha256})


# ---------------------------------------------------------------------------------------- export, items
items = APIRouter(prefix=API)


@items.get("/export", tags=["export"])
def export_summary(served: ServedDep, holder: HolderDep) -> dict:
    """A summary of the served export's manifest."""
    m = served.index.manifest
    return {
        "format": m["format"],
        "created": m.get("created"),
        "manifest_sha256": served.sha256,
        "model": {**m.get("model", {}), "checkpoint_sha256": m["checkpoint"].get("sha256")},
        "data": {k: v for k, v in m.get("data", {}).items() if k != "processed_dir"},
        "index": m["index"].get("name"),
        "factory": m["factory"],
        "metric": m["metric"],
        "dim": m["dim"],
        "count": m["count"],
        "cold_count": m.get("cold_count"),
        "recall": m.get("recall"),
        "operating_point": {k: v for k, v in (m.get("operating_point") or {}).items() if k != "explored"},
        "device": served.device,
        "loaded_at": served.loaded_at,
        "reloads": holder.reloads,
        "user_model_loaded": served.user_model_loaded,  # at start (--preload-user-tower), else at the first history query
        "batching": {name: {"batches": b.batches, "queries": b.queries}
                     for name, b in (("similar", served.similar), ("recommend", served.recommend))},  # fmt: skip
        "example_item_ids": served.index.items["item_id"].head(5).astype(str).tolist(),
    }


@items.get("/items/{item_id}", response_model=ItemOut, tags=["items"], responses=NOT_FOUND)
def item(item_id: str, served: ServedDep) -> dict:
    """An item's metadata."""
    idx = served.index
    try:
        row = idx.items.iloc[idx.rows([item_id])[0]]
    except UnknownItemError:
        raise HTTPException(404, unknown(idx, [item_id])) from None
    return {
        "item_id": str(row["item_id"]),
        "item_idx": int(row["item_idx"]),
        "title": str(row["title"]),
        "is_cold": bool(row["is_cold"]),
        "has_image": bool(row["has_image"]),
        "image_url": f"{API}/items/{item_id}/image" if row["has_image"] else None,
    }


@items.get("/items/{item_id}/image", tags=["items"], response_class=Response,
           responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **NOT_FOUND})  # fmt: skip
def image(item_id: str, served: ServedDep) -> Response:
    """The image the export recorded for the item (its file, else its row of the image cache)."""
    idx = served.index
    try:
        d = idx.describe(item_id)
    except UnknownItemError:
        raise HTTPException(404, unknown(idx, [item_id])) from None
    # Only the path recorded in the export's item table is read; nothing from the request.
    if d.image and Path(d.image).is_file():
        return FileResponse(d.image, media_type=mimetypes.guess_type(d.image)[0] or "application/octet-stream")
    pixels = idx.image(item_id)
    if pixels is None:
        raise HTTPException(404, f"item {item_id} has no image in this export")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


# ---------------------------------------------------------------------------------------- queries
queries = APIRouter(prefix=API, tags=["queries"])


def check_similar(served: Served, limits: Limits, q: SimilarRequest) -> None:
    """422 or 413 over this server's limits, 404 naming unknown ids."""
    limits.query(q.k, q.exclude)
    try:
        served.index.rows([q.item_id, *q.exclude])
    except UnknownItemError:
        raise HTTPException(404, unknown(served.index, [q.item_id, *q.exclude])) from None


def similar_answer(served: Served, q: SimilarRequest, hits: list[Hit]) -> dict:
    """One item-to-item answer, as ``towerrec-similar --json`` prints it."""
    d = served.index.describe(q.item_id)
    query = {"item_id": d.item_id, "title": d.title, "image": d.image, "is_cold": d.is_cold}
    return {"query": query, "exclude": list(q.exclude), "results": [h.to_dict() for h in hits]}


def similar(served: Served, limits: Limits, q: SimilarRequest) -> dict:
    """One item-to-item query, searched on its own (batch requests)."""
    check_similar(served, limits, q)
    with served.searching():
        hits = served.index.similar_items(q.item_id, k=q.k, exclude=q.exclude)
    return similar_answer(served, q, hits)


def check_recommend(served: Served, limits: Limits, q: RecommendRequest) -> None:
    """422 or 413 over this server's limits, 404 naming unknown ids (before the user tower is loaded)."""
    limits.query(q.k, q.history, q.exclude)
    try:
        served.index.rows([*q.history, *q.exclude])
    except UnknownItemError:
        raise HTTPException(404, unknown(served.index, [*q.history, *q.exclude])) from None


def load_user_model(served: Served):
    """The export's Recommender (the user tower), loaded at the first history query (503 when it cannot be)."""
    try:
        return served.recommender()
    except ExportError as err:
        raise HTTPException(503, f"history queries are unavailable: {err}") from None


def recommend_answer(q: RecommendRequest, hits: list[Hit]) -> dict:
    return {"query": {"history": list(q.history)}, "exclude": list(q.exclude), "results": [h.to_dict() for h in hits]}


def recommend(served: Served, limits: Limits, q: RecommendRequest) -> dict:
    """One history query, answered on its own (batch requests)."""
    check_recommend(served, limits, q)
    recommender = load_user_model(served)
    with served.searching():
        hits = recommender.recommend(q.history, k=q.k, exclude=q.exclude, exclude_history=not q.keep_history)
    return recommend_answer(q, hits)


def answer_batch(answer: Callable[[Served, Limits, object], dict], served: Served, limits: Limits,
                 batch: list) -> JSONResponse:  # fmt: skip
    limits.batch(len(batch))
    return AnswerJSON({"responses": [answer(served, limits, q) for q in batch]})


async def answer_similar(served: Served, limits: Limits, item_id: str, params: SimilarQuery) -> JSONResponse:
    """One product-page query, through the export's micro-batcher (``params`` already validated)."""
    q = SimilarRequest.model_construct(item_id=item_id, k=params.k, exclude=split_ids(params.exclude))
    check_similar(served, limits, q)
    hits = await served.similar.answer((q.item_id, q.k, q.exclude))
    return AnswerJSON(similar_answer(served, q, hits))


@queries.get("/items/{item_id}/similar", response_model=Results, responses=QUERY)
async def similar_items(item_id: str, params: Annotated[SimilarQuery, Query()], request: Request) -> JSONResponse:
    """Items most similar to ``item_id`` (the product page); cold items go through their content path."""
    # Well-formed requests are answered by serve.lean.LeanSimilar before they reach this route.
    return await answer_similar(*query_context(request), item_id, params)


@queries.post("/similar", response_model=BatchResults, responses={**QUERY, **BATCH})
def similar_batch(body: SimilarBatch, served: ServedDep, limits: LimitsDep) -> JSONResponse:
    """Many item-to-item queries in one request, answered from one export."""
    return answer_batch(similar, served, limits, body.queries)


@queries.post("/recommend", response_model=Results, responses=RECOMMEND)
async def recommend_one(body: RecommendRequest, request: Request) -> JSONResponse:
    """Items for a purchase history (the cart, the home page); each result says ``because``."""
    served, limits = query_context(request)
    check_recommend(served, limits, body)
    if not served.user_model_loaded:
        await run_in_threadpool(load_user_model, served)
    hits = await served.recommend.answer((body.history, body.k, body.exclude, not body.keep_history))
    return AnswerJSON(recommend_answer(body, hits))


@queries.post("/recommend/batch", response_model=BatchResults, responses={**RECOMMEND, **BATCH})
def recommend_batch(body: RecommendBatch, served: ServedDep, limits: LimitsDep) -> JSONResponse:
    """Many history queries in one request, answered from one export."""
    return answer_batch(recommend, served, limits, body.queries)


# ---------------------------------------------------------------------------------------- audiences
audiences = APIRouter(prefix=API, tags=["audiences"], dependencies=[Depends(require_audience_token)])


@audiences.post("/audience", responses=AUDIENCE)
def audience(body: AudienceRequest, served: ServedDep, limits: LimitsDep) -> JSONResponse:
    """The customers most likely to buy each campaign's items (needs the audience token and an
    export written with ``users=true``). Customer ids are returned, never logged."""
    from towerrec.retrieval.customers import AudienceError, Campaign, Filters, parse_segments

    limits.audience(body)
    try:
        aud = served.audiences()
        campaigns = [Campaign(c.items, c.k, c.name) for c in body.campaigns]
        filters = Filters(set(body.exclude), not body.include_buyers, parse_segments(body.segments))
        table = aud.batch(campaigns, filters, body.aggregate, body.max_per_customer)
    except ExportError as err:
        raise HTTPException(409, str(err)) from None
    except AudienceError as err:
        raise HTTPException(404 if "unknown item id" in str(err) else 422, str(err)) from None
    answers = [
        {
            "campaign": c.name,
            "items": c.items,
            "customers": table[table["campaign"] == c.name].drop(columns="campaign").to_dict("records"),
        }
        for c in campaigns
    ]
    return JSONResponse({"aggregate": body.aggregate, "audiences": answers})


# ---------------------------------------------------------------------------------------- admin
admin = APIRouter(prefix=API, tags=["admin"], dependencies=[Depends(require_admin)])


@admin.post("/admin/reload", responses={**ADMIN, **BAD_BODY})
async def reload(holder: HolderDep) -> JSONResponse:
    """Verify the export folder again and swap it in atomically; a refused folder keeps the old one.

    In-flight requests finish on the export they started with.
    """
    result = await run_in_threadpool(holder.reload)
    return JSONResponse(result, status_code=200 if result["reloaded"] else 409)


#: In the order the schema lists them.
ROUTERS = (pages, items, queries, audiences, admin)
