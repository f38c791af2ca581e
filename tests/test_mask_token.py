"""The MASK token rule (dflash_ds/mask_token.py), on real byte-level BPE tokenizers with ChatML templates."""

import sysconfig
from pathlib import Path

import pytest

from conftest import CODE_SPECIALS
from dflash_ds.mask_token import MaskChoice, mask_candidates, resolve_mask_token
from dflash_ds.recipes.tokenizer import CHAT_TEMPLATE, train_tokenizer

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()


def tokenizer(specials=None):
    return train_tokenizer([TEXT], vocab_size=300, special_tokens=specials)


def test_mask_token_and_unused_row_come_first():
    with_mask = tokenizer()  # ids 0..3: <|endoftext|>, <|im_start|>, <|im_end|>, <|mask|>
    assert resolve_mask_token(with_mask, len(with_mask)) == MaskChoice(3, "<|mask|>", "tokenizer mask token")
    no_mask = tokenizer(CODE_SPECIALS)
    # a spare embedding row (Qwen3-8B: 151669 of 151936) beats any special token
    assert resolve_mask_token(no_mask, len(no_mask) + 8) == MaskChoice(len(no_mask), None, "unused embedding row")


def test_every_id_used_picks_the_lowest_special_that_chat_text_never_contains():
    tok = tokenizer(CODE_SPECIALS)  # SmolLM2 in miniature: <repo_name>=3, <gh_stars>=4, <file_sep>=5
    choice = resolve_mask_token(tok, len(tok))
    assert choice == MaskChoice(3, "<repo_name>", "unused special token")
    assert [t for _, t in mask_candidates(tok, len(tok))] == ["<repo_name>", "<gh_stars>", "<file_sep>"]


def test_tokens_the_template_names_are_not_candidates():
    # a Qwen3-style template that writes <think> (in a branch the probe conversation may not take)
    tok = tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "<gh_stars>"))
    tok.chat_template = CHAT_TEMPLATE + "{% if enable_thinking %}<think>{% endif %}"
    assert resolve_mask_token(tok, len(tok)) == MaskChoice(4, "<gh_stars>", "unused special token")


def test_no_candidate_is_an_error_naming_the_flag_and_what_was_ruled_out():
    tok = tokenizer(("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    with pytest.raises(ValueError, match="--mask-token-id") as err:
        resolve_mask_token(tok, len(tok))
    assert "'<|im_start|>'" in str(err.value) and "chat template" in str(err.value)


def test_flag_wins_but_not_outside_the_embedding_nor_on_a_chat_token():
    tok = tokenizer(CODE_SPECIALS)
    assert resolve_mask_token(tok, len(tok), explicit=4) == MaskChoice(4, "<gh_stars>", "flag")
    with pytest.raises(ValueError, match=f"--mask-token-id {len(tok)} is outside the embedding"):
        resolve_mask_token(tok, len(tok), explicit=len(tok))
    eos = tok.eos_token_id
    with pytest.raises(ValueError, match=rf"--mask-token-id {eos} \('<\|im_end\|>'\) is the eos token.*candidates: 3"):
        resolve_mask_token(tok, len(tok), explicit=eos)


def test_an_ordinary_token_as_flag_is_refused_naming_the_flag_and_its_text():
    """``--mask-token-id`` of a word the text is full of (here " the") was accepted: every " the" in the clean stream
    would then read as MASK. Refused unless asked for deliberately; spare rows and unused specials still pass."""
    tok = tokenizer(CODE_SPECIALS)
    the = tok.convert_tokens_to_ids("Ġthe")
    assert tok(" the", add_special_tokens=False)["input_ids"] == [the]
    with pytest.raises(ValueError, match=rf"--mask-token-id {the} \('Ġthe'\) is an ordinary vocabulary token "
                                         r"\(the text ' the'\).*candidates: 3 \('<repo_name>'\).*"
                                         r"--allow-ordinary-mask-token"):
        resolve_mask_token(tok, len(tok), explicit=the)
    assert resolve_mask_token(tok, len(tok), explicit=the, allow_ordinary=True) == MaskChoice(the, "Ġthe", "flag")
    assert resolve_mask_token(tok, len(tok) + 2, explicit=len(tok)) == MaskChoice(len(tok), None, "flag")
    assert resolve_mask_token(tok, len(tok), explicit=3) == MaskChoice(3, "<repo_name>", "flag")


def test_a_tokenizer_mask_token_that_is_ordinary_text_is_passed_over():
    """Rule 2 took the tokenizer's ``<|mask|>``/``mask_token`` unchecked: a ``<|mask|>`` added as a plain (non-special)
    token, or a ``mask_token`` that names a vocabulary word, became MASK. Both are text, so the later rules decide
    (and rule 4 does not take the labelled word either)."""
    plain = tokenizer(CODE_SPECIALS)
    plain.add_tokens(["<|mask|>"])  # not special: any "<|mask|>" in a message is this token
    assert resolve_mask_token(plain, len(plain)) == MaskChoice(3, "<repo_name>", "unused special token")

    labelled = tokenizer(CODE_SPECIALS)
    labelled.mask_token = "Ġthe"  # now listed among the special ids, yet " the" still encodes to it
    assert labelled.mask_token_id in labelled.all_special_ids
    assert resolve_mask_token(labelled, len(labelled)) == MaskChoice(3, "<repo_name>", "unused special token")
    assert "Ġthe" not in [t for _, t in mask_candidates(labelled, len(labelled))]
