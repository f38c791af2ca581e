"""Training data: JSONL conversations -> token ids + loss mask.

Pipeline::

    JSONL files --read_conversations--> [[{"role", "content"}, ...], ...]
                --tokenize_conversation--> {"input_ids": [S], "loss_mask": [S]}
                --build_dataset--> datasets.Dataset (cached, multiprocess)
                --collate_batch--> {"input_ids", "loss_mask", "attention_mask"}: [b, S] long tensors

The loss mask is 1 on assistant content tokens and on the assistant turn's end-of-turn token (e.g.
``<|im_end|>``), 0 on system/user turns, role headers and template-injected text such as Qwen3's empty
``<think>\\n\\n</think>\\n\\n`` block. The drafter's anchors are drawn from this mask, so a wrong
mask silently trains the drafter on prompts instead of responses: it is tested against decoded text.

A regenerated record (:mod:`dflash_ds.regenerate`) carries the target's own ids of its last answer
(``"answer_ids"``): they replace that answer's re-tokenised text, which may merge differently from what the target
wrote. An example in which the MASK id occurs (say a message quoting ``<|mask|>``) is reported with its file and
line: the drafter would read MASK in the clean stream.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch

from .settings import REQUIRED, check_choices, setting

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Role of the one-message sentinel that stands for a pre-formatted {"text": ...} record.
TEXT_ROLE = "text"
BAD_LINE_POLICIES = ("skip", "error")
# What to do with an answer that regeneration cut off at --max-new-tokens (record field "truncated": true): "keep" it
# without supervising the end-of-turn token after it (the target never wrote one there), or "drop" it. Keep is the
# default because it measured better (docs/benchmarks.md): dropping removes exactly the long answers the target keeps
# writing at evaluation time.
TRUNCATED_POLICIES = ("drop", "keep")
# Bump when the tokenisation or masking logic changes, so that old caches are not reused.
# 3: regenerated answers keep their stored token ids; examples containing the MASK id are reported and dropped.
_CACHE_FORMAT_VERSION = 3
# Stands in for each assistant content while rendering the template; the template's own text around it
# then tells us exactly where the content lands (see _assistant_spans).
_PLACEHOLDER = "\ue000DFLASH_ASSISTANT_TURN_{}\ue001"

Message = dict[str, str]
Conversation = list[Message]


@dataclass
class DataConfig:
    """Data (JSONL conversations, tokenised with the target's chat template).

    ``cache_dir``: if set, the tokenised dataset is saved there and reused while the files, the tokenizer, the
    chat template, max_length, bad_lines and truncated stay the same.
    """

    paths: list[str] = setting(REQUIRED, "JSONL conversation file(s), concatenated in this order", flag="train-data",
                               metavar="FILE")
    max_length: int = setting(2048, "examples are truncated to this many tokens")
    bad_lines: str = setting("skip", "a malformed line: skip it (counted, with file:line) or stop with an error",
                             choices=BAD_LINE_POLICIES)
    num_proc: int = setting(1, "processes for tokenisation")
    cache_dir: str | None = setting(None, cli=False)
    truncated: str = setting("keep", "regenerated answers cut off at their token limit: keep them without "
                             "supervising the end-of-turn the target never wrote, or drop them",
                             choices=TRUNCATED_POLICIES)

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            # A lone string would otherwise be iterated character by character.
            self.paths = [os.fspath(self.paths)]
        self.paths = [os.fspath(p) for p in self.paths]
        check_choices(self)
        if self.max_length < 1:
            raise ValueError(f"--max-length must be >= 1, got {self.max_length}")
        if self.num_proc < 1:
            raise ValueError(f"--num-proc must be >= 1, got {self.num_proc}")


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


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Tokenising
# ----------------------------------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat-template text of ``messages``: the ONE rendering that training data, regeneration and evaluation
    share, so the drafter is trained on the prompts it is evaluated on.

    ``enable_thinking=False``: Qwen3's templates otherwise let the model open a ``<think>`` trace (regenerated
    answers became thinking traces cut off at the token limit, which evaluation never produces); other templates
    ignore the unknown variable.
    """
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
    )


def _is_text_record(messages: Conversation) -> bool:
    return len(messages) == 1 and messages[0]["role"] == TEXT_ROLE


