"""Writing files so that a crash leaves the old or the new, whole: staged JSON, folders swapped in
by rename, and snapshots behind a symbolic link. Every stage writes through these."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block succeeds.

    The old folder is renamed aside, then the new one into place: a crash between the two leaves
    the old one aside, and the next call over ``target`` puts it back before anything else."""
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_set_aside(target)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def restore_set_aside(target: Path) -> None:
    """Undo what a crash inside :func:`atomic_dir` left: with no ``target``, the folder last set
    aside becomes it again; any other one set aside is removed."""
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda path: path.stat().st_mtime_ns)
    if aside and not target.exists():
        aside.pop().rename(target)
        _fsync_dir(target.parent)
    for leftover in aside:
        shutil.rmtree(leftover, ignore_errors=True)


def publish_snapshot(pointer: Path, build: Callable[[Path], None]) -> None:
    """Make ``pointer`` name a new immutable snapshot that ``build`` fills, with no moment at which it
    names nothing: the snapshot is a new folder beside it, ``pointer`` a symbolic link replaced in
    one ``rename``; the snapshot it named before is removed only after. Whatever step a crash
    interrupts, ``pointer`` names the old snapshot or the new one, complete (a left-over new snapshot
    is removed by the next call). A folder from before snapshots is moved into one first (the only
    step with a window, repaired by :func:`recover_pointer`)."""
    recover_pointer(pointer)
    snapshots = pointer.parent / SNAPSHOTS
    snapshots.mkdir(parents=True, exist_ok=True)
    previous = pointer.resolve() if pointer.is_symlink() else None
    for stale in [*snapshots.glob(f"{pointer.name}-*"), *snapshots.glob(f".{pointer.name}-*.tmp")]:
        if stale.resolve() != previous:
            shutil.rmtree(stale, ignore_errors=True)  # a crashed call's snapshot, never named
    if pointer.is_dir() and not pointer.is_symlink():
        legacy = snapshots / f"{pointer.name}-legacy"
        pointer.rename(legacy)
        _link(pointer, legacy)
        previous = legacy
    snapshot = snapshots / f"{pointer.name}-{uuid.uuid4().hex}"
    staging = snapshots / f".{snapshot.name}.tmp"
    build(staging)
    _fsync_tree(staging)
    staging.rename(snapshot)
    _link(pointer, snapshot)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def recover_pointer(pointer: Path) -> None:
    """Repair the one window :func:`publish_snapshot` has (moving a pre-snapshot folder aside)."""
    legacy = pointer.parent / SNAPSHOTS / f"{pointer.name}-legacy"
    if not pointer.exists() and not pointer.is_symlink() and legacy.is_dir():
        _link(pointer, legacy)


def _link(pointer: Path, snapshot: Path) -> None:
    link = pointer.with_name(f".{pointer.name}.link-{uuid.uuid4().hex[:8]}")
    os.symlink(os.path.relpath(snapshot, pointer.parent), link)
    os.replace(link, pointer)
    _fsync_dir(pointer.parent)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    for folder in sorted({root, *(path.parent for path in root.rglob("*"))}):
        _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


SNAPSHOTS = ".snapshots"


def _staged_json(path: Path, payload: Any) -> Path:
    """``payload`` as JSON in a temporary sibling of ``path``, on disk (fsynced) before it takes the
    name: a crash keeps one whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with staging.open("w") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True, default=str))
        handle.flush()
        os.fsync(handle.fileno())
    return staging


def write_json(path: Path, payload: Any) -> None:
    _staged_json(path, payload).replace(path)
    _fsync_dir(path.parent)


def create_json(path: Path, payload: Any) -> bool:
    """Write ``payload`` to ``path`` only if nothing is there yet (a hard link fails on an existing
    name, atomically); False when another writer was first."""
    staging = _staged_json(path, payload)
    try:
        os.link(staging, path)
    except FileExistsError:
        return False
    finally:
        staging.unlink()
    _fsync_dir(path.parent)
    return True


def linked_copy(source: Path | str, target: Path | str) -> None:
    """``target`` as a copy of the file ``source`` that shares its data (a hard link) where both are on
    one file system, else a plain copy. As safe as a copy because nothing here changes a file in
    place: every write makes a new file swapped in by name (``atomic_dir``, ``write_json``, an
    erasure's rewrite), which leaves the other name's data as it was. A bundle's files took 0.9 s to
    copy at 20M events."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` anew beside it and rename over it; drop the checksum Hadoop's local file system
    keeps beside a file Spark wrote (``.<name>.crc``): it would no longer match, and Spark reads a
    file without one unchecked."""
    staging = path.with_name(f".{path.name}.tmp")
    write(staging)
    os.replace(staging, path)
    path.with_name(f".{path.name}.crc").unlink(missing_ok=True)
