"""Which token id stands for MASK in the drafter's blocks , and why that one.

The embedding is frozen (the adapter is LoRA on the projections only), so the MASK must be an existing row whose
token chat text never contains: otherwise a MASK in a block reads as real text. The rule, in order:

1. ``flag``: ``--mask-token-id`` (refused if it is bos/eos/pad/unk, a token the chat template writes, or an
   ordinary vocabulary token, see below);
2. ``tokenizer mask token``: the tokenizer's ``<|mask|>`` or ``mask_token``, if it is a special token chat text
   never contains (a ``mask_token`` that names an ordinary token such as ``" the"`` is passed over);
3. ``unused embedding row``: the first row past the tokenizer's last id (Qwen3-8B: 151669 of 151936);
4. ``unused special token``: when every row is a token (SmolLM2: 49,152 of 49,152), the lowest-id token the
   tokenizer marks special that is not bos/eos/pad/unk and that the chat template never writes (checked on a
   rendered probe conversation and on the template source). SmolLM2's ids 3-16 are such tokens (``<repo_name>``,
   ``<gh_stars>``, ...: code-dataset markers); the rule picks 3.

None found: an error that names the flag and the special tokens it ruled out and why. The choice and its rule are
recorded in ``dflash.json`` next to the adapter.

An *ordinary* token is one plain text produces: any token not marked special, or one marked special whose own text
still encodes to it with special-token matching off (a vocabulary word merely labelled ``mask_token``). As MASK it
would read as that word wherever the word occurs, so the drafter could not tell "unknown" from real text. The only
way to use one anyway is deliberate: ``allow_ordinary=True`` (the train flag :data:`ALLOW_ORDINARY_FLAG`), meant
for a tokenizer with neither a spare embedding row nor an unused special token; training data in which it occurs
is then reported line by line (:func:`dflash_ds.data.build_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from .data import render_chat  # one rendering function for data, regeneration, eval and the template probe

RULES = ("flag", "tokenizer mask token", "unused embedding row", "unused special token")
#: The train flag that passes ``allow_ordinary=True`` (an explicit ordinary token as MASK, knowingly).
ALLOW_ORDINARY_FLAG = "--allow-ordinary-mask-token"
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


def is_ordinary_token(tokenizer, token_id: int) -> bool:
    """Whether plain text can produce ``token_id``: it is not marked special, or its own text still encodes to it
    with special-token matching off (a vocabulary token labelled special after the fact). An id past the
    tokenizer's last token (an unused embedding row) is not a token at all: False."""
    if not 0 <= token_id < len(tokenizer):
        return False
    added = (getattr(tokenizer, "added_tokens_decoder", None) or {}).get(token_id)
    if added is None or not getattr(added, "special", False):
        return True
    # a byte-level piece of a multi-byte character decodes to U+FFFD and would fail this test, but such pieces are
    # never marked special, so they were answered above
    text = tokenizer.decode([token_id])
    return token_id in tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def mask_candidates(tokenizer, vocab_size: int) -> list[tuple[int, str]]:
    """Special tokens chat text never contains, by id: ``[(id, text)]`` (rule 4 takes the first)."""
    excluded = excluded_specials(tokenizer)
    specials = _special_tokens(tokenizer)
    return sorted((i, t) for i, t in specials.items()
                  if i not in excluded and 0 <= i < vocab_size and not is_ordinary_token(tokenizer, i))


def _describe(tokenizer, token_id: int) -> str:
    text = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
    return f"{token_id} ({text!r})" if text is not None else str(token_id)


def _shown_candidates(tokenizer, vocab_size: int) -> str:
    """The first few rule-4 candidates, and the spare embedding rows if any, for an error message."""
    shown = [f"{i} ({t!r})" for i, t in mask_candidates(tokenizer, vocab_size)[:8]]
    if len(tokenizer) < vocab_size:
        shown.append(f"an unused embedding row {len(tokenizer)}..{vocab_size - 1}")
    return ", ".join(shown) or "none"


