"""The product page's query, ``GET /v1/items/{item_id}/similar``, without FastAPI's per-request work.

Under load a similar-items request cost a worker 0.43 to 0.45 ms of CPU inside the app, of which the
search was about 0.1 ms: FastAPI's included-router matching, its request handler and the solving of
the query parameters were most of the rest (py-spy, and an ASGI benchmark without sockets). The
:class:`LeanSimilar` route answers the well-formed requests of that endpoint straight from the app's
router, before the FastAPI route, with the same validation (:class:`~towerrec.serve.schemas.SimilarQuery`),
the same checks, the same micro-batcher and the same JSON: 0.30 to 0.33 ms instead.

Every request it does not take as certainly valid (any other method, a parameter it does not know, a
repeated ``k``, a value that does not validate) falls through to the FastAPI route, which documents
the endpoint in OpenAPI and answers those with its own 422. So the errors, and the schema, are
FastAPI's; ``tests/serve/test_lean.py`` checks that both routes answer every request alike.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.datastructures import QueryParams
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from towerrec.serve.routes import answer_similar
from towerrec.serve.schemas import SimilarQuery

#: Where the route leaves the validated query parameters in the request's scope.
PARAMS_KEY = "towerrec.similar_query"
_KNOWN = frozenset(SimilarQuery.model_fields)


def _valid_params(query_string: bytes) -> SimilarQuery | None:
    """The query parameters as :class:`SimilarQuery`, or None for anything FastAPI should judge."""
    params = QueryParams(query_string)  # parsed as Starlette parses it for the FastAPI route
    if not _KNOWN.issuperset(params.keys()) or len(params.getlist("k")) > 1:
        return None
    values: dict = {}
    if "k" in params:
        values["k"] = params["k"]
    if exclude := params.getlist("exclude"):
        values["exclude"] = exclude
    try:
        return SimilarQuery.model_validate(values)
    except ValidationError:
        return None


class LeanSimilar(Route):
    """``GET {prefix}/items/{item_id}/similar`` for well-formed requests (not in the schema: the FastAPI
    route of the same path documents it, and answers everything this route leaves to it).

    Args:
        prefix: the API's path prefix (``/v1``).
    """

    def __init__(self, prefix: str) -> None:
        super().__init__(f"{prefix}/items/{{item_id}}/similar", self.handle, methods=["GET"], include_in_schema=False)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "GET":
            return Match.NONE, {}
        match, child = super().matches(scope)
        if match is not Match.FULL:
            return Match.NONE, {}
        params = _valid_params(scope.get("query_string", b""))
        if params is None:
            return Match.NONE, {}
        return Match.FULL, {**child, PARAMS_KEY: params}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        # 404, 413 and this server's 422 (k over --max-k) are raised as HTTPException, answered by the
        # app's handlers as for the FastAPI route.
        answer = await answer_similar(state.holder.current, state.limits, scope["path_params"]["item_id"], scope[PARAMS_KEY])
        await answer(scope, receive, send)
