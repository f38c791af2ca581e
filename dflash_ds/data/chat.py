"""A conversation through the target's chat template: the one rendering training, regeneration and evaluation
share (:func:`render_chat`), the assistant spans located in the rendered text, and the token ids with their loss
mask (:func:`tokenize_conversation`), stored answer ids standing in for a regenerated answer's text."""

from __future__ import annotations

from typing import Any

from .records import TEXT_ROLE, Conversation

# Stands in for each assistant content while rendering the template; the template's own text around it
# then tells us exactly where the content lands (see _assistant_spans).
_PLACEHOLDER = "\ue000DFLASH_ASSISTANT_TURN_{}\ue001"


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


def is_text_record(messages: Conversation) -> bool:
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


def special_ids(tokenizer: Any) -> set[int]:
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
    if is_text_record(messages):
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
    mask = _loss_mask(ids, offsets, full, spans, special_ids(tokenizer), truncated)
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
