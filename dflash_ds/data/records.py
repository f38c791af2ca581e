"""Reading JSONL training records: each line validated into a conversation (``conversations`` / ``messages`` /
``text``, optional ``truncated`` and ``answer_ids`` from regeneration), a bad line skipped and counted or raised as
a :class:`BadLineError` naming its file and line."""

from __future__ import annotations

import codecs
import json
import logging
import os
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Role of the one-message sentinel that stands for a pre-formatted {"text": ...} record.
TEXT_ROLE = "text"
BAD_LINE_POLICIES = ("skip", "error")

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class Record:
    """One usable JSONL line: its conversation, whether its last answer was cut off at a token limit, the target's
    own ids of that answer if regeneration stored them, and where the line is (for reports)."""

    conversation: Conversation
    truncated: bool = False
    answer_ids: list[int] | None = None
    path: str = ""
    line: int = 0


class BadLineError(ValueError):
    """A malformed JSONL line; the message reads ``path:line: reason`` (line numbers are 1-based)."""

    def __init__(self, path: str, lineno: int, reason: str) -> None:
        super().__init__(f"{path}:{lineno}: {reason}")
        self.path = path
        self.lineno = lineno
        self.reason = reason


def _check_policy(bad_lines: str) -> None:
    if bad_lines not in BAD_LINE_POLICIES:
        raise ValueError(f"--bad-lines must be one of {'/'.join(BAD_LINE_POLICIES)}, got {bad_lines!r}")


def parse_json_object(raw: bytes) -> dict:
    """One JSONL line as a dict; ValueError(reason) when it is not UTF-8, not JSON or not an object."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def conversation_of(record: dict, require_assistant: bool = True) -> Conversation:
    """The validated messages of a record (``conversations``/``messages``/``text``); ValueError(reason).

    A ``{"text": ...}`` record becomes ``[{"role": TEXT_ROLE, "content": text}]``. Messages keep only
    ``role`` and ``content``: the Arrow table needs one schema for every row.
    """
    key = next((k for k in ("conversations", "messages") if k in record), None)
    if key is None:
        if "text" not in record:
            raise ValueError("missing 'conversations', 'messages' or 'text'")
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("empty content in 'text'")
        return [{"role": TEXT_ROLE, "content": text}]

    messages = record[key]
    if not isinstance(messages, list):
        raise ValueError(f"'{key}' must be a list of messages, got {type(messages).__name__}")
    conversation: Conversation = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected {'/'.join(ROLES)}) in {where}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{where} has no string content")
        if not content.strip():
            raise ValueError(f"empty content in {where}")
        conversation.append({"role": role, "content": content})
    if not conversation:
        raise ValueError(f"'{key}' is empty")
    if require_assistant and not any(m["role"] == "assistant" for m in conversation):
        raise ValueError("no assistant turn")
    return conversation


def answer_ids_of(record: dict, conversation: Conversation) -> list[int] | None:
    """The stored ``answer_ids`` of a record (None when absent); ValueError(reason) unless they are a non-empty list
    of token ids and the conversation ends with the assistant answer they belong to."""
    ids = record.get("answer_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in ids):
        raise ValueError("'answer_ids' must be a non-empty list of token ids")
    if conversation[-1]["role"] != "assistant":
        raise ValueError("'answer_ids' given but the last message is not the assistant's")
    return ids


def _parse_record(raw: bytes) -> tuple[Conversation, bool, list[int] | None]:
    """One JSONL line as (training conversation, truncated flag, stored answer ids); ValueError(reason) if the line
    is malformed."""
    record = parse_json_object(raw)
    truncated = record.get("truncated", False)
    if not isinstance(truncated, bool):
        raise ValueError(f"'truncated' must be true or false, got {truncated!r}")
    conversation = conversation_of(record)
    return conversation, truncated, answer_ids_of(record, conversation)


def read_records(path: str | os.PathLike, bad_lines: str = "skip") -> tuple[list[Record], int]:
    """Read a JSONL file of conversations.

    Each non-blank line is ``{"conversations": [{"role", "content"}, ...]}``, ``{"messages": [...]}`` (same
    shape) or a pre-formatted ``{"text": "..."}`` (returned as ``[{"role": "text", "content": ...}]``), with an
    optional ``"truncated": true|false`` (written by regeneration: the last answer hit the token limit) and
    optional ``"answer_ids"`` (written by regeneration: the target's own ids of the last answer).
    Blank lines are ignored. A bad line (not UTF-8, invalid JSON, not an object, no
    conversations/messages/text, unknown role, content missing, not a string or empty, no assistant turn,
    malformed answer ids) raises BadLineError under ``bad_lines="error"``; under ``"skip"`` it is skipped, counted
    and logged.

    Returns ([Record] in line order, number of skipped lines).
    """
    _check_policy(bad_lines)
    path = os.fspath(path)
    conversations: list[Record] = []
    skipped = 0
    # Binary mode: a non-UTF-8 line is one bad line, not an exception that aborts the whole file.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            try:
                conversation, truncated, answer_ids = _parse_record(raw)
                conversations.append(Record(conversation, truncated, answer_ids, path, lineno))
            except ValueError as exc:
                error = BadLineError(path, lineno, str(exc))
                if bad_lines == "error":
                    raise error from None
                skipped += 1
                logger.warning("skipping bad line %s", error)
    if skipped:
        print(f"skipped {skipped} bad lines in {path}", file=sys.stderr)
    return conversations, skipped


def read_conversations(path: str | os.PathLike, bad_lines: str = "skip") -> tuple[list[Conversation], int]:
    """:func:`read_records` without the truncated flags: (conversations in line order, skipped lines)."""
    records, skipped = read_records(path, bad_lines)
    return [r.conversation for r in records], skipped
