"""Fingerprints: short hashes that say whether a stage's inputs, settings or code changed.

Files are fingerprinted by path, size and modification time, never by content: cheap at any size,
and a rewritten file counts as changed. Every cache and stage marker in cwpo-ray keys on these.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    """16 hex digits of the sha256 of ``parts`` as JSON (dict keys sorted, anything else by str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_of(path: str | Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of a file, or of every file under a folder; [] for what does not exist
    here (a hub id, an s3:// URI)."""
    where = Path(path)
    if where.is_file():
        found = [where]
    elif where.is_dir():
        found = sorted(f for f in where.rglob("*") if f.is_file())
    else:
        return []
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in found]


def path_fingerprint(path: str | Path, *parts: Any) -> str:
    """A file or folder (by its files' sizes and mtimes; by name when it is not local) and ``parts``."""
    return fingerprint(str(path), files_of(path), *parts)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The sha256 of the package's .py sources: the package version stays 0.1.0 while the code changes,
    so a stage fingerprint that includes this is not reused after a code change."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]
