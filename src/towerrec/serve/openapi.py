"""What the published OpenAPI schema states: every status code an endpoint answers, and this
server's own limits (``--max-k``, ``--max-audience-k``, ``--max-items``, ``--max-batch``,
``--max-body-bytes``) in place of the request models' static caps, so that a client generated from the
schema meets no answer it was not told about."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi.openapi.utils import get_openapi

from towerrec.serve.schemas import Problem

if TYPE_CHECKING:
    from fastapi import FastAPI

    from towerrec.serve.options import ServeSettings


def _problem(description: str) -> dict:
    return {"model": Problem, "description": description}


NOT_FOUND = {404: _problem("an unknown item id (the reason names it)")}
BAD_BODY = {
    400: _problem("malformed JSON (the reason gives the position)"),
    413: _problem("a request body over --max-body-bytes"),
}
QUERY = {
    **NOT_FOUND,
    413: _problem("a history or exclude list over --max-items ids, or a body over --max-body-bytes"),
    422: _problem("k above --max-k or below 1, an empty history, a missing or unknown field (one line)"),
}
BATCH = {
    **BAD_BODY,
    413: _problem("over --max-batch queries, a list over --max-items ids, or a body over --max-body-bytes"),
}
RECOMMEND = {**QUERY, **BAD_BODY, 413: QUERY[413], 503: _problem("the export's checkpoint is missing or changed")}
ADMIN = {
    401: _problem("the admin token is missing or wrong (send Authorization: Bearer <token>)"),
    403: _problem("admin endpoints are off (no --admin-token)"),
    409: {"description": "the export folder was refused; the old export keeps serving (the reason says why)"},
}
AUDIENCE = {
    **BAD_BODY,
    401: _problem("the audience token is missing or wrong (send Authorization: Bearer <token>)"),
    403: _problem("the audience endpoint is off (no --audience-token)"),
    404: NOT_FOUND[404],
    409: _problem("the export holds no customer data (export it with users=true) or its customer files changed"),
    413: _problem("over --max-batch campaigns, a list over --max-items ids, or a body over --max-body-bytes"),
    422: _problem(
        "an empty campaign, k above --max-audience-k or beyond the customer count, a bad segment or a missing "
        "field (one line)"
    ),
}


def _limit_schema(name: str, schema: dict, settings: ServeSettings) -> None:
    """Set the bounds of the request fields (by name) that the server checks itself."""
    props = schema.get("properties", {})
    if "k" in props:
        props["k"]["maximum"] = settings.max_audience_k if name == "CampaignIn" else settings.max_k
    for field in ("history", "exclude", "items"):
        if field in props and props[field].get("type") == "array":
            props[field]["maxItems"] = settings.max_items
    for field in ("queries", "campaigns"):
        if field in props:
            props[field]["maxItems"] = settings.max_batch


def stated_limits(app: FastAPI, settings: ServeSettings) -> Callable[[], dict]:
    """``app.openapi``: FastAPI's schema with this server's limits written into it (built once)."""

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes,
            description=(
                f"Limits of this server: k <= {settings.max_k} (audiences: k <= {settings.max_audience_k}), "
                f"at most {settings.max_items} ids per history, exclude or campaign items list, "
                f"{settings.max_batch} queries or campaigns per batch and {settings.max_body_bytes} "
                "bytes per request body (413 above)."
            ),
        )  # fmt: skip
        schema["info"]["x-limits"] = {
            "max_k": settings.max_k,
            "max_items": settings.max_items,
            "max_batch": settings.max_batch,
            "max_body_bytes": settings.max_body_bytes,
            "max_audience_k": settings.max_audience_k,
        }
        for name, component in schema.get("components", {}).get("schemas", {}).items():
            _limit_schema(name, component, settings)
        for path in schema["paths"].values():
            for op in path.values():
                for param in op.get("parameters", []):
                    if param["name"] == "k":
                        param["schema"]["maximum"] = settings.max_k
                    elif param["name"] == "exclude":
                        param["schema"]["maxItems"] = settings.max_items
                body = op.get("requestBody")
                if body is not None:
                    body["description"] = f"at most {settings.max_body_bytes} bytes (413 above)"
        app.openapi_schema = schema
        return schema

    return openapi
