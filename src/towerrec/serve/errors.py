"""Every error the service answers is ``{"detail": "<one line>"}``: request validation (400 for
malformed JSON, else 422), HTTP errors raised by the endpoints, a body over the size limit (413) and,
for anything unexpected, a 500 that names only the exception's type (the traceback goes to the log)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

_TOO_LARGE = "request body over this server's limit of {limit} bytes"


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
            too_large = JSONResponse({"detail": _TOO_LARGE.format(limit=self.limit)}, status_code=413)
            return await too_large(scope, receive, send)
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


def one_line(err: RequestValidationError) -> tuple[int, str]:
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


async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    status, reason = one_line(err)
    return JSONResponse({"detail": reason}, status_code=status)


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": str(err.detail)}, status_code=err.status_code, headers=err.headers)


async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": f"internal error ({type(err).__name__}); see the server log"}, status_code=500)


def one_line_errors(app: FastAPI, max_body_bytes: int) -> None:
    """Install the body-size limit and the one-line error handlers on ``app``."""
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
