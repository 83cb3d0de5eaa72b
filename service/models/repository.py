"""The model repository as the server reads it: one rule for every model and version folder it opens.

A folder that resolves outside the repository (a symlink out of it) is refused,
unless ``allow_symlinks`` is set, wherever it is read: at start, by hot reload,
by the load endpoint and by the repository index. Otherwise a link planted in
the repository would have the server load and serve files from anywhere on
the machine. A refused folder is left out as if absent, and logged once.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from modelrepo.layout import list_model_names, list_versions, outside_root

from ..errors import BadRequestError, NotFoundError
from ..settings import Settings
from .engine import ModelLoadError

log = logging.getLogger(__name__)
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")
_ALLOW_HINT = "set ARCHSERVE_ALLOW_SYMLINKS=true to serve folders linked from outside the repository"

_reported: set[tuple[Path, Path]] = set()  # (folder, where it leads): each refusal is logged once per process
_reported_lock = threading.Lock()


class Repository:
    """``settings.models_dir`` under the symlink rule."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.models_dir
        self.allow_symlinks = settings.allow_symlinks
        self.refused: list[Path] = []  # by this reader, for error messages

    def refusal(self, folder: Path) -> str | None:
        """Why ``folder`` may not be read, or None if it may."""
        if self.allow_symlinks:
            return None
        target = outside_root(self.root, folder)
        if target is None:
            return None
        return f"{folder} leads outside the repository {self.root}/, to {target}"

    def admits(self, folder: Path) -> bool:
        reason = self.refusal(folder)
        if reason is None:
            return True
        self.refused.append(folder)
        key = (folder, folder.resolve())
        with _reported_lock:
            first = key not in _reported
            _reported.add(key)
        if first:
            log.warning("%s: not served; %s", reason, _ALLOW_HINT)
        return False

    def refused_note(self) -> str:
        """For an error about a missing model: the folders refused, if any, and how to allow them."""
        if not self.refused:
            return ""
        folders = ", ".join(sorted({str(f.relative_to(self.root)) for f in self.refused}))
        return f" ({folders} left out: linked from outside the repository; {_ALLOW_HINT})"

    def model_names(self) -> list[str]:
        return list_model_names(self.root, self.admits)

    def versions(self, name: str) -> list[int]:
        return list_versions(self.root / name, self.admits)

    def version_dir(self, name: str, version: int) -> Path:
        """A version folder to load; ``ModelLoadError`` if the rule refuses it or its model folder."""
        folder = self.root / name / str(version)
        for checked in (folder.parent, folder):
            if not self.admits(checked):
                raise ModelLoadError(f"{self.refusal(checked)}; refusing to load it ({_ALLOW_HINT})")
        return folder

    def model_dir(self, name: str) -> Path:
        """The folder of model ``name`` for the load and unload endpoints: a plain name (no paths), present, and
        admitted by the rule (400 otherwise, saying why)."""
        if not _MODEL_NAME.fullmatch(name) or ".." in name:
            raise BadRequestError(
                f"{name!r} is not a model name: use lowercase letters, digits, '_', '.' and '-' (no paths)"
            )
        folder = self.root / name
        if not folder.exists():
            known = ", ".join(self.model_names()) or "none"
            raise NotFoundError(f"model {name!r} is not in the repository; it holds: {known}")
        if not self.admits(folder):
            raise BadRequestError(f"model folder {name!r}: {self.refusal(folder)}; refusing to load it ({_ALLOW_HINT})")
        return folder
