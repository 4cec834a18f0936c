"""What the endpoints depend on (FastAPI ``Depends``): the served export, this server's limits and
the two token checks. The app keeps its settings and :class:`~towerrec.serve.state.ExportHolder` on
``app.state``; nothing here is global."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from towerrec.serve.options import AUDIENCE_TOKEN_ENV, TOKEN_ENV, ServeSettings
from towerrec.serve.schemas import AudienceRequest
from towerrec.serve.state import ExportHolder, Served

#: The admin token, declared in OpenAPI as a bearer scheme (checked by :func:`require_admin`).
ADMIN_SCHEME = HTTPBearer(auto_error=False, scheme_name="adminToken",
                          description="the --admin-token of towerrec-serve (or $TOWERREC_SERVE_ADMIN_TOKEN)")  # fmt: skip


async def _settings(request: Request) -> ServeSettings:
    return request.app.state.settings


async def _holder(request: Request) -> ExportHolder:
    return request.app.state.holder


async def _served(request: Request) -> Served:
    # Taken once per request: every query of a batch is answered from one export, even across a reload.
    return request.app.state.holder.current


SettingsDep = Annotated[ServeSettings, Depends(_settings)]
HolderDep = Annotated[ExportHolder, Depends(_holder)]
ServedDep = Annotated[Served, Depends(_served)]


@dataclass(frozen=True)
class Limits:
    """This server's limits on a request: 422 for ``k`` out of range, 413 for too many ids or queries."""

    max_k: int
    max_items: int
    max_batch: int
    max_audience_k: int

    def query(self, k: int, *id_lists: list[str]) -> None:
        """An item query: ``k`` at most ``max_k``, every id list at most ``max_items`` long."""
        if k > self.max_k:
            raise HTTPException(422, f"k: {k} is above this server's max_k of {self.max_k}")
        self.ids(*id_lists)

    def ids(self, *id_lists: list[str]) -> None:
        for ids in id_lists:
            if len(ids) > self.max_items:
                raise HTTPException(
                    413, f"{len(ids)} ids in one list, over this server's limit of {self.max_items}"
                )

    def batch(self, n: int, what: str = "queries") -> None:
        if n > self.max_batch:
            raise HTTPException(413, f"{n} {what} in one batch, over this server's limit of {self.max_batch}")

    def audience(self, body: AudienceRequest) -> None:
        """Campaigns at most ``max_batch``, each ``k`` at most ``max_audience_k``, id lists at most ``max_items``."""
        self.batch(len(body.campaigns), "campaigns")
        self.ids(body.exclude)
        for i, c in enumerate(body.campaigns):
            if c.k > self.max_audience_k:
                raise HTTPException(
                    422, f"campaigns.{i}.k: {c.k} is above this server's max_audience_k of {self.max_audience_k}"
                )
            self.ids(c.items)


def limits_of(settings: ServeSettings) -> Limits:
    """The limits ``settings`` set (built once per app, kept on ``app.state.limits``)."""
    return Limits(settings.max_k, settings.max_items, settings.max_batch, settings.max_audience_k)


async def _limits(request: Request) -> Limits:
    return request.app.state.limits


LimitsDep = Annotated[Limits, Depends(_limits)]


def query_context(request: Request) -> tuple[Served, Limits]:
    """The served export and the limits, read straight from the app: the two single-query endpoints
    take them this way instead of as two dependencies. Under load FastAPI's solving of those
    dependencies was about a tenth of a similar-items request's server CPU (py-spy, one worker)."""
    state = request.app.state
    return state.holder.current, state.limits


def _token_matches(sent: str, expected: str) -> bool:
    return hmac.compare_digest(sent.encode(), expected.encode())


async def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(ADMIN_SCHEME)],
) -> None:
    """403 while admin operations are off (no token configured); 401 for a missing or wrong token."""
    if not settings.admin_token:
        raise HTTPException(
            403, f"admin endpoints are off: start towerrec-serve with --admin-token or {TOKEN_ENV}"
        )
    if credentials is None or not _token_matches(credentials.credentials, settings.admin_token):
        raise HTTPException(401, "admin token missing or wrong (send Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


async def require_audience_token(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """403 while the audience endpoint is off (no token configured); 401 for a missing or wrong token."""
    if not settings.audience_token:
        raise HTTPException(
            403, f"the audience endpoint is off: start towerrec-serve with --audience-token or {AUDIENCE_TOKEN_ENV}"
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _token_matches(token, settings.audience_token):
        raise HTTPException(401, "audience token missing or wrong (send Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