def _check_explicit(tokenizer, vocab_size: int, explicit: int, allow_ordinary: bool) -> MaskChoice:
    """Rule 1: ``--mask-token-id`` as given, or ValueError naming the flag and the token when chat text can contain
    it (bos/eos/pad/unk, a token the template writes, or an ordinary token unless ``allow_ordinary``)."""
    if not 0 <= explicit < vocab_size:
        raise ValueError(f"--mask-token-id {explicit} is outside the embedding (vocab_size {vocab_size})")
    reason = excluded_specials(tokenizer).get(explicit)
    if reason is not None:
        raise ValueError(
            f"--mask-token-id {_describe(tokenizer, explicit)} is the {reason} token: chat text contains it, so a "
            f"MASK would read as real text; candidates: {_shown_candidates(tokenizer, vocab_size)}"
        )
    if is_ordinary_token(tokenizer, explicit) and not allow_ordinary:
        raise ValueError(
            f"--mask-token-id {_describe(tokenizer, explicit)} is an ordinary vocabulary token (the text "
            f"{tokenizer.decode([explicit])!r}): text produces it, so a MASK would read as real text wherever it "
            f"occurs; candidates: {_shown_candidates(tokenizer, vocab_size)}. Only if the tokenizer has no other "
            f"choice, add {ALLOW_ORDINARY_FLAG} to use it anyway (training lines containing it are then reported)"
        )
    text = tokenizer.convert_ids_to_tokens(explicit) if explicit < len(tokenizer) else None
    return MaskChoice(explicit, text, "flag")


def _tokenizer_mask_token(tokenizer, vocab_size: int) -> MaskChoice | None:
    """Rule 2: the tokenizer's ``<|mask|>`` or ``mask_token`` when it is a special token chat text never contains;
    a ``mask_token`` that is an ordinary token (or bos/eos/...) is passed over, so the later rules decide."""
    excluded = excluded_specials(tokenizer)
    for candidate in ("<|mask|>", getattr(tokenizer, "mask_token", None)):
        if not candidate:
            continue
        tid = tokenizer.convert_tokens_to_ids(candidate)
        if tid is None or tid == tokenizer.unk_token_id or not 0 <= tid < vocab_size:
            continue
        if int(tid) in excluded or is_ordinary_token(tokenizer, int(tid)):
            continue
        return MaskChoice(int(tid), candidate, "tokenizer mask token")
    return None


def resolve_mask_token(tokenizer, vocab_size: int, explicit: int | None = None,
                       allow_ordinary: bool = False) -> MaskChoice:
    """Apply the rule of this module's docstring; raises ValueError naming ``--mask-token-id`` when it cannot.
    ``allow_ordinary``: accept an ``explicit`` id that is an ordinary token (the deliberate escape hatch)."""
    if explicit is not None:
        return _check_explicit(tokenizer, vocab_size, explicit, allow_ordinary)
    choice = _tokenizer_mask_token(tokenizer, vocab_size)
    if choice is not None:
        return choice
    used = len(tokenizer)
    if used < vocab_size:
        return MaskChoice(used, None, "unused embedding row")
    candidates = mask_candidates(tokenizer, vocab_size)
    if candidates:
        tid, text = candidates[0]
        return MaskChoice(tid, text, "unused special token")
    ruled_out = ", ".join(f"{i} ({t!r}: {excluded_specials(tokenizer).get(i, 'ordinary token')})"
                          for i, t in sorted(_special_tokens(tokenizer).items()))
    raise ValueError(
        f"no MASK token: the tokenizer has no <|mask|> token, all {vocab_size} embedding rows are used, and every "
        f"special token can occur in chat text ({ruled_out or 'none'}); add a special token to the tokenizer and "
        "resize the model's embeddings, or, as a last resort, pass --mask-token-id with a token your chat data "
        f"never contains together with {ALLOW_ORDINARY_FLAG}"
    )
