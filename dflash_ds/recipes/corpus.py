"""The stdlib corpus: documented functions of the Python standard library (or any source tree), split at the end of
their docstring into "signature + docstring" -> "body", held-out by module, as conversations in the project's JSONL
format.

The tiny target is pretrained on these conversations (:mod:`.tiny_target`); the demo's SmolLM2 recipe asks the model
to "complete this function" on the same functions and evaluates on other code bases (:func:`write_function_prompts`).

Public API::

    extract_stdlib_functions(stdlib_dir=None, max_functions=None) -> list[FunctionSample]
    split_by_module(samples, eval_fraction=0.1, seed=0) -> (train, eval)
    spread(n, k) -> k indices spread evenly over range(n)
    to_conversation(sample) -> dict;  to_prompt_conversation(sample) -> dict
    write_jsonl(path, records);  write_prompts_jsonl(path, samples)
    write_function_prompts(workdir, num_train, num_eval) -> (train_prompts, eval_prompts)
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import io
import json
import os
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Directory names never descended into: tests are huge and repetitive, idlelib/lib2to3 are tools, and
#: site-packages is not the standard library.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})


# --------------------------------------------------------------------------------------------------------------
# 1. Extraction
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSample:
    """One stdlib function split at the end of its docstring.

    ``prompt`` is the ``def`` line(s) plus the docstring, ``body`` the rest of the function; both are dedented by
    the same amount so that ``prompt + "\\n" + body`` is valid top-level source.
    """

    module: str
    prompt: str
    body: str


def _iter_py_files(root: Path) -> Iterator[Path]:
    """Yield ``.py`` files under ``root`` in a sorted, platform-independent order, skipping ``SKIP_DIRS``."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's descent order, which is otherwise filesystem-dependent.
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".dist-info"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _module_name(path: Path, root: Path) -> str:
    """``email/utils.py`` -> ``email.utils``; ``json/__init__.py`` -> ``json``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _read_source(path: Path) -> str | None:
    """Decode a source file honouring its PEP 263 coding cookie; ``None`` if it cannot be decoded."""
    try:
        raw = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding)
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None
    # ast counts lines on \n, \r\n and \r; normalising first keeps our own line split aligned with ast's.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _functions_of(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions and methods defined directly in top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child


def _split_function(
    fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], min_lines: int, max_lines: int
) -> tuple[str, str] | None:
    """Return ``(prompt, body)`` for a function with a docstring and a non-empty body, else ``None``."""
    if ast.get_docstring(fn, clean=False) is None or len(fn.body) < 2:
        return None  # no docstring, or nothing after it (abstract stubs) -> nothing to predict
    doc = fn.body[0]
    assert doc.end_lineno is not None and fn.end_lineno is not None
    if fn.body[1].lineno <= doc.end_lineno:
        return None  # `"""doc"""; return x` on one line cannot be split at a line boundary
    # Start at the `def` line: decorators are dropped so every prompt starts the same way.
    n_lines = fn.end_lineno - fn.lineno + 1
    if not min_lines <= n_lines <= max_lines:
        return None
    source = textwrap.dedent("\n".join(lines[fn.lineno - 1 : fn.end_lineno]))
    src_lines = source.split("\n")
    split_at = doc.end_lineno - fn.lineno + 1  # number of lines that belong to the prompt
    prompt = "\n".join(src_lines[:split_at]).rstrip()
    body = "\n".join(src_lines[split_at:]).rstrip()
    # Leading blank lines of the body carry no information and would teach the model to emit empty lines.
    body = "\n".join(_drop_leading_blank(body.split("\n")))
    if not body.strip():
        return None
    return prompt, body


def _drop_leading_blank(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    return lines


def extract_stdlib_functions(
    stdlib_dir: str | os.PathLike[str] | None = None,
    max_functions: int | None = None,
    *,
    min_lines: int = 3,
    max_lines: int = 40,
    max_per_module: int | None = None,
) -> list[FunctionSample]:
    """Collect documented functions from the standard library's source.

    Walks ``stdlib_dir`` (default ``sysconfig.get_paths()["stdlib"]``) in sorted order, parses every ``.py``
    file with ``ast`` (files that fail to decode or parse are skipped) and keeps top-level functions and
    class-level methods that have a docstring and span ``min_lines..max_lines`` source lines (``def`` line to
    last line). ``max_functions`` stops early, which keeps tests fast; the order is deterministic so the first
    ``N`` functions are always the same ones.

    ``max_per_module`` keeps at most that many functions of one module, spread evenly over the file. Why: a
    few modules are dominated by near-identical one-line wrappers (``tkinter`` has hundreds of
    ``return self.tk.call(...)`` methods), and a tiny model trained on them learns one loop attractor.
    """
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    samples: list[FunctionSample] = []
    for path in _iter_py_files(root):
        source = _read_source(path)
        if source is None:
            continue
        try:
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # e.g. deliberately broken files, null bytes, or grammar from another Python version
        lines = source.split("\n")
        module = _module_name(path, root)
        found = [p for p in (_split_function(fn, lines, min_lines, max_lines) for fn in _functions_of(tree)) if p]
        if max_per_module is not None and len(found) > max_per_module:
            found = [found[i] for i in spread(len(found), max_per_module)]
        for prompt, body in found:
            samples.append(FunctionSample(module=module, prompt=prompt, body=body))
            if max_functions is not None and len(samples) >= max_functions:
                return samples
    return samples


# --------------------------------------------------------------------------------------------------------------
# 2. Split
# --------------------------------------------------------------------------------------------------------------


def _module_fraction(module: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for a module (``hash()`` is salted per process, sha256 is not)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_module(
    samples: Sequence[FunctionSample], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[FunctionSample], list[FunctionSample]]:
    """Split samples into ``(train, eval)`` so that every module's functions land on one side only.

    A module goes to eval when the hash of ``(seed, module)`` falls below ``eval_fraction``, which is stable
    across processes, machines and sample subsets. With at least two modules and ``0 < eval_fraction < 1``
    each side gets at least one module (small test inputs could otherwise end up with an empty side).
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    modules = sorted({s.module for s in samples})
    frac = {m: _module_fraction(m, seed) for m in modules}
    eval_modules = {m for m in modules if frac[m] < eval_fraction}
    if len(modules) >= 2 and 0.0 < eval_fraction < 1.0:
        by_hash = sorted(modules, key=lambda m: (frac[m], m))
        if not eval_modules:
            eval_modules = {by_hash[0]}
        elif len(eval_modules) == len(modules):
            eval_modules.discard(by_hash[-1])
    train = [s for s in samples if s.module not in eval_modules]
    held_out = [s for s in samples if s.module in eval_modules]
    return train, held_out