def _assistant_spans(tokenizer: Any, messages: Conversation, full: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of each assistant turn's content inside the rendered text ``full``.

    First try: render the conversation with a unique placeholder in place of each assistant content, put
    the real contents back in, and check the result equals ``full``. If it does, the spans are exact, for any
    template that inserts the content verbatim (ChatML, Llama 3, Qwen3 with plain content). Templates that
    rewrite the content (Qwen3 strips leading newlines and drops ``<think>`` blocks of earlier turns) fall
    back to searching for the content, or its stripped / after-``</think>`` part, after the previous turns.
    """
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    placeholders = [_PLACEHOLDER.format(i) for i in range(len(contents))]
    if not any(p in m["content"] for p in placeholders for m in messages):
        masked, k = [], 0
        for m in messages:
            if m["role"] == "assistant":
                m = {"role": "assistant", "content": placeholders[k]}
                k += 1
            masked.append(m)
        template = render_chat(tokenizer, masked)
        pieces, spans, pos, ok = [], [], 0, True
        length = 0  # length of "".join(pieces), kept as we go
        for placeholder, content in zip(placeholders, contents):
            idx = template.find(placeholder, pos)
            if idx < 0:
                ok = False
                break
            pieces += [template[pos:idx], content]
            length += idx - pos
            spans.append((length, length + len(content)))
            length += len(content)
            pos = idx + len(placeholder)
        if ok and "".join(pieces) + template[pos:] == full:
            return spans

    # Fallback: search forward. Starting after the rendered previous turns (and the assistant header, when the
    # template has a generation prompt) keeps a short content from matching inside an earlier turn.
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i > 0:
            for add_prompt in (False, True):
                prefix = render_chat(tokenizer, messages[:i], add_generation_prompt=add_prompt)
                if full.startswith(prefix):
                    cursor = max(cursor, len(prefix))
        content = m["content"]
        candidates = [content, content.strip(), content.split("</think>")[-1].strip()]
        for candidate in dict.fromkeys(c for c in candidates if c):
            start = full.find(candidate, cursor)
            if start >= 0:
                spans.append((start, start + len(candidate)))
                cursor = start + len(candidate)
                break
        else:
            raise ValueError(
                f"cannot locate assistant message {i} in the rendered chat template; the template rewrites "
                f"the content beyond stripping: {content[:80]!r}"
            )
    return spans


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of special tokens: candidates for an end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return ids


def stored_ids_fit(tokenizer: Any, content: str, answer_ids: list[int], rendered: str) -> bool:
    """Whether stored answer ids may stand for ``content``: they decode to it under this tokenizer (the text
    regeneration wrote, so neither another tokenizer's ids nor a hand-edited answer) and the template wrote it
    verbatim as ``rendered`` (a template that rewrites the answer, such as stripping it, has no place for them)."""
    return rendered == content and tokenizer.decode(answer_ids, skip_special_tokens=True) == content


def _encode(tokenizer: Any, text: str, shift: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character offsets (moved by ``shift``) of ``text``, tokenised without added special tokens."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [(a + shift, b + shift) for a, b in encoding["offset_mapping"]]


def _encode_with_answer(
    tokenizer: Any, full: str, span: tuple[int, int], answer_ids: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and offsets of ``full`` with the text at ``span`` (the last answer) replaced by ``answer_ids``.

    The text before and after is tokenised on its own, as a generation prompt is: the ids before are the prompt the
    target answered, the ids after the template's end-of-turn. Every answer id gets the whole span as its offsets,
    so the masking pass counts it as content."""
    start, end = span
    head_ids, head_offsets = _encode(tokenizer, full[:start])
    tail_ids, tail_offsets = _encode(tokenizer, full[end:], shift=end)
    return head_ids + list(answer_ids) + tail_ids, head_offsets + [span] * len(answer_ids) + tail_offsets


def _loss_mask(
    ids: list[int], offsets: list[tuple[int, int]], full: str, spans: list[tuple[int, int]], specials: set[int],
    truncated: bool,
) -> list[int]:
    """1 on tokens overlapping an assistant span and on the special token that closes each assistant turn (plus
    whitespace-only tokens just before it), except after a ``truncated`` last answer; 0 elsewhere."""
    mask = [0] * len(ids)
    t = 0  # token cursor: spans are ordered, so one pass over the tokens suffices
    for n, (start, end) in enumerate(spans):
        while t < len(ids) and offsets[t][1] <= start:
            t += 1
        # Content tokens: any token overlapping the span (a BPE merge across the edge still carries content).
        while t < len(ids) and offsets[t][0] < end:
            if offsets[t][1] > offsets[t][0]:
                mask[t] = 1
            t += 1
        # End of turn: the first special token after the content, if only whitespace lies in between. The
        # drafter must learn to emit it, or it never proposes the end of an answer.
        if truncated and n == len(spans) - 1:
            break
        j = t
        while j < len(ids) and ids[j] not in specials and not full[offsets[j][0] : offsets[j][1]].strip():
            j += 1
        if j < len(ids) and ids[j] in specials:
            for k in range(t, j + 1):
                mask[k] = 1
            t = j + 1
    return mask


def tokenize_with_stored_answer(
    tokenizer: Any, messages: Conversation, max_length: int, truncated: bool = False,
    answer_ids: list[int] | None = None,
) -> tuple[dict[str, list[int]], bool]:
    """:func:`tokenize_conversation`, and whether ``answer_ids`` were used (False when none were given, or when
    they do not fit the last answer: :func:`stored_ids_fit`; its text is then tokenised instead)."""
    if _is_text_record(messages):
        ids = tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"][:max_length]
        return {"input_ids": list(ids), "loss_mask": [1] * len(ids)}, False

    full = render_chat(tokenizer, messages)
    spans = _assistant_spans(tokenizer, messages, full)
    # add_special_tokens=False: the template already writes BOS if the model wants one, and
    # apply_chat_template(tokenize=True) tokenises the same way (checked by check_template_roundtrip).
    used = answer_ids is not None and messages[-1]["role"] == "assistant" and stored_ids_fit(
        tokenizer, messages[-1]["content"], answer_ids, full[spans[-1][0] : spans[-1][1]])
    if used:
        ids, offsets = _encode_with_answer(tokenizer, full, spans[-1], answer_ids)
    else:
        ids, offsets = _encode(tokenizer, full)
    mask = _loss_mask(ids, offsets, full, spans, _special_ids(tokenizer), truncated)
    return {"input_ids": ids[:max_length], "loss_mask": mask[:max_length]}, used


def tokenize_conversation(
    tokenizer: Any, messages: Conversation, max_length: int, truncated: bool = False,
    answer_ids: list[int] | None = None,
) -> dict[str, list[int]]:
    """Tokenise one conversation with the tokenizer's chat template and build its loss mask.

    ``messages``: ``[{"role", "content"}, ...]`` as returned by read_conversations (a one-message
    ``TEXT_ROLE`` conversation is pre-formatted text: tokenised as is, without added special tokens, every
    token supervised).

    Returns ``{"input_ids": [S], "loss_mask": [S]}`` with ``S <= max_length`` (truncated at the right).
    ``loss_mask`` is 1 on tokens overlapping an assistant content and on the special token that closes the
    assistant turn (plus any whitespace-only tokens just before it), 0 elsewhere. ``truncated``: the last
    assistant answer was cut off at a token limit, so the end-of-turn the template writes after it is not the
    target's and stays 0. ``answer_ids``: the target's own ids of the last (assistant) message, stored by
    regeneration: they stand in for its tokenised text, between the rendered prompt's ids and the template's
    end-of-turn, when they fit it (:func:`stored_ids_fit`). Needs a fast tokenizer (offset mapping).
    """
    return tokenize_with_stored_answer(tokenizer, messages, max_length, truncated, answer_ids)[0]


def check_template_roundtrip(tokenizer: Any, messages: Conversation) -> None:
    """Raise ValueError unless tokenising the rendered text gives the ids ``apply_chat_template`` gives.

    tokenize_conversation tokenises the rendered string itself (it needs character offsets); this catches a
    tokenizer that would add a second BOS or otherwise tokenise the text differently from the template path.
    """
    reference = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=False, enable_thinking=False
    )
    if hasattr(reference, "keys"):  # transformers 5 returns a BatchEncoding
        reference = reference["input_ids"]
    reference = list(reference)
    ours = tokenize_conversation(tokenizer, messages, max_length=len(reference) + 1)["input_ids"]
    if ours != reference:
        n = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
        raise ValueError(
            f"tokenising the rendered chat template differs from apply_chat_template(tokenize=True) at token "
            f"{n}: {ours[n : n + 5]} vs {reference[n : n + 5]} (lengths {len(ours)} vs {len(reference)})"
        )


def mask_position(ids: list[int], mask_token_id: int | None) -> int:
    """Index of the first ``mask_token_id`` in ``ids``; -1 when there is none (or no MASK id is given)."""
    if mask_token_id is None:
        return -1
    return next((k for k, t in enumerate(ids) if t == mask_token_id), -1)


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, max_length: int,
                    mask_token_id: int | None = None) -> dict[str, list]:
    """datasets.map worker (module level so that num_proc > 1 can pickle it). Besides the example, each row says
    where the MASK id first occurs (``mask_at``, -1 if nowhere) and whether its stored answer ids were given but
    not used (``stale_ids``), for :func:`build_dataset` to report."""
    out: dict[str, list] = {"input_ids": [], "loss_mask": [], "mask_at": [], "stale_ids": []}
    for messages, truncated, answer_ids in zip(batch["messages"], batch["truncated"], batch["answer_ids"]):
        example, used = tokenize_with_stored_answer(tokenizer, messages, max_length, truncated, answer_ids)
        out["input_ids"].append(example["input_ids"])
        out["loss_mask"].append(example["loss_mask"])
        out["mask_at"].append(mask_position(example["input_ids"], mask_token_id))
        out["stale_ids"].append(int(answer_ids is not None and not used))
    return out


