"""Which token id stands for MASK in the drafter's blocks , and why that one.

The embedding is frozen (the adapter is LoRA on the projections only), so the MASK must be an existing row whose
token chat text never contains: otherwise a MASK in a block reads as real text. The rule, in order:

1. ``flag``: ``--mask-token-id`` (refused if it is bos/eos/pad/unk or a token the chat template writes);
2. ``tokenizer mask token``: the tokenizer's ``<|mask|>`` or ``mask_token``;
3. ``unused embedding row``: the first row past the tokenizer's last id (Qwen3-8B: 151669 of 151936);
4. ``unused special token``: when every row is a token (SmolLM2: 49,152 of 49,152), the lowest-id token the
   tokenizer marks special that is not bos/eos/pad/unk and that the chat template never writes (checked on a
   rendered probe conversation and on the template source). SmolLM2's ids 3-16 are such tokens (``<repo_name>``,
   ``<gh_stars>``, ...: code-dataset markers); the rule picks 3.

None found: an error that names the flag and the special tokens it ruled out and why. The choice and its rule are
recorded in ``dflash.json`` next to the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("flag", "tokenizer mask token", "unused embedding row", "unused special token")
_PROBE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": "v"},
]


@dataclass(frozen=True)
class MaskChoice:
    """The MASK id, its token text (None for an unused embedding row) and which rule of :data:`RULES` chose it."""

    token_id: int
    token: str | None
    rule: str


def _special_tokens(tokenizer) -> dict[int, str]:
    """``{id: text}`` of every token the tokenizer marks special."""
    out = {int(i): t for i, t in zip(getattr(tokenizer, "all_special_ids", []), getattr(tokenizer, "all_special_tokens", []))}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            out[int(i)] = str(tok.content)
    return out


def _template_ids(tokenizer) -> set[int]:
    """Ids a chat-template rendering writes (with and without the generation prompt)."""
    from .data import render_chat  # one rendering function for data, regeneration, eval and this probe

    ids: set[int] = set()
    if getattr(tokenizer, "chat_template", None) is None:
        return ids
    for messages, gen in ((_PROBE, True), (_PROBE[:3], False)):
        ids.update(tokenizer(render_chat(tokenizer, messages, gen), add_special_tokens=False)["input_ids"])
    return ids


def excluded_specials(tokenizer) -> dict[int, str]:
    """``{id: reason}`` for each special token that may not serve as MASK (it can occur in chat text)."""
    reasons: dict[int, str] = {}
    for name in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            reasons[int(tid)] = name
    template = getattr(tokenizer, "chat_template", None) or ""
    written = _template_ids(tokenizer)
    for tid, text in _special_tokens(tokenizer).items():
        if tid in reasons:
            continue
        if tid in written or (text and text in template):
            reasons[tid] = "chat template"
    return reasons


def mask_candidates(tokenizer, vocab_size: int) -> list[tuple[int, str]]:
    """Special tokens chat text never contains, by id: ``[(id, text)]`` (rule 4 takes the first)."""
    excluded = excluded_specials(tokenizer)
    specials = _special_tokens(tokenizer)
    return sorted((i, t) for i, t in specials.items() if i not in excluded and 0 <= i < vocab_size)


def _describe(tokenizer, token_id: int) -> str:
    text = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
    return f"{token_id} ({text!r})" if text is not None else str(token_id)


def resolve_mask_token(tokenizer, vocab_size: int, explicit: int | None = None) -> MaskChoice:
    """Apply the rule of this module's docstring; raises ValueError naming ``--mask-token-id`` when it cannot."""
    if explicit is not None:
        if not 0 <= explicit < vocab_size:
            raise ValueError(f"--mask-token-id {explicit} is outside the embedding (vocab_size {vocab_size})")
        reason = excluded_specials(tokenizer).get(explicit)
        if reason is not None:
            shown = ", ".join(f"{i} ({t!r})" for i, t in mask_candidates(tokenizer, vocab_size)[:8]) or "none"
            raise ValueError(
                f"--mask-token-id {_describe(tokenizer, explicit)} is the {reason} token: chat text contains it, so a "
                f"MASK would read as real text; candidates: {shown}"
            )
        text = tokenizer.convert_ids_to_tokens(explicit) if explicit < len(tokenizer) else None
        return MaskChoice(explicit, text, "flag")
    for candidate in ("<|mask|>", getattr(tokenizer, "mask_token", None)):
        if candidate:
            tid = tokenizer.convert_tokens_to_ids(candidate)
            if tid is not None and tid != tokenizer.unk_token_id and 0 <= tid < vocab_size:
                return MaskChoice(int(tid), candidate, "tokenizer mask token")
    used = len(tokenizer)
    if used < vocab_size:
        return MaskChoice(used, None, "unused embedding row")
    candidates = mask_candidates(tokenizer, vocab_size)
    if candidates:
        tid, text = candidates[0]
        return MaskChoice(tid, text, "unused special token")
    ruled_out = ", ".join(f"{i} ({t!r}: {excluded_specials(tokenizer).get(i)})" for i, t in sorted(_special_tokens(tokenizer).items()))
    raise ValueError(
        f"no MASK token: the tokenizer has no <|mask|> token, all {vocab_size} embedding rows are used, and every "
        f"special token can occur in chat text ({ruled_out or 'none'}); pass --mask-token-id with the id of a token "
        "your chat data never contains, or add a special token to the tokenizer and resize the model's embeddings"
    )
