"""What an export folder holds and how it is verified: file names, the manifest format, hashing.

``towerrec-export`` writes the folder through :func:`seal`; :func:`read_verified` reads the manifest
back and checks every file against it. Neither torch models nor Lightning are imported here, so
verifying and querying an export never loads the training stack.
"""

from __future__ import annotations

import json
from pathlib import Path

from towerrec.fileio import file_sha256, folder_files, text_sha256

FORMAT = "towerrec-export/1"
INDEX_FILE = "index.faiss"
ITEMS_FILE = "item_ids.parquet"
EMBEDDINGS_FILE = "item_embeddings.npy"
MANIFEST_FILE = "manifest.json"
#: The files every export holds besides its manifest, each listed there with its size and sha256.
EXPORT_FILES = (INDEX_FILE, ITEMS_FILE, EMBEDDINGS_FILE)
REQUIRED_KEYS = ("format", "checkpoint", "factory", "metric", "dim", "count", "files", "index")


class ExportError(RuntimeError):
    """An export folder that cannot be written, or read back as it was written."""


def verified_checkpoint(path: str | Path, sha256: str | None) -> Path:
    """The checkpoint named in an export manifest, refused when it is missing or changed since export."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} named in the export manifest is missing (pass its new path)")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ExportError(f"checkpoint {path} changed since export (sha256 mismatch); re-run towerrec-export")
    return path


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without its own ``manifest_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return text_sha256(json.dumps(body, sort_keys=True))


def seal(manifest: dict, folder: Path) -> dict:
    """Add the size and sha256 of every export file in ``folder`` and the manifest's own digest,
    then write ``manifest.json`` there. Returns the sealed manifest."""
    sealed = {**manifest, "files": folder_files(folder, list(EXPORT_FILES))}
    sealed["manifest_sha256"] = manifest_digest(sealed)
    (folder / MANIFEST_FILE).write_text(json.dumps(sealed, indent=2))
    return sealed


def _fail(root: Path, what: str) -> ExportError:
    return ExportError(f"{root}: {what}; re-run towerrec-export")


def read_verified(root: str | Path, metric_name: str, verify: bool = True) -> dict:
    """The manifest of an export folder, after checking the folder against it.

    Args:
        root: the export folder.
        metric_name: the metric this reader searches with; another is refused.
        verify: also check the manifest's digest and every file's sha256 (sizes are checked always).

    Raises:
        ExportError: with a one-line reason, for a missing, edited, mismatched or foreign folder.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ExportError(f"{root}: no {MANIFEST_FILE} (not an export folder written by towerrec-export)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise _fail(root, f"{MANIFEST_FILE} is not valid JSON ({err})") from err
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _fail(root, f"{MANIFEST_FILE} lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise _fail(root, f"format {manifest['format']!r}, this towerrec reads {FORMAT!r}")
    if verify and manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise _fail(root, f"{MANIFEST_FILE} was edited after export (its manifest_sha256 does not match)")
    if manifest["metric"] != metric_name:
        raise _fail(root, f"metric {manifest['metric']!r}, expected {metric_name!r}")
    for name in EXPORT_FILES:
        if name not in manifest["files"]:
            raise _fail(root, f"{MANIFEST_FILE} lists no checksum for {name}")
        file = root / name
        if not file.is_file():
            raise _fail(root, f"{name} is missing")
        expected = manifest["files"][name]
        if file.stat().st_size != expected["bytes"]:
            raise _fail(root, f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}")
        if verify and file_sha256(file) != expected["sha256"]:
            raise _fail(root, f"{name} sha256 does not match the manifest (file changed after export)")
    return manifest
