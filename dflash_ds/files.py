"""Outputs written atomically: a temporary name, then a rename, so a failure leaves the previous file (or folder)
or nothing, never half of one: files (:func:`write_text_atomic`, :func:`write_json_atomic`) and folders
(:func:`replace_dir`, :func:`build_dir`, :func:`copy_dir`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``; an old ``dst`` is moved aside first and removed after, so
    ``dst`` is never half-written."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def empty_or_missing(path: Path) -> bool:
    """``path`` does not exist, or is an empty folder."""
    path = Path(path)
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def build_dir(out: Path, fill: Callable[[Path], T]) -> T:
    """``fill(tmp)`` writes a folder's content into the scratch folder ``out.tmp`` (leftovers of a crashed run are
    removed first), which then replaces ``out`` whole (:func:`replace_dir`); if ``fill`` raises, nothing is left
    behind, not even the scratch folder. Returns what ``fill`` returned."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return result


def copy_dir(src: Path, dst: Path) -> None:
    """Copy the folder ``src`` to ``dst`` (missing or empty) through ``dst.tmp``, so ``dst`` is never half-written."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        dst.rmdir()  # empty (the caller checked)
    os.replace(tmp, dst)
