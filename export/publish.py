"""Atomic publication of a model version into the repository.

A version is written into a temporary folder beside its final place
(``models/<name>/.tmp-*``, which the service never reads) and renamed into
place in one step, so a server scanning the folder never sees half a model.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from modelrepo.layout import list_versions

_STAGING_PREFIX = ".tmp-"


class PublishError(RuntimeError):
    """The version cannot be published where it was asked to go."""


def next_version(model_dir: Path) -> int:
    taken = list_versions(model_dir)
    # Numbered folders without a manifest (a crashed manual copy) still block their number.
    if model_dir.is_dir():
        taken += [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    return max(taken, default=0) + 1


def make_staging_dir(model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    return staging


def check_target_free(model_dir: Path, version: int, force: bool) -> None:
    target = model_dir / str(version)
    if target.exists() and not force:
        raise PublishError(
            f"{target} already exists; versions are never overwritten. "
            f"Omit --version to publish the next one, or pass --force to replace it"
        )


def publish(staging: Path, model_dir: Path, version: int, force: bool = False) -> Path:
    """Rename ``staging`` to ``model_dir/<version>``; the swap is atomic."""
    _fsync_tree(staging)
    target = model_dir / str(version)
    retired = None
    if target.exists():
        if not force:
            check_target_free(model_dir, version, force)
        retired = model_dir / f"{_STAGING_PREFIX}old-{version}-{uuid.uuid4().hex}"
        os.rename(target, retired)
    try:
        os.rename(staging, target)  # fails if another export took the number meanwhile
    except OSError as exc:
        if retired is not None:
            os.rename(retired, target)
        raise PublishError(f"could not publish {target}: {exc}") from exc
    _fsync_dir(model_dir)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return target


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
