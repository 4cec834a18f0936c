"""``towerrec-serve``: serve an export folder over HTTP (FastAPI on uvicorn).

towerrec-serve --export exports/hnsw
towerrec-serve --export exports/hnsw --port 8080 --workers 2 --admin-token "$TOKEN" --no-access-log
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from towerrec.retrieval import ExportError, load_export
from towerrec.retrieval.folder import verified_checkpoint
from towerrec.serve.app import create_app
from towerrec.serve.listeners import reuse_port_available, run_workers
from towerrec.serve.options import AUDIENCE_TOKEN_ENV, SETTINGS_ENV, TOKEN_ENV, ServeSettings, settings_env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="towerrec-serve", description=__doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--export", required=True, help="export folder written by towerrec-export")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--workers", type=int, default=1,
        help="worker processes; they map the export's index and embeddings files, so they share one copy",
    )
    p.add_argument("--threads", type=int, default=1, help="FAISS and torch threads per worker (default 1)")
    p.add_argument("--gpu", default="false", help="search on GPU: auto | true | false (default false)")
    p.add_argument("--admin-token", default=os.environ.get(TOKEN_ENV),
                   help=f"enables POST /v1/admin/reload and SIGHUP reload (default: ${TOKEN_ENV}; unset: off)")  # fmt: skip
    p.add_argument("--audience-token", default=os.environ.get(AUDIENCE_TOKEN_ENV),
                   help=f"enables POST /v1/audience, which returns customer lists (default: ${AUDIENCE_TOKEN_ENV}; unset: off)")  # fmt: skip
    p.add_argument("--max-k", type=int, default=100, help="largest k a query may ask for (default 100)")
    p.add_argument("--max-audience-k", type=int, default=10_000,
                   help="largest k (customers per campaign) of POST /v1/audience (default 10000)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=100,
                   help="most queries per batch request, campaigns per audience request (default 100)")  # fmt: skip
    p.add_argument(
        "--max-items", type=int, default=500, help="most ids in one history, exclude or campaign items list (default 500)"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1 MB)"
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    p.add_argument("--keep-alive", type=int, default=75,
                   help="seconds an idle keep-alive connection stays open (default 75)")  # fmt: skip
    p.add_argument("--worker-start-timeout", type=int, default=600,
                   help="--workers N: seconds a worker may take to load and verify the export (default 600)")  # fmt: skip
    p.add_argument("--shared-socket", action="store_true",
                   help="--workers N: one listening socket shared by the workers, as uvicorn does, instead of "
                        "one per worker (SO_REUSEPORT on Linux, which spreads new connections evenly)")  # fmt: skip
    p.add_argument("--preload-user-tower", action="store_true",
                   help="load the user tower in every worker before serving, not at its first history query")  # fmt: skip
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    args = p.parse_args(argv)
    for name in ("workers", "threads", "max_k", "max_audience_k", "max_batch", "max_items", "max_body_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = ServeSettings(
        export=args.export,
        gpu=args.gpu,
        threads=args.threads,
        max_k=args.max_k,
        max_batch=args.max_batch,
        max_items=args.max_items,
        max_body_bytes=args.max_body_bytes,
        admin_token=args.admin_token or None,
        workers=args.workers,
        audience_token=args.audience_token or None,
        max_audience_k=args.max_audience_k,
        preload_user_tower=args.preload_user_tower,
    )
    try:
        # Verified before uvicorn binds the port: a tampered or incomplete export never serves.
        index = load_export(args.export, verify=True, gpu=args.gpu)
        if args.preload_user_tower:  # the checkpoint too (without torch: the workers load the model)
            ckpt = index.manifest.get("checkpoint") or {}
            verified_checkpoint(ckpt.get("path", ""), ckpt.get("sha256"))
    except (ExportError, ValueError) as err:
        sys.exit(f"error: {err}")

    import uvicorn

    # A long keep-alive: uvicorn's 5 s default can close a pooled connection just as a client sends on
    # it (seen as a failed request when a reload of a 1M-item export held the event loop back).
    common = dict(
        host=args.host,
        port=args.port,
        access_log=not args.no_access_log,
        log_level=args.log_level,
        timeout_keep_alive=args.keep_alive,
    )
    if args.workers == 1:
        uvicorn.run(create_app(settings, index), **common)
    else:
        del index  # each worker loads and verifies its own copy
        os.environ[SETTINGS_ENV] = settings_env(settings)
        # A worker imports the stack and verifies the export before it answers uvicorn's health
        # check; with the 5 s default, uvicorn kills and restarts workers that are still loading.
        app = "towerrec.serve.app:app_from_env"
        many = dict(factory=True, workers=args.workers, timeout_worker_healthcheck=args.worker_start_timeout, **common)
        if args.shared_socket or not reuse_port_available(args.host, args.port):
            uvicorn.run(app, **many)
        else:  # a listening socket per worker: new connections spread evenly over the workers
            try:
                run_workers(uvicorn.Config(app, **many))
            except OSError as err:  # the port is taken (by a process outside the group) or not ours to bind
                sys.exit(f"error: cannot listen on {args.host}:{args.port}: {err.strerror or err}")


if __name__ == "__main__":
    main()
