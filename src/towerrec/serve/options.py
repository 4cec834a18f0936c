"""What ``towerrec-serve`` was started with, and how ``--workers N`` processes receive it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

#: Environment variables: the settings of ``--workers N`` processes, and the two tokens.
SETTINGS_ENV = "TOWERREC_SERVE_SETTINGS"
TOKEN_ENV = "TOWERREC_SERVE_ADMIN_TOKEN"
AUDIENCE_TOKEN_ENV = "TOWERREC_SERVE_AUDIENCE_TOKEN"


@dataclass
class ServeSettings:
    """What ``towerrec-serve`` was started with.

    Args:
        export: the export folder (verified at start and at every reload).
        gpu: search on a GPU: ``auto`` | ``true`` | ``false``.
        threads: FAISS and torch intra-op threads per process.
        max_k: the largest ``k`` an item query may ask for.
        max_batch: the most queries in one batch request, and campaigns in one audience request (413 above).
        max_items: the most ids in one ``history``, ``exclude`` or campaign ``items`` list (413 above).
        max_body_bytes: the largest request body (413 above).
        admin_token: enables ``/v1/admin/*`` (and SIGHUP reload); None leaves them off.
        workers: uvicorn worker processes (each maps the export's files: one copy of the vectors).
        audience_token: enables ``POST /v1/audience`` (customer lists); None leaves it off.
        max_audience_k: the largest ``k`` (customers) one campaign may ask for.
        preload_user_tower: load the user tower (torch and the checkpoint) in every worker before it
            accepts requests, instead of at its first history query. That first query otherwise
            waits seconds, and the work (about 0.5 GB of pages at 1M items) lands among live requests.
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
    max_audience_k: int = 10_000
    preload_user_tower: bool = False


def settings_env(settings: ServeSettings) -> str:
    """The JSON that :func:`settings_from_env` reads."""
    return json.dumps(asdict(settings))


def settings_from_env() -> ServeSettings:
    """The settings of one ``--workers N`` process, from ``$TOWERREC_SERVE_SETTINGS``."""
    return ServeSettings(**json.loads(os.environ[SETTINGS_ENV]))
