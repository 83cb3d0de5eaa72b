"""Folder layout of the model repository."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .manifest import MANIFEST_FILENAME

_VERSION_DIR = re.compile(r"^[1-9][0-9]*$")
_MODEL_DIR = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def list_versions(model_dir: str | Path) -> list[int]:
    """Published versions of one model, ascending.

    Only folders named by a positive integer that hold a manifest count:
    temporary folders of an export in progress (``.tmp-*``) never do.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if _VERSION_DIR.match(p.name) and (p / MANIFEST_FILENAME).is_file()
    )


def list_model_names(repository: str | Path) -> list[str]:
    """Models in the repository that have at least one published version."""
    repository = Path(repository)
    if not repository.is_dir():
        return []
    return sorted(
        p.name for p in repository.iterdir() if _MODEL_DIR.match(p.name) and list_versions(p)
    )