# --------------------------------------------------------------------------------------------------------------
# 3. Conversation records
# --------------------------------------------------------------------------------------------------------------


def to_conversation(sample: FunctionSample) -> dict[str, Any]:
    """The project's JSONL data format: the prompt as the user turn, the body as the assistant turn."""
    return {
        "conversations": [
            {"role": "user", "content": sample.prompt},
            {"role": "assistant", "content": sample.body},
        ]
    }


def to_prompt_conversation(sample: FunctionSample) -> dict[str, Any]:
    """An evaluation prompt: only the user turn (the assistant turn is what gets generated)."""
    return {"conversations": [{"role": "user", "content": sample.prompt}]}


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept); return the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_prompts_jsonl(path: str | os.PathLike[str], samples: Iterable[FunctionSample]) -> int:
    """Write user-turn-only conversations for evaluation / regeneration."""
    return write_jsonl(path, (to_prompt_conversation(s) for s in samples))



def spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic, covers different modules)."""
    k = min(n, k)
    return sorted({(i * n) // k for i in range(k)}) if k > 0 else []


# --------------------------------------------------------------------------------------------------------------
# 4. "Complete this function" prompts (the demo's SmolLM2 recipe)
# --------------------------------------------------------------------------------------------------------------

#: The "write this function" prompt of the SmolLM2 recipe (the tiny target was trained on bare signatures). "Reply
#: with the code only": SmolLM2 otherwise explains the code after it, and more answers run into the token limit
#: (docs/benchmarks.md).
WRITE_FUNCTION = "Complete this Python function. Reply with the code only.\n\n```python\n{prompt}\n```"
#: Held-out code for the SmolLM2 recipe: other code bases than the stdlib it is trained on (installed dependencies).
EVAL_CODE_BASES = ("tqdm", "datasets.utils")


def write_function_prompts(workdir: Path, num_train: int, num_eval: int) -> tuple[Path, Path]:
    """SmolLM2 recipe prompts: ``num_train`` stdlib functions (spread over the train-side modules) and
    ``num_eval`` functions of :data:`EVAL_CODE_BASES`, each as a "complete this function" user turn, written to
    ``workdir/data/{train,eval}_prompts.jsonl``. Written once (deterministic; kept for a rerun)."""
    train_path, eval_path = workdir / "data" / "train_prompts.jsonl", workdir / "data" / "eval_prompts.jsonl"
    if train_path.exists() and eval_path.exists():
        return train_path, eval_path

    def conv(sample: FunctionSample) -> dict[str, Any]:
        return {"conversations": [{"role": "user", "content": WRITE_FUNCTION.format(prompt=sample.prompt)},
                                  {"role": "assistant", "content": sample.body}]}

    train, _ = split_by_module(extract_stdlib_functions(max_per_module=100), eval_fraction=0.1, seed=0)
    held_out = []
    for name in EVAL_CODE_BASES:
        root = Path(importlib.import_module(name).__file__).parent
        held_out += extract_stdlib_functions(root, max_per_module=4)
    write_jsonl(train_path, [conv(train[i]) for i in spread(len(train), num_train)])
    records = [conv(held_out[i]) for i in spread(len(held_out), num_eval)]
    write_jsonl(eval_path, [{"conversations": r["conversations"][:1]} for r in records])
    return train_path, eval_path

