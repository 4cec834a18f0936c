"""``towerrec-serve``: an HTTP service (FastAPI on uvicorn) over a verified export folder.

A thin layer over :mod:`towerrec.retrieval`: it validates a request, calls the same
:class:`~towerrec.retrieval.ItemIndex` methods that ``towerrec-similar`` calls, and returns their
results. Install it with ``pip install -e ".[serve]"``.
"""

from towerrec.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
