"""Self-distillation keeps what the target wrote: regeneration stops where evaluation stops (every eos id of the
tokenizer and the generation config), and training sees the target's own token ids, not its text tokenised again."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from dflash_ds import regenerate
from dflash_ds.data import DataConfig, build_dataset, render_chat, tokenize_conversation
from dflash_ds.recipes.tokenizer import train_tokenizer

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
_CPU = type("CpuModel", (), {"device": torch.device("cpu")})()  # regenerate reads nothing else of the model here


@pytest.fixture(scope="module")
def tok():
    """The tiny target's tokenizer (byte-level BPE, ChatML, <|im_end|> = eos = 2, <|mask|> = 3)."""
    return train_tokenizer([TEXT], vocab_size=300)


def split_merges(tokenizer, text: str) -> list[int]:
    """Ids that decode to ``text`` but are not what tokenising ``text`` gives: every merged token of ``text`` is
    written as its single bytes. A model may well emit such ids (nothing makes it pick the merged token), and
    decoding then tokenising again returns the merged ones: the round trip is not the identity."""
    ids = []
    for token in tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]):
        ids += tokenizer.convert_tokens_to_ids(list(token))  # byte-level: one character per byte
    assert tokenizer.decode(ids) == text
    assert ids != tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


class ScriptedLM:
    """Stands in for ``regenerate.greedy_stream``: answers the k-th prompt given with ``answers[k]``."""

    def __init__(self, answers: list[list[int]]) -> None:
        self.answers, self.prompts = list(answers), []

    def __call__(self, model, prompts, max_new_tokens, eos_ids, batch_size):
        for k, ids in enumerate(prompts):
            self.prompts.append(list(ids))
            yield k, self.answers.pop(0)[:max_new_tokens]


