"""The FastAPI app: versioned JSON endpoints over one :class:`~towerrec.serve.state.ExportHolder`.

Endpoints are plain ``def`` functions, so FastAPI runs them on its thread pool: a FAISS search or a
user-tower pass never blocks the event loop. Query endpoints return their JSON directly (the response
models document it in OpenAPI without re-validating every result). Errors come back as
``{"detail": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import mimetypes
import os
import signal
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from towerrec.retrieval import ExportError, ItemIndex, UnknownItemError
from towerrec.serve.openapi import (
    ADMIN,
    AUDIENCE,
    BAD_BODY,
    BATCH,
    NOT_FOUND,
    QUERY,
    RECOMMEND,
    stated_limits,
)
from towerrec.serve.schemas import (
    AudienceRequest,
    BatchResults,
    ItemOut,
    Problem,
    RecommendBatch,
    RecommendRequest,
    Results,
    SimilarBatch,
    SimilarQuery,
    SimilarRequest,
)
from towerrec.serve.state import ExportHolder, Served

log = logging.getLogger(__name__)

API = "/v1"
#: Environment variables: the settings of ``--workers N`` processes, and the admin token.
SETTINGS_ENV = "TOWERREC_SERVE_SETTINGS"
TOKEN_ENV = "TOWERREC_SERVE_ADMIN_TOKEN"
#: The admin token, declared in OpenAPI as a bearer scheme (checked in the admin dependency).
ADMIN_SCHEME = HTTPBearer(auto_error=False, scheme_name="adminToken",
                          description="the --admin-token of towerrec-serve (or $TOWERREC_SERVE_ADMIN_TOKEN)")  # fmt: skip
AUDIENCE_TOKEN_ENV = "TOWERREC_SERVE_AUDIENCE_TOKEN"


@dataclass
class ServeSettings:
    """What ``towerrec-serve`` was started with.

    Args:
        export: the export folder (verified at start and at every reload).
        gpu: search on a GPU: ``auto`` | ``true`` | ``false``.
        threads: FAISS and torch intra-op threads per process.
        max_k: the largest ``k`` a query may ask for.
        max_batch: the most queries in one batch request (413 above).
        max_items: the most ids in one ``history`` or ``exclude`` (413 above).
        max_body_bytes: the largest request body (413 above).
        admin_token: enables ``/v1/admin/*`` (and SIGHUP reload); None leaves them off.
        workers: uvicorn worker processes (each maps the export's files: one copy of the vectors).
        audience_token: enables ``POST /v1/audience`` (customer lists); None leaves it off.
    """

    export: str
    gpu: str = "false"
    threads: int = 1
    max_k: int = 100
    max_batch: int = 100
    max_items: int = 500
    max_body_bytes: int = 1_000_000
    admin_token: str | None = None
    workers: int = 1
    audience_token: str | None = None


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # a streamed (chunked) body: the route's handler turns this into 413
                    raise HTTPException(413, _TOO_LARGE.format(limit=self.limit))
            return message

        await self.app(scope, counted, send)


_TOO_LARGE = "request body over this server's limit of {limit} bytes"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _TOO_LARGE.format(limit=limit)}, status_code=413)


def _one_line(err: RequestValidationError) -> tuple[int, str]:
    """(status, reason) for a validation error: 400 for malformed JSON, else 422."""
    errors = err.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            where = f" at position {e['loc'][-1]}" if len(e.get("loc", ())) > 1 else ""
            return 400, f"malformed JSON{where}: {ctx.get('error', e.get('msg'))}"
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return 422, "; ".join(parts).replace("\n", " ") + more


def _unknown(index: ItemIndex, ids: list[str]) -> str:
    missing = []
    for i in dict.fromkeys(ids):
        try:
            index.rows([i])
        except UnknownItemError:
            missing.append(i)
    shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
    return f"unknown item id(s): {shown}"


def _ids(values: list[str]) -> list[str]:
    """Query-string ids: repeated parameters and comma-joined lists both work."""
    return [part.strip() for v in values for part in v.split(",") if part.strip()]


def create_app(settings: ServeSettings, index: ItemIndex | None = None) -> FastAPI:
    """The app over ``settings.export``.

    Args:
        settings: limits, admin token, threads and device.
        index: the export already loaded and verified by the caller; loaded (and verified) here when None.

    Raises:
        ExportError: with a one-line reason, for a tampered or incomplete export.
    """
    holder = ExportHolder(settings.export, settings.gpu, settings.threads, index)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        # With --workers N, uvicorn's supervisor owns SIGHUP (a rolling restart of verified workers).
        hup = settings.workers == 1 and hasattr(signal, "SIGHUP")
        if hup:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_sighup_reload()))
        yield
        if hup:
            loop.remove_signal_handler(signal.SIGHUP)

    async def _sighup_reload() -> None:
        if not settings.admin_token:
            log.warning("SIGHUP ignored: admin operations are off (no admin token configured)")
            return
        result = await run_in_threadpool(holder.reload)
        log.info("SIGHUP reload: %s", json.dumps(result))

    app = FastAPI(
        title="towerrec-serve",
        version="1",
        summary="Similar items and history recommendations from a verified towerrec export",
        lifespan=lifespan,
        responses={500: {"model": Problem, "description": "an unexpected error (one line; see the server log)"}},
    )
    app.openapi = stated_limits(app, settings)  # the schema states this server's limits
    app.state.holder = holder
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    # ------------------------------------------------------------------ errors: one line, never a traceback
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        status, reason = _one_line(err)
        return JSONResponse({"detail": reason}, status_code=status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return JSONResponse({"detail": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(err).__name__}); see the server log"}, status_code=500
        )

    # ------------------------------------------------------------------ checks shared by the endpoints
    def check_query(k: int, *id_lists: list[str]) -> None:
        if k > settings.max_k:
            raise HTTPException(422, f"k: {k} is above this server's max_k of {settings.max_k}")
        for ids in id_lists:
            if len(ids) > settings.max_items:
                raise HTTPException(
                    413, f"{len(ids)} ids in one list, over this server's limit of {settings.max_items}"
                )

    def check_batch(n: int) -> None:
        if n > settings.max_batch:
            raise HTTPException(
                413, f"{n} queries in one batch, over this server's limit of {settings.max_batch}"
            )

    def similar(served: Served, q: SimilarRequest) -> dict:
        check_query(q.k, q.exclude)
        idx = served.index
        try:
            if served.search_lock is not None:
                with served.search_lock:
                    hits = idx.similar_items(q.item_id, k=q.k, exclude=q.exclude)
            else:
                hits = idx.similar_items(q.item_id, k=q.k, exclude=q.exclude)
            d = idx.describe(q.item_id)
        except UnknownItemError:
            raise HTTPException(404, _unknown(idx, [q.item_id, *q.exclude])) from None
        query = {"item_id": d.item_id, "title": d.title, "image": d.image, "is_cold": d.is_cold}
        return {"query": query, "exclude": list(q.exclude), "results": [h.to_dict() for h in hits]}

    def recommend(served: Served, q: RecommendRequest) -> dict:
        check_query(q.k, q.history, q.exclude)
        idx = served.index
        try:
            idx.rows([*q.history, *q.exclude])  # a 404 before the user model is even loaded
        except UnknownItemError:
            raise HTTPException(404, _unknown(idx, [*q.history, *q.exclude])) from None
        try:
            served.user_model(settings.threads)
        except ExportError as err:
            raise HTTPException(503, f"history queries are unavailable: {err}") from None
        if served.search_lock is not None:
            with served.search_lock:
                hits = idx.recommend(q.history, k=q.k, exclude=q.exclude, exclude_history=not q.keep_history)
        else:
            hits = idx.recommend(q.history, k=q.k, exclude=q.exclude, exclude_history=not q.keep_history)
        return {
            "query": {"history": list(q.history)},
            "exclude": list(q.exclude),
            "results": [h.to_dict() for h in hits],
        }

    def admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(ADMIN_SCHEME)]) -> None:
        if not settings.admin_token:
            raise HTTPException(
                403, f"admin endpoints are off: start towerrec-serve with --admin-token or {TOKEN_ENV}"
            )
        token = credentials.credentials if credentials is not None else ""
        if credentials is None or not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
            raise HTTPException(401, "admin token missing or wrong (send Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    # ------------------------------------------------------------------ endpoints
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def gallery() -> HTMLResponse:
        return HTMLResponse(resources.files("towerrec.serve").joinpath("static/gallery.html").read_text())

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        """Alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Ready: an export is loaded and verified."""
        served = holder.current
        return JSONResponse({"ready": True, "items": len(served.index), "manifest_sha256": served.sha256})

    @app.get(f"{API}/export", tags=["export"])
    def export_summary() -> dict:
        """A summary of the served export's manifest."""
        served = holder.current
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
            "example_item_ids": served.index.items["item_id"].head(5).astype(str).tolist(),
        }

    @app.get(f"{API}/items/{{item_id}}", response_model=ItemOut, tags=["items"], responses=NOT_FOUND)
    def item(item_id: str) -> dict:
        """An item's metadata."""
        idx = holder.current.index
        try:
            row = idx.items.iloc[idx.rows([item_id])[0]]
        except UnknownItemError:
            raise HTTPException(404, _unknown(idx, [item_id])) from None
        return {
            "item_id": str(row["item_id"]),
            "item_idx": int(row["item_idx"]),
            "title": str(row["title"]),
            "is_cold": bool(row["is_cold"]),
            "has_image": bool(row["has_image"]),
            "image_url": f"{API}/items/{item_id}/image" if row["has_image"] else None,
        }

    @app.get(f"{API}/items/{{item_id}}/image", tags=["items"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}, **NOT_FOUND})  # fmt: skip
    def image(item_id: str) -> Response:
        """The image the export recorded for the item (its file, else its row of the image cache)."""
        idx = holder.current.index
        try:
            d = idx.describe(item_id)
        except UnknownItemError:
            raise HTTPException(404, _unknown(idx, [item_id])) from None
        # Only the path recorded in the export's item table is read; nothing from the request.
        if d.image and Path(d.image).is_file():
            return FileResponse(
                d.image, media_type=mimetypes.guess_type(d.image)[0] or "application/octet-stream"
            )
        pixels = idx.image(item_id)
        if pixels is None:
            raise HTTPException(404, f"item {item_id} has no image in this export")
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    def answer_batch(answer, queries: list) -> JSONResponse:
        check_batch(len(queries))
        served = holder.current  # every query of the batch from one export, even across a reload
        return JSONResponse({"responses": [answer(served, q) for q in queries]})

    @app.get(f"{API}/items/{{item_id}}/similar", response_model=Results,
             tags=["queries"], responses=QUERY)  # fmt: skip
    def similar_items(item_id: str, params: Annotated[SimilarQuery, Query()]) -> JSONResponse:
        """Items most similar to ``item_id`` (the product page); cold items go through their content path."""
        q = SimilarRequest(item_id=item_id, k=params.k, exclude=_ids(params.exclude))
        return JSONResponse(similar(holder.current, q))

    @app.post(f"{API}/similar", response_model=BatchResults, tags=["queries"], responses={**QUERY, **BATCH})
    def similar_batch(body: SimilarBatch) -> JSONResponse:
        """Many item-to-item queries in one request, answered from one export."""
        return answer_batch(similar, body.queries)

    @app.post(f"{API}/recommend", response_model=Results, tags=["queries"], responses=RECOMMEND)
    def recommend_one(body: RecommendRequest) -> JSONResponse:
        """Items for a purchase history (the cart, the home page); each result says ``because``."""
        return JSONResponse(recommend(holder.current, body))

    @app.post(f"{API}/recommend/batch", response_model=BatchResults,
              tags=["queries"], responses={**RECOMMEND, **BATCH})  # fmt: skip
    def recommend_batch(body: RecommendBatch) -> JSONResponse:
        """Many history queries in one request, answered from one export."""
        return answer_batch(recommend, body.queries)

    # ------------------------------------------------------------------ audiences (customer data)
    def audience_access(authorization: Annotated[str | None, Header()] = None) -> None:
        if not settings.audience_token:
            raise HTTPException(
                403, f"the audience endpoint is off: start towerrec-serve with --audience-token or {AUDIENCE_TOKEN_ENV}"
            )
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.audience_token.encode()):
            raise HTTPException(401, "audience token missing or wrong (send Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    audiences_of: dict[str, object] = {}  # manifest sha256 -> the export's Audiences, loaded once

    @app.post(f"{API}/audience", tags=["audiences"], dependencies=[Depends(audience_access)], responses=AUDIENCE)
    def audience(body: AudienceRequest) -> JSONResponse:
        """The customers most likely to buy each campaign's items (needs the audience token and an
        export written with ``users=true``). Customer ids are returned, never logged."""
        from towerrec.retrieval.customers import (
            AudienceError,
            Campaign,
            Filters,
            load_audiences,
            parse_segments,
        )

        served = holder.current
        try:
            if served.sha256 not in audiences_of:
                audiences_of.clear()
                audiences_of[served.sha256] = load_audiences(served.index)
            aud = audiences_of[served.sha256]
            campaigns = [Campaign(c.items, c.k, c.name) for c in body.campaigns]
            filters = Filters(set(body.exclude), not body.include_buyers, parse_segments(body.segments))
            table = aud.batch(campaigns, filters, body.aggregate, body.max_per_customer)
        except ExportError as err:
            raise HTTPException(409, str(err)) from None
        except AudienceError as err:
            status = 404 if "unknown item id" in str(err) else 422
            raise HTTPException(status, str(err)) from None
        answers = [
            {
                "campaign": c.name,
                "items": c.items,
                "customers": table[table["campaign"] == c.name].drop(columns="campaign").to_dict("records"),
            }
            for c in campaigns
        ]
        return JSONResponse({"aggregate": body.aggregate, "audiences": answers})

    @app.post(f"{API}/admin/reload", tags=["admin"], dependencies=[Depends(admin)], responses={**ADMIN, **BAD_BODY})
    async def reload() -> JSONResponse:
        """Verify the export folder again and swap it in atomically; a refused folder keeps the old one.

        In-flight requests finish on the export they started with.
        """
        result = await run_in_threadpool(holder.reload)
        return JSONResponse(result, status_code=200 if result["reloaded"] else 409)

    return app


def app_from_env() -> FastAPI:
    """The app of one ``--workers N`` process: settings from ``TOWERREC_SERVE_SETTINGS`` (uvicorn factory)."""
    settings = ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
    return create_app(settings)


def settings_env(settings: ServeSettings) -> str:
    """The JSON that :func:`app_from_env` reads."""
    return json.dumps(asdict(settings))
