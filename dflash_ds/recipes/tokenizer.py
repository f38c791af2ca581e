"""The tiny target's tokenizer: byte-level BPE with Qwen2/Qwen3's pre-tokenizer split, ChatML special tokens and the
drafter's ``<|mask|>``, wrapped as a ``transformers`` fast tokenizer with a ChatML chat template.

Public API::

    PAD_TOKEN, IM_START, IM_END, MASK_TOKEN, SPECIAL_TOKENS, CHAT_TEMPLATE, QWEN_SPLIT_PATTERN
    train_tokenizer(texts, vocab_size=4096, special_tokens=None) -> PreTrainedTokenizerFast
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "<|mask|>"
#: Order fixes the ids: pad 0, im_start 1, im_end 2, mask 3 (the BPE merges come after).
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, MASK_TOKEN)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The pre-tokenizer split of Qwen2/Qwen3's tokenizer.json (letters, single digits, punctuation, newline runs,
#: other whitespace runs).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, special_tokens: Sequence[str] | None = None) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a ``transformers`` fast tokenizer.

    Byte-level BPE without a normalizer maps any string to bytes and back, so code (tabs, runs of spaces,
    newlines, non-ASCII) round-trips exactly. Ids 0..3 are the special tokens ``<|endoftext|>`` (pad),
    ``<|im_start|>``, ``<|im_end|>`` (eos, ends every turn) and ``<|mask|>`` (the drafter's MASK token).
    ``special_tokens`` replaces that list (it must start with those three; tests use it to build a tokenizer
    without ``<|mask|>``, like SmolLM2's); ``<|mask|>`` is the mask token only if listed.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if specials[:3] != list(SPECIAL_TOKENS[:3]):
        raise ValueError(f"special_tokens must start with {list(SPECIAL_TOKENS[:3])}, got {specials[:3]}")
    n_base = 256 + len(specials)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be at least {n_base} (bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Qwen2/3's split regex, then bytes. Unlike GPT-2's, it keeps newlines apart from the indentation that
    # follows them, so "assistant\n" + "    return" tokenises the same whether the body is there or not:
    # the generation prompt's ids are a prefix of the full conversation's ids (GPT-2's split merges "\n   "
    # and the model then never sees a lone "\n" before a body, which wrecks chat-prompted generation).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        mask_token=MASK_TOKEN if MASK_TOKEN in specials else None,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,  # the clean-up would eat spaces before punctuation in code
        model_max_length=1_000_000,  # no truncation warnings; the trained context is in tiny_target.json
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped

