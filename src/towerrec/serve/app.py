"""The FastAPI app: versioned JSON endpoints (the routers of :mod:`towerrec.serve.routes`) over one
:class:`~towerrec.serve.state.ExportHolder`. Errors come back as ``{"detail": "<one line>"}``
(:mod:`towerrec.serve.errors`); the published schema states this server's limits
(:mod:`towerrec.serve.openapi`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from towerrec.retrieval import ItemIndex
from towerrec.serve.deps import limits_of
from towerrec.serve.errors import one_line_errors
from towerrec.serve.lean import LeanSimilar
from towerrec.serve.openapi import stated_limits
from towerrec.serve.options import ServeSettings, settings_from_env
from towerrec.serve.routes import API, ROUTERS
from towerrec.serve.schemas import Problem
from towerrec.serve.state import ExportHolder

log = logging.getLogger(__name__)

__all__ = ["ServeSettings", "app_from_env", "create_app"]


async def _sighup_reload(app: FastAPI) -> None:
    if not app.state.settings.admin_token:
        log.warning("SIGHUP ignored: admin operations are off (no admin token configured)")
        return
    result = await run_in_threadpool(app.state.holder.reload)
    log.info("SIGHUP reload: %s", json.dumps(result))


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    loop = asyncio.get_running_loop()
    # With --workers N, uvicorn's supervisor owns SIGHUP (a rolling restart of verified workers).
    hup = app.state.settings.workers == 1 and hasattr(signal, "SIGHUP")
    if hup:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_sighup_reload(app)))
    yield
    if hup:
        loop.remove_signal_handler(signal.SIGHUP)


def create_app(settings: ServeSettings, index: ItemIndex | None = None) -> FastAPI:
    """The app over ``settings.export``.

    Args:
        settings: limits, tokens, threads and device.
        index: the export already loaded and verified by the caller; loaded (and verified) here when None.

    Raises:
        ExportError: with a one-line reason, for a tampered or incomplete export (or, with
            ``preload_user_tower``, a missing or changed checkpoint).
    """
    app = FastAPI(
        title="towerrec-serve",
        version="1",
        summary="Similar items and history recommendations from a verified towerrec export",
        lifespan=_lifespan,
        responses={500: {"model": Problem, "description": "an unexpected error (one line; see the server log)"}},
    )
    app.state.settings = settings
    app.state.limits = limits_of(settings)
    app.state.holder = ExportHolder(settings.export, settings.gpu, settings.threads, index)
    if settings.preload_user_tower:  # before the worker accepts a request (ExportError: checkpoint refused)
        app.state.holder.current.recommender()
    app.openapi = stated_limits(app, settings)  # the schema states this server's limits
    one_line_errors(app, settings.max_body_bytes)
    app.router.routes.append(LeanSimilar(API))  # before the FastAPI routes: it takes the well-formed queries
    for router in ROUTERS:
        app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """The app of one ``--workers N`` process: settings from ``TOWERREC_SERVE_SETTINGS`` (uvicorn factory)."""
    return create_app(settings_from_env())
