"""The processed folder's manifest: reading it, and checking that it describes the folder beside it.

``towerrec-prepare`` writes ``manifest.json`` last, inside a temporary folder that becomes the
processed folder in one rename, and lists in it every other file with its size and sha256. So a
manifest only ever describes a complete folder, and :func:`verify_processed` can tell a complete
folder from one that lost or truncated a file since. Loading (the DataModule) calls
:func:`load_manifest`, which verifies; this module imports neither torch nor Hydra.
"""

from __future__ import annotations

import json
from pathlib import Path

from towerrec.data.schema import DataError

MANIFEST = "manifest.json"


def read_manifest(processed_dir: str | Path) -> dict | None:
    """The manifest of ``processed_dir``, or None when there is none (or it is not valid JSON)."""
    path = Path(processed_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def verify_processed(processed_dir: str | Path, manifest: dict) -> str | None:
    """Why ``processed_dir`` does not match ``manifest`` (one line), or None when every listed file
    is present with its recorded size. Sizes only: hashing a large image cache on every load costs
    too much, and a partial write shows in the size."""
    folder = Path(processed_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "the manifest lists no files (written by an older towerrec)"
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, the manifest records {entry.get('bytes')}"
    return None


def load_manifest(processed_dir: str | Path) -> dict:
    """Read and verify the manifest of a processed folder; a one-line DataError when it does not hold.

    Raises:
        DataError: no manifest, or a listed file is missing or has another size than recorded.
    """
    folder = Path(processed_dir)
    manifest = read_manifest(folder)
    hint = "run towerrec-prepare (force=true rebuilds it)"
    if manifest is None:
        raise DataError(f"{folder}: no readable {MANIFEST}, not a processed folder; {hint}")
    problem = verify_processed(folder, manifest)
    if problem:
        raise DataError(f"{folder}: incomplete processed folder: {problem}; {hint}")
    return manifest