def _has_supervised_token(batch: dict[str, list]) -> list[bool]:
    return [any(m) for m in batch["loss_mask"]]


# ----------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_key(tokenizer: Any, config: DataConfig, mask_token_id: int | None = None) -> str:
    """Hash of everything the tokenised dataset depends on: file contents (in order), the tokenizer (its full
    serialised model, special tokens and chat template), max_length, the bad-line policy and the MASK id (examples
    containing it were dropped)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "format": _CACHE_FORMAT_VERSION,
        "mask_token_id": mask_token_id,
        "files": [_sha256_file(p) for p in config.paths],
        "max_length": config.max_length,
        "bad_lines": config.bad_lines,
        "truncated": config.truncated,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_name": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(tokenizer),
        "tokenizer_json": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else None,
        "special_ids": sorted(_special_ids(tokenizer)),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _mask_error(tokenizer: Any, record: Record, ids: list[int], position: int, mask_token_id: int) -> BadLineError:
    """The bad-line report of an example in which the MASK id occurs at token ``position``."""
    token = tokenizer.convert_ids_to_tokens(mask_token_id) if mask_token_id < len(tokenizer) else None
    context = tokenizer.decode(ids[max(0, position - 6) : position + 6])
    return BadLineError(
        record.path, record.line,
        f"the MASK token {mask_token_id} ({token!r}) occurs at token {position} (in {context!r}): the drafter would "
        "read MASK in the clean stream; remove it from the data, or choose another --mask-token-id",
    )


def _rows_with_mask(tokenizer: Any, tokenized: datasets.Dataset, records: list[Record], mask_token_id: int | None,
                    bad_lines: str) -> list[int]:
    """Rows of ``tokenized`` (one per record) in which the MASK id occurs: each reported with its file and line,
    raised as a BadLineError under ``bad_lines="error"``, else returned to be dropped (counted per file)."""
    if mask_token_id is None:
        return []
    positions = tokenized.with_format("arrow")["mask_at"].to_pylist()
    rows = [i for i, pos in enumerate(positions) if pos >= 0]
    per_file: dict[str, int] = {}
    for i in rows:
        error = _mask_error(tokenizer, records[i], tokenized[i]["input_ids"], positions[i], mask_token_id)
        if bad_lines == "error":
            raise error
        logger.warning("skipping example %s", error)
        per_file[records[i].path] = per_file.get(records[i].path, 0) + 1
    for path, n in per_file.items():
        print(f"skipped {n} lines containing the MASK token {mask_token_id} in {path}", file=sys.stderr)
    return rows


def build_dataset(tokenizer: Any, config: DataConfig, mask_token_id: int | None = None) -> datasets.Dataset:
    """Read, validate and tokenise ``config.paths`` into a Dataset with columns ``input_ids`` and
    ``loss_mask`` (lists of ints of equal length ``<= max_length``), in file order then line order.

    Examples without a supervised token within ``max_length`` are dropped (counted and logged). An example in
    which ``mask_token_id`` (the drafter's MASK, :func:`dflash_ds.mask_token.resolve_mask_token`) occurs within
    ``max_length`` is a bad line: skipped and counted with its file and line, or an error, as ``bad_lines`` says.
    Regenerated answers use their stored ids (:func:`tokenize_conversation`); those that no longer decode to their
    text are tokenised from it, with a count. With ``cache_dir`` the result is saved there under a key that changes
    with the file contents, the tokenizer, max_length and the MASK id, and a later call with the same inputs loads
    it without tokenising. Under multi-process training, let one rank build the cache first, then the others load
    it.
    """
    import datasets  # here, not at module level: reading prompts for eval/regenerate must not need it

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_dataset needs a fast tokenizer (offset mappings locate the assistant turns)")
    if not config.paths:
        raise ValueError("DataConfig.paths is empty")

    key = _cache_key(tokenizer, config, mask_token_id)
    cache_path = None
    if config.cache_dir is not None:
        cache_path = os.path.join(config.cache_dir, f"dflash_data_{key}")
        if os.path.isdir(cache_path):
            logger.info("loading tokenised dataset from cache %s", cache_path)
            return datasets.load_from_disk(cache_path)

    records: list[Record] = []
    dropped_truncated = 0
    for path in config.paths:
        read, _ = read_records(path, config.bad_lines)
        kept_here = [r for r in read if not (r.truncated and config.truncated == "drop")]
        dropped_truncated += len(read) - len(kept_here)
        records.extend(kept_here)
    if dropped_truncated:
        print(f"dropped {dropped_truncated} conversations whose answer was cut off at the regeneration token limit "
              "(--truncated drop; 'keep' trains on them without their end-of-turn)", file=sys.stderr)
    if not records:
        why = f" ({dropped_truncated} dropped as truncated: see --truncated)" if dropped_truncated else ""
        raise ValueError(f"no usable conversations in {config.paths}{why}")
    first_chat = next((r.conversation for r in records if not _is_text_record(r.conversation)), None)
    if first_chat is not None:
        check_template_roundtrip(tokenizer, first_chat)

    raw = datasets.Dataset.from_list(
        [{"messages": r.conversation, "truncated": r.truncated, "answer_ids": r.answer_ids} for r in records]
    )
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "loss_mask": datasets.List(datasets.Value("int8")),
         "mask_at": datasets.Value("int32"), "stale_ids": datasets.Value("int8")}
    )
    num_proc = min(config.num_proc, len(records))
    # new_fingerprint: skips hashing the tokenizer passed in fn_kwargs (slow for a 150k vocabulary); our own
    # cache key already covers every input.
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": config.max_length, "mask_token_id": mask_token_id},
        remove_columns=["messages", "truncated", "answer_ids"],
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=f"{key}-tokenize",
        desc="tokenizing",
    )
    stale = sum(tokenized.with_format("arrow")["stale_ids"].to_pylist())
    if stale:
        print(f"{stale} regenerated answers' stored token ids do not decode to their text with this tokenizer "
              "(regenerated with another tokenizer, or the answer was edited): tokenised from the text instead",
              file=sys.stderr)
    with_mask = set(_rows_with_mask(tokenizer, tokenized, records, mask_token_id, config.bad_lines))
    tokenized = tokenized.remove_columns(["mask_at", "stale_ids"])
    if with_mask:
        tokenized = tokenized.select([i for i in range(len(tokenized)) if i not in with_mask],
                                     new_fingerprint=f"{key}-no-mask")
    kept = tokenized.filter(_has_supervised_token, batched=True, new_fingerprint=f"{key}-filter")
    dropped = len(tokenized) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d examples with no assistant token within max_length=%d",
            dropped,
            len(tokenized),
            config.max_length,
        )
    if len(kept) == 0:
        raise ValueError(f"no training examples left in {config.paths} (max_length={config.max_length})")

    if cache_path is None:
        return kept
    # Save under a temporary name, then rename: an interrupted run never leaves a half-written cache behind.
    os.makedirs(config.cache_dir, exist_ok=True)
    tmp_path = f"{cache_path}.tmp-{os.getpid()}"
    kept.save_to_disk(tmp_path)
    try:
        os.rename(tmp_path, cache_path)
    except OSError:
        # Another process finished the same cache first; its copy is identical.
        shutil.rmtree(tmp_path, ignore_errors=True)
    return datasets.load_from_disk(cache_path)


# ----------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------


def sequence_lengths(dataset: datasets.Dataset) -> list[int]:
    """Tokens per example of a :func:`build_dataset` result, read from the Arrow column (no Python lists built)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def collate_batch(examples: Iterable[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one.

    ``examples``: dicts with ``input_ids`` and ``loss_mask`` (lists or 1-D tensors of equal length).
    Returns ``input_ids`` [b, S] (``pad_token_id`` on padding), ``loss_mask`` [b, S] (0 on padding) and
    ``attention_mask`` [b, S] (1 real, 0 padding), all long, ``S`` the longest length.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("collate_batch got no examples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token)")
    lengths = [len(ex["input_ids"]) for ex in examples]
    batch, seq = len(examples), max(lengths)
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((batch, seq), dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    for i, (ex, n) in enumerate(zip(examples, lengths)):
        if len(ex["loss_mask"]) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(ex['loss_mask'])} loss_mask entries")
        input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        loss_mask[i, :n] = torch.as_tensor(ex["loss_mask"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
