"""The machine-wide cache of built targets: where it lives, the file lock that makes one process build an entry while
the others wait, and the build-once rule.

An entry is a folder ``<root>/<name>`` (root: ``$DFLASH_DS_CACHE``, else ``~/.cache/dflash_ds``; name: a format
with a version suffix, bumped when an old entry would be wrong). It counts as complete when its metadata file and
``config.json`` are there: the metadata is written last, and the folder is built under another name and swapped in
whole (:func:`dflash_ds.files.build_dir`), so a complete-looking entry is a finished one.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Environment variable that replaces ``~/.cache/dflash_ds`` as the cache root.
CACHE_ENV = "DFLASH_DS_CACHE"


def default_cache_dir(name: str) -> Path:
    """``$DFLASH_DS_CACHE/<name>`` if the variable is set, else ``~/.cache/dflash_ds/<name>``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dflash_ds"
    return base / name


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that several processes (e.g. ranks of one launch) build the cache only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: best effort without a lock
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_complete(path: Path, metadata_file: str) -> bool:
    """A finished entry: its metadata file (written last) and ``config.json`` are there."""
    return (path / metadata_file).is_file() and (path / "config.json").is_file()


def ensure_built(
    cache_dir: str | os.PathLike[str] | None,
    name: str,
    metadata_file: str,
    build: Callable[[Path], Any],
    message: str | None = None,
) -> Path:
    """The entry's folder (``cache_dir``, else :func:`default_cache_dir` of ``name``), ``build(path)`` first when it
    is not complete: under a file lock beside it, checked again once the lock is held (another process may have
    finished it meanwhile). ``message`` (``{path}`` filled in) goes to stderr before a build."""
    path = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir(name)
    if is_complete(path, metadata_file):
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if not is_complete(path, metadata_file):
            if message:
                print(message.format(path=path), file=sys.stderr, flush=True)
            build(path)
    return path