def test_regeneration_stops_on_the_generation_config_eos_as_evaluation_does(tmp_path):
    """A target whose generation config names an eos the tokenizer does not (Llama 3: <|eot_id|> beside
    <|end_of_text|>): regeneration stopped on the tokenizer's eos only, so it wrote past the end evaluation stops
    at, up to the token limit, and recorded the answer as cut off. Now every record is what ``generate`` gives with
    evaluation's eos ids (:func:`eos_ids_of`), and its stored ids are those tokens."""
    from conftest import write_conversations, write_tiny_target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dflash_ds.evaluate import render_prompt
    from dflash_ds.speculative import eos_ids_of

    model_dir = write_tiny_target(tmp_path / "model")
    data = write_conversations(tmp_path / "data.jsonl", n=4)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [render_prompt(tokenizer, regenerate.prompt_messages(json.loads(line)["conversations"]))
               for line in data.read_text().splitlines()]

    def generate(ids: list[int], eos: list[int] | None) -> list[int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
        return out[0, len(ids):].tolist()

    free = generate(prompts[0], None)
    stop = next(t for k, t in enumerate(free) if k >= 2 and t not in free[:k] and t != tokenizer.eos_token_id)
    gen = GenerationConfig.from_pretrained(model_dir)
    gen.eos_token_id = [stop]  # the generation config's own eos, not the tokenizer's (2)
    gen.save_pretrained(model_dir)
    model.generation_config = gen
    eos = eos_ids_of(tokenizer, model)
    assert eos == sorted({tokenizer.eos_token_id, stop})

    out = tmp_path / "regen.jsonl"
    regenerate.regenerate_file(str(model_dir), str(data), str(out), max_new_tokens=8, batch_size=2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(prompts)
    for prompt, record in zip(prompts, records):
        ref = generate(prompt, eos)
        ended = ref[-1] in eos
        assert record["truncated"] is not ended
        assert record["answer_ids"] == (ref[:-1] if ended else ref)
        text = tokenizer.decode(record["answer_ids"], skip_special_tokens=True)
        assert record["conversations"][-1]["content"] == text
    assert records[0]["truncated"] is False and stop not in records[0]["answer_ids"]


def test_training_uses_the_targets_own_ids_where_its_text_would_tokenise_differently(tok, tmp_path, monkeypatch):
    """The target wrote ids that decode to the answer but are not what the answer tokenises to. Regeneration stored
    only the text, so training learnt the re-tokenised ids the target never wrote. Now the example is exactly the
    prompt the target answered, its ids, and the template's end-of-turn, supervised as before."""
    answer_text = "        return the text"
    written = split_merges(tok, answer_text)
    lm = ScriptedLM([written + [tok.eos_token_id]])
    monkeypatch.setattr(regenerate, "greedy_stream", lm)
    convs = [[{"role": "user", "content": "def f(text):"}, {"role": "assistant", "content": "human answer"}]]
    records, _ = regenerate.regenerate_conversations(_CPU, tok, convs, max_new_tokens=64, progress=False)
    record = records[0][1]
    assert record["conversations"][-1]["content"] == answer_text  # the text stays, for humans
    path = tmp_path / "regen.jsonl"
    path.write_text(json.dumps(record) + "\n")

    example = build_dataset(tok, DataConfig(paths=[str(path)]))[0]
    end_of_turn = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == lm.prompts[0] + written + end_of_turn
    assert example["loss_mask"] == [0] * len(lm.prompts[0]) + [1] * (len(written) + 1) + [0]


def test_stored_ids_keep_the_mask_of_earlier_turns_and_of_a_cut_off_answer(tok):
    """Only the last answer's tokens change: earlier turns are masked as the text path masks them, the end-of-turn
    is supervised unless the answer was cut off at the token limit."""
    messages = [{"role": "user", "content": "def a():"}, {"role": "assistant", "content": "    return 1"},
                {"role": "user", "content": "def b(text):"}, {"role": "assistant", "content": "    return the text"}]
    written = split_merges(tok, messages[-1]["content"])
    text_path = tokenize_conversation(tok, messages, max_length=512)
    head = tok(render_chat(tok, messages[:3], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert text_path["input_ids"][: len(head)] == head  # so the text path's mask of the earlier turns applies

    for truncated in (False, True):
        ex = tokenize_conversation(tok, messages, max_length=512, truncated=truncated, answer_ids=written)
        n = len(head) + len(written)
        assert ex["input_ids"] == head + written + text_path["input_ids"][-2:]  # <|im_end|> "\n"
        assert ex["loss_mask"][: len(head)] == text_path["loss_mask"][: len(head)]
        assert sum(text_path["loss_mask"][: len(head)]) > 0  # the first answer is supervised
        assert ex["loss_mask"][len(head) : n] == [1] * len(written)
        assert ex["loss_mask"][n:] == ([0, 0] if truncated else [1, 0])
    short = tokenize_conversation(tok, messages, max_length=len(head) + 3, answer_ids=written)
    assert short["input_ids"] == (head + written)[: len(head) + 3]


def test_stored_ids_of_another_text_fall_back_to_the_text_and_are_counted(tok, tmp_path, capsys):
    """Ids that do not decode to the record's text (regenerated with another tokenizer, or the answer edited since)
    are not trusted: the text is tokenised, and the build says how many."""
    from dflash_ds.data import tokenize_with_stored_answer

    messages = [{"role": "user", "content": "def f(text):"}, {"role": "assistant", "content": "    return the text"}]
    other = tok("    return width", add_special_tokens=False)["input_ids"]
    example, used = tokenize_with_stored_answer(tok, messages, 512, answer_ids=other)
    assert not used and example == tokenize_conversation(tok, messages, max_length=512)
    path = tmp_path / "edited.jsonl"
    path.write_text(json.dumps({"conversations": messages, "truncated": False, "answer_ids": other}) + "\n")
    assert len(build_dataset(tok, DataConfig(paths=[str(path)]))) == 1
    assert "1 regenerated answers' stored token ids do not decode to their text" in capsys.readouterr().err


@pytest.mark.parametrize("answer_ids,reason", [([], "non-empty list"), (["a"], "non-empty list"),
                                               ([1, -2], "non-empty list"), (7, "non-empty list")])
def test_malformed_stored_ids_are_bad_lines(tok, tmp_path, answer_ids, reason):
    from dflash_ds.data import BadLineError

    path = tmp_path / "bad.jsonl"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"conversations": conv, "answer_ids": answer_ids}) + "\n")
    with pytest.raises(BadLineError, match=rf"bad.jsonl:1: 'answer_ids' must be a {reason}"):
        build_dataset(tok, DataConfig(paths=[str(path)], bad_lines="error"))
