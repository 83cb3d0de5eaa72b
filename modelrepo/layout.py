"""Folder layout of the model repository."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from .manifest import MANIFEST_FILENAME

_VERSION_DIR = re.compile(r"^[1-9][0-9]*$")
_MODEL_DIR = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

# Says whether a model or version folder may be read (``Path -> bool``); every folder is, without one.
FolderCheck = Callable[[Path], bool]


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def is_version_name(text: str) -> bool:
    """Whether ``text`` names a version: a positive integer written the one canonical way (``7``, not ``07``,
    ``+7``, `` 7`` or ``7.0``)."""
    return _VERSION_DIR.fullmatch(text) is not None


def outside_root(root: str | Path, folder: str | Path) -> Path | None:
    """Where ``folder`` really is, when that is outside ``root``: a symlink (it or a folder on its way) leading
    out of the repository. None for a folder inside it, linked or not."""
    real = Path(folder).resolve()
    return None if real.is_relative_to(Path(root).resolve()) else real


def list_versions(model_dir: str | Path, admit: FolderCheck | None = None) -> list[int]:
    """Published versions of one model, ascending.

    Only folders named by a positive integer that hold a manifest count:
    temporary folders of an export in progress (``.tmp-*``) never do; nor do
    those ``admit`` refuses.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if is_version_name(p.name) and (p / MANIFEST_FILENAME).is_file() and (admit is None or admit(p))
    )


def list_model_names(repository: str | Path, admit: FolderCheck | None = None) -> list[str]:
    """Models in the repository that have at least one published version; ``admit`` checks model and version
    folders alike."""
    repository = Path(repository)
    if not repository.is_dir():
        return []
    # The model folder is checked before its versions, and only if it holds some: one refusal, not one a version.
    return sorted(
        p.name for p in repository.iterdir()
        if _MODEL_DIR.fullmatch(p.name) and list_versions(p) and (admit is None or admit(p) and list_versions(p, admit))
    )
