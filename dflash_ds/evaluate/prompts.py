"""Prompt files (``--prompts``): reading JSONL prompts and rendering a prompt to the token ids the methods decode."""

from __future__ import annotations

import codecs
import os
from typing import Sequence

from ..data import TEXT_ROLE, conversation_of, parse_json_object, render_chat


class PromptFileError(ValueError):
    """A malformed prompt line; the message reads ``path:line: reason``."""


def _parse_prompt(line: bytes) -> list[dict] | str:
    """A conversation whose last turn is the user's, a ``{"prompt": str}`` record, or a pre-formatted ``text``."""
    record = parse_json_object(line)
    if not any(k in record for k in ("conversations", "messages", "text")):
        if isinstance(record.get("prompt"), str) and record["prompt"].strip():
            return [{"role": "user", "content": record["prompt"]}]
        raise ValueError("missing 'conversations' or 'messages' (or a non-empty 'prompt'/'text' string)")
    out = conversation_of(record, require_assistant=False)
    if out[0]["role"] == TEXT_ROLE:
        return out[0]["content"]  # pre-formatted: used as is, no chat template
    if out[-1]["role"] != "user":
        raise ValueError(
            f"the last turn must be the user's (got {out[-1]['role']!r}): a prompt file holds conversations "
            "to be answered, without the assistant reply"
        )
    return out


def read_prompts(path: str | os.PathLike) -> list[list[dict] | str]:
    """Read a JSONL prompt file: ``{"conversations"|"messages": [...]}`` with the user's turn last, a
    ``{"prompt": "..."}`` (one user turn) or a pre-formatted ``{"text": "..."}``. Blank lines are skipped; a bad line
    raises :class:`PromptFileError` naming ``file:line``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    prompts: list[list[dict] | str] = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number, like a training file
        for lineno, line in enumerate(f, start=1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :]
            if not line.strip():
                continue
            try:
                prompts.append(_parse_prompt(line))
            except ValueError as exc:
                raise PromptFileError(f"{path}:{lineno}: {exc}") from None
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def load_prompts(path: str | os.PathLike, tokenizer, limit: int | None = None) -> list[list[int]]:
    """Read a prompt file (:func:`read_prompts`), keep the first ``limit`` prompts, render them to token ids."""
    prompts = read_prompts(path)
    if limit is not None:
        prompts = prompts[:limit]
    return [render_prompt(tokenizer, p) for p in prompts]


def render_prompt(tokenizer, prompt: list[dict] | str | Sequence[int]) -> list[int]:
    """Token ids of one prompt: a conversation through the chat template (generation prompt added), a
    pre-formatted string as is, or token ids unchanged."""
    if isinstance(prompt, str):
        text = prompt
    elif prompt and isinstance(prompt[0], int):
        return [int(x) for x in prompt]  # type: ignore[arg-type]
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; give prompts as pre-formatted {'text': ...} lines")
        text = render_chat(tokenizer, list(prompt), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt renders to no tokens: {text!r}")
    return list(ids)
