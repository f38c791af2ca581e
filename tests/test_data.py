"""Tests for dflash_ds.data: reading JSONL, chat-template loss masks, the cached dataset and collation."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import dflash_ds.data as data
from dflash_ds.data import (
    sequence_lengths,
    BadLineError,
    DataConfig,
    build_dataset,
    check_template_roundtrip,
    collate_batch,
    read_conversations,
    tokenize_conversation,
)

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# Qwen3's chat template (Qwen3-0.6B/8B tokenizer_config.json, tool branches kept): no {% generation %} markers,
# and the last assistant turn after the last user query gets an empty "<think>\n\n</think>\n\n" block.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

CORPUS = [
    "hello world how are you today",
    "the quick brown fox jumps over the lazy dog",
    "user assistant system answer question",
    "what is two plus two? it is four.",
]


def _make_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE with Qwen-like special tokens (<think> tokens are added but not special, as in Qwen3)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _make_tokenizer()


@pytest.fixture(scope="module")
def qwen_tok() -> PreTrainedTokenizerFast:
    return _make_tokenizer(QWEN3)


def _masked_runs(tokenizer, example) -> list[str]:
    """Decode each contiguous run of loss_mask == 1 tokens."""
    runs, current = [], []
    for token, m in zip(example["input_ids"], example["loss_mask"]):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def _write_jsonl(path: Path, records: list) -> Path:
    """records: dicts are JSON-encoded, str/bytes are written verbatim (for malformed lines)."""
    with open(path, "wb") as f:
        for r in records:
            if isinstance(r, bytes):
                f.write(r + b"\n")
            elif isinstance(r, str):
                f.write(r.encode() + b"\n")
            else:
                f.write(json.dumps(r).encode() + b"\n")
    return path


def _conv(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


# ------------------------------------------------------------------------------------------------ loss masks


def test_mask_covers_assistant_content_and_end_of_turn(tok):
    messages = [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "it is four."}]
    ex = tokenize_conversation(tok, messages, max_length=512)
    assert len(ex["input_ids"]) == len(ex["loss_mask"])
    assert _masked_runs(tok, ex) == ["it is four.<|im_end|>"]
    # Everything before (user turn, "<|im_start|>assistant\n" header) and the trailing "\n" are unmasked.
    first = ex["loss_mask"].index(1)
    assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert ex["loss_mask"][-1] == 0 and tok.decode(ex["input_ids"][-1:]) == "\n"


def test_multiple_assistant_turns_and_system_unmasked(tok):
    messages = [
        {"role": "system", "content": "you are a fox"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "the lazy dog jumps"},
    ]
    ex = tokenize_conversation(tok, messages, max_length=512)
    assert _masked_runs(tok, ex) == ["hello world<|im_end|>", "the lazy dog jumps<|im_end|>"]
    unmasked = tok.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if not m])
    assert "you are a fox" in unmasked and "how are you?" in unmasked


def test_assistant_content_equal_to_role_name(tok):
    # A content that also occurs in the role header must still be located in the right place.
    messages = [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant"}]
    ex = tokenize_conversation(tok, messages, max_length=512)
    assert _masked_runs(tok, ex) == ["assistant<|im_end|>"]
    assert tok.decode(ex["input_ids"][: ex["loss_mask"].index(1)]).endswith("<|im_start|>assistant\n")


def test_text_record_fully_masked(tok):
    messages = [{"role": data.TEXT_ROLE, "content": "<|im_start|>user\nhello<|im_end|>\nthe fox"}]
    ex = tokenize_conversation(tok, messages, max_length=512)
    assert ex["loss_mask"] == [1] * len(ex["input_ids"])
    assert tok.decode(ex["input_ids"], skip_special_tokens=False) == messages[0]["content"]


def test_truncation(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the quick brown fox jumps"}]
    full = tokenize_conversation(tok, messages, max_length=512)
    assert len(full["input_ids"]) > 12
    short = tokenize_conversation(tok, messages, max_length=12)
    assert len(short["input_ids"]) == 12 and len(short["loss_mask"]) == 12
    assert short["input_ids"] == full["input_ids"][:12]
    assert short["loss_mask"] == full["loss_mask"][:12]
    text = tokenize_conversation(tok, [{"role": "text", "content": "the quick brown fox jumps"}], max_length=3)
    assert len(text["input_ids"]) == 3 and text["loss_mask"] == [1, 1, 1]


def test_ids_match_apply_chat_template(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    reference = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert tokenize_conversation(tok, messages, max_length=512)["input_ids"] == list(reference)
    check_template_roundtrip(tok, messages)


def test_roundtrip_check_catches_double_bos():
    tokenizer = _make_tokenizer("{{ bos_token }}" + CHATML)
    tokenizer.bos_token = "<|endoftext|>"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    check_template_roundtrip(tokenizer, messages)  # template writes BOS once: consistent
    # A tokenize_conversation that added the tokenizer's own special tokens would give BOS twice.
    original = tokenizer.__class__.__call__

    def with_extra_bos(self, text, **kwargs):
        out = original(self, text, **kwargs)
        if kwargs.get("return_offsets_mapping"):
            out["input_ids"] = [self.bos_token_id] + out["input_ids"]
            out["offset_mapping"] = [(0, 0)] + out["offset_mapping"]
        return out

    tokenizer.__class__ = type("Patched", (tokenizer.__class__,), {"__call__": with_extra_bos})
    with pytest.raises(ValueError, match="differs from apply_chat_template"):
        check_template_roundtrip(tokenizer, messages)


def test_qwen3_template_masks_content_not_think_block(qwen_tok):
    messages = [
        {"role": "system", "content": "you are a fox"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "the lazy dog"},
    ]
    rendered = qwen_tok.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nthe lazy dog<|im_end|>" in rendered
    ex = tokenize_conversation(qwen_tok, messages, max_length=512)
    assert _masked_runs(qwen_tok, ex) == ["hello world<|im_end|>", "the lazy dog<|im_end|>"]
    check_template_roundtrip(qwen_tok, messages)


def test_qwen3_template_rewritten_content_falls_back_to_search(qwen_tok):
    # Qwen3 strips the leading newline of the last turn and moves inline reasoning into the think block.
    leading_newline = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "\nthe fox"}]
    ex = tokenize_conversation(qwen_tok, leading_newline, max_length=512)
    assert _masked_runs(qwen_tok, ex) == ["the fox<|im_end|>"]

    reasoning = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>two plus two</think>four"}]
    ex = tokenize_conversation(qwen_tok, reasoning, max_length=512)
    assert _masked_runs(qwen_tok, ex) == ["four<|im_end|>"]


def test_template_that_rewrites_content_is_an_error():
    tokenizer = _make_tokenizer(CHATML.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"))
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    with pytest.raises(ValueError, match="cannot locate assistant message 1"):
        tokenize_conversation(tokenizer, messages, max_length=512)


# ------------------------------------------------------------------------------------------------ reading


def test_read_accepts_conversations_messages_and_text(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            _conv(("user", "a"), ("assistant", "b")),
            "",
            "   ",
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}]},
            {"text": "plain text"},
        ],
    )
    conversations, skipped = read_conversations(path, bad_lines="error")
    assert skipped == 0
    assert conversations == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}],
        [{"role": "text", "content": "plain text"}],
    ]


BAD_LINES = {
    "invalid_json": ('{"conversations": [', "invalid JSON"),
    "not_object": ("[1, 2]", "expected a JSON object"),
    "missing_keys": ({"prompt": "x"}, "missing 'conversations', 'messages' or 'text'"),
    "unknown_role": (_conv(("user", "a"), ("bot", "b")), "unknown role 'bot' (expected system/user/assistant)"),
    "content_not_string": ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}, "messages[0] has no string content"),
    "content_missing": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "messages[0] has no string content"),
    "empty_content": (_conv(("user", "a"), ("assistant", "  ")), "empty content in conversations[1]"),
    "no_assistant": (_conv(("system", "s"), ("user", "a")), "no assistant turn"),
    "empty_text": ({"text": ""}, "empty content"),
    "not_utf8": (b'{"text": "caf\xe9"}', "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_error_names_file_and_line(tmp_path, case):
    bad, reason = BAD_LINES[case]
    good = _conv(("user", "a"), ("assistant", "b"))
    path = _write_jsonl(tmp_path / "data.jsonl", [good, "", bad, good])  # the bad line is line 3
    with pytest.raises(BadLineError) as info:
        read_conversations(path, bad_lines="error")
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)
    assert info.value.lineno == 3 and info.value.path == str(path)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_skipped_and_counted(tmp_path, case, caplog, capsys):
    bad, reason = BAD_LINES[case]
    good = _conv(("user", "a"), ("assistant", "b"))
    path = _write_jsonl(tmp_path / "data.jsonl", [good, bad, good, bad])
    with caplog.at_level(logging.WARNING, logger="dflash_ds.data"):
        conversations, skipped = read_conversations(path, bad_lines="skip")
    assert skipped == 2 and len(conversations) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"{path}:2: " in warnings[0] and f"{path}:4: " in warnings[1] and reason in warnings[0]
    assert f"skipped 2 bad lines in {path}" in capsys.readouterr().err


def test_unknown_policy_is_rejected(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [_conv(("user", "a"), ("assistant", "b"))])
    with pytest.raises(ValueError, match="--bad-lines"):
        read_conversations(path, bad_lines="ignore")
    with pytest.raises(ValueError, match="--bad-lines"):
        DataConfig(paths=[str(path)], bad_lines="warn")


# ------------------------------------------------------------------------------------------------ collate


def test_collate_right_pads():
    examples = [
        {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]},
        {"input_ids": [8], "loss_mask": [1]},
    ]
    batch = collate_batch(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "loss_mask", "attention_mask"}
    for value in batch.values():
        assert value.shape == (2, 3) and value.dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError):
        collate_batch([{"input_ids": [1, 2], "loss_mask": [1]}], pad_token_id=0)


# ------------------------------------------------------------------------------------------------ dataset


def _two_files(tmp_path: Path) -> list[str]:
    a = _write_jsonl(
        tmp_path / "a.jsonl",
        [_conv(("user", "hello"), ("assistant", "first")), _conv(("user", "hi"), ("assistant", "second"))],
    )
    b = _write_jsonl(
        tmp_path / "b.jsonl",
        ["not json", {"text": "third"}, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "fourth"}]}],
    )
    return [str(a), str(b)]


def _answers(tokenizer, dataset) -> list[str]:
    return ["".join(_masked_runs(tokenizer, row)).replace("<|im_end|>", "") for row in dataset]


def test_build_dataset_order_and_columns(tok, tmp_path):
    paths = _two_files(tmp_path)
    ds = build_dataset(tok, DataConfig(paths=paths))
    assert ds.column_names == ["input_ids", "loss_mask"]
    assert _answers(tok, ds) == ["first", "second", "third", "fourth"]
    row = ds[0]
    assert isinstance(row["input_ids"], list) and all(isinstance(t, int) for t in row["input_ids"])
    assert row == tokenize_conversation(tok, read_conversations(paths[0])[0][0], 2048)
    # The given file order wins over name order.
    assert _answers(tok, build_dataset(tok, DataConfig(paths=paths[::-1]))) == ["third", "fourth", "first", "second"]
    assert sequence_lengths(ds) == [len(r["input_ids"]) for r in ds]
    # a filtered (index-mapped) dataset: lengths of the rows it shows, not of the underlying table
    picked = ds.select([3, 1])
    assert sequence_lengths(picked) == [len(ds[3]["input_ids"]), len(ds[1]["input_ids"])]


def test_build_dataset_multiprocess_matches_single(tok, tmp_path):
    paths = _two_files(tmp_path)
    single = build_dataset(tok, DataConfig(paths=paths))
    multi = build_dataset(tok, DataConfig(paths=paths, num_proc=2))
    assert multi.to_list() == single.to_list()


def test_build_dataset_drops_examples_without_supervision(tok, tmp_path, caplog):
    long_prompt = "the quick brown fox jumps over the lazy dog " * 4
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [_conv(("user", long_prompt), ("assistant", "late")), _conv(("user", "hi"), ("assistant", "early"))],
    )
    with caplog.at_level(logging.WARNING, logger="dflash_ds.data"):
        ds = build_dataset(tok, DataConfig(paths=[str(path)], max_length=24))
    assert _answers(tok, ds) == ["early"]
    assert all(len(row["input_ids"]) <= 24 for row in ds)
    assert any("dropped 1 of 2" in r.getMessage() for r in caplog.records)


def test_build_dataset_error_policy_raises(tok, tmp_path):
    paths = _two_files(tmp_path)
    with pytest.raises(BadLineError, match=r"b\.jsonl:1: invalid JSON"):
        build_dataset(tok, DataConfig(paths=paths, bad_lines="error"))


def test_build_dataset_cache_reuse_and_invalidation(tok, tmp_path, monkeypatch):
    paths = _two_files(tmp_path)
    cache = tmp_path / "cache"
    calls = []
    original = data.tokenize_conversation

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(data.chat, "tokenize_conversation", counting)  # check_template_roundtrip calls it

    first = build_dataset(tok, DataConfig(paths=paths, cache_dir=str(cache)))
    assert len(calls) > 0
    entries = sorted(os.listdir(cache))
    assert len(entries) == 1 and entries[0].startswith("dflash_data_")

    calls.clear()
    again = build_dataset(tok, DataConfig(paths=paths, cache_dir=str(cache)))
    assert calls == [] and again.to_list() == first.to_list()

    shorter = build_dataset(tok, DataConfig(paths=paths, cache_dir=str(cache), max_length=8))
    assert len(calls) > 0 and len(os.listdir(cache)) == 2
    assert all(len(row["input_ids"]) <= 8 for row in shorter)

    # Changing a file's contents invalidates the cache too.
    calls.clear()
    _write_jsonl(Path(paths[0]), [_conv(("user", "hello"), ("assistant", "changed"))])
    changed = build_dataset(tok, DataConfig(paths=paths, cache_dir=str(cache)))
    assert len(calls) > 0 and _answers(tok, changed)[0] == "changed"
    assert len(os.listdir(cache)) == 3

    # So does a different chat template.
    calls.clear()
    build_dataset(_make_tokenizer(QWEN3), DataConfig(paths=paths, cache_dir=str(cache)))
    assert len(calls) > 0 and len(os.listdir(cache)) == 4


# ------------------------------------------------------------------------------------------------ self-distillation


_CPU = type("CpuModel", (), {"device": torch.device("cpu")})()  # all regenerate reads of the model besides greedy_stream


class _ScriptedLM:
    """Stands in for greedy decoding in regenerate (``regenerate.greedy_stream``): records the prompts it is given
    and answers the k-th prompt, in the order given, with ``answers[k]`` cut at ``max_new_tokens``."""

    def __init__(self, answers: list[list[int]]) -> None:
        self.answers, self.prompts = list(answers), []

    def __call__(self, model, prompts, max_new_tokens, eos_id, batch_size):
        for k, ids in enumerate(prompts):
            self.prompts.append(list(ids))
            yield k, self.answers.pop(0)[:max_new_tokens]


def test_regenerate_renders_prompts_like_training_and_eval(qwen_tok, monkeypatch):
    """Qwen3: without enable_thinking=False the generation prompt lacks the empty think block, so the target
    wrote thinking traces that evaluation never asks for (the old regenerate did exactly that)."""
    from dflash_ds import regenerate
    from dflash_ds.evaluate import render_prompt

    convs = [[{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four"}]]
    answer = qwen_tok("it is four.", add_special_tokens=False)["input_ids"] + [qwen_tok.eos_token_id]
    lm = _ScriptedLM([answer])
    monkeypatch.setattr(regenerate, "greedy_stream", lm)
    records, _ = regenerate.regenerate_conversations(_CPU, qwen_tok, convs, max_new_tokens=32, progress=False)
    assert lm.prompts == [render_prompt(qwen_tok, convs[0][:1])]
    assert "<think>\n\n</think>" in qwen_tok.decode(lm.prompts[0])
    # the training tokenisation of the regenerated conversation starts with exactly that prompt
    example = tokenize_conversation(qwen_tok, records[0][1]["conversations"], max_length=512)
    assert example["input_ids"][: len(lm.prompts[0])] == lm.prompts[0]


def test_truncated_answers_are_recorded_then_kept_without_end_of_turn_or_dropped(tok, tmp_path, monkeypatch):
    """An answer cut off at max_new_tokens: regenerate marks it; training keeps it by default without a loss on its
    end-of-turn token (written by the template, never by the target), or drops it under 'drop'."""
    from dflash_ds import regenerate

    eos = tok.eos_token_id
    words = tok("the quick brown fox jumps over the lazy dog", add_special_tokens=False)["input_ids"]
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": "x"}] for q in ("hello", "what is")]
    # longest prompt first: "what is" gets the finished answer, "hello" the one that runs past the limit
    monkeypatch.setattr(regenerate, "greedy_stream", _ScriptedLM([words[:3] + [eos], words * 3]))
    records, stats = regenerate.regenerate_conversations(_CPU, tok, convs, max_new_tokens=len(words) + 2,
                                                         progress=False)
    assert [r["truncated"] for _, r in records] == [True, False] and stats.truncated == 1
    assert stats.new_tokens == (len(words) + 2) + 4  # the cut answer's tokens + the finished one's with its eos
    path = _write_jsonl(tmp_path / "regen.jsonl", [r for _, r in records])

    dropped = build_dataset(tok, DataConfig(paths=[str(path)], truncated="drop"))
    assert len(dropped) == 1
    kept = build_dataset(tok, DataConfig(paths=[str(path)]))
    assert len(kept) == 2
    cut, done = kept[0], kept[1]
    assert _masked_runs(tok, done)[-1].endswith("<|im_end|>")
    assert not _masked_runs(tok, cut)[-1].endswith("<|im_end|>")
    assert cut["loss_mask"].count(1) > 5  # the cut answer itself is still supervised
    with pytest.raises(ValueError, match="--truncated"):
        DataConfig(paths=[str(path)], truncated="maybe")


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_greedy_stream_equals_generate_while_rows_leave_and_refill(family):
    """Continuous batching: rows end at different steps (an eos some write early, the token limit for others),
    their slots take the next prompts (longer and shorter than the rows they join), and every row still gets what
    ``generate`` gives that prompt alone."""
    from conftest import tiny_model

    from dflash_ds.regenerate import greedy_stream

    model = tiny_model(family, seed=3, initializer_range=0.2)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 96, (n,), generator=gen).tolist() for n in (9, 4, 7, 1, 12, 3, 6)]

    def alone(ids, eos=None):
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
        row = out[0, len(ids):].tolist()
        return row[: row.index(eos) + 1] if eos is not None and eos in row else row

    free = [alone(p) for p in prompts]
    # an eos that some rows write early and others never: rows must leave the batch mid-way
    eos = next(t for t in (r[2] for r in free) if 0 < sum(t in r[:9] for r in free) < len(free))
    ref = {i: alone(p, eos) for i, p in enumerate(prompts)}
    got = dict(greedy_stream(model, prompts, 12, eos, batch_size=3))
    assert got == ref
    lengths = [len(r) for r in ref.values()]
    assert min(lengths) < 12 and max(lengths) == 12  # both ways of ending happened
    # each row is yielded the moment it ends: the first to come out is one of the shortest answers of the first batch
    first = next(iter(greedy_stream(model, prompts, 12, eos, batch_size=3)))[0]
    assert len(ref[first]) == min(len(ref[i]) for i in range(3))


def test_regenerate_resumes_an_interrupted_run(tmp_path, monkeypatch):
    """Killed after some answers (and mid-line): the rerun answers only the rest and writes what one run writes."""
    from conftest import write_conversations, write_tiny_target

    from dflash_ds import regenerate

    model_dir = write_tiny_target(tmp_path / "model")
    data = write_conversations(tmp_path / "data.jsonl", n=10)
    clean = tmp_path / "clean.jsonl"
    regenerate.regenerate_file(str(model_dir), str(data), str(clean), max_new_tokens=5, batch_size=4)
    lines = clean.read_text().splitlines()
    assert len(lines) == 10 and not regenerate.shard_path(clean, 0).exists()

    out = tmp_path / "out.jsonl"
    run = regenerate.regenerate_file
    real_stream, asked = regenerate.greedy_stream, []

    def dies_after_four_answers(model, prompts, *args):
        for answered, item in enumerate(real_stream(model, prompts, *args)):
            if answered == 4:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(regenerate, "greedy_stream", dies_after_four_answers)
    with pytest.raises(KeyboardInterrupt):
        run(str(model_dir), str(data), str(out), max_new_tokens=5, batch_size=4)
    shard = regenerate.shard_path(out, 0)
    shard.write_text(shard.read_text() + '{"source_index": 9, "conv')  # torn last line
    assert not out.exists()

    def counts(model, prompts, *args):
        asked.append(len(prompts))
        return real_stream(model, prompts, *args)

    monkeypatch.setattr(regenerate, "greedy_stream", counts)
    stats = run(str(model_dir), str(data), str(out), max_new_tokens=5, batch_size=4)
    assert sum(asked) == 6 == stats.answers + stats.empty  # 4 were done before the interruption
    assert out.read_text() == clean.read_text() and not shard.exists()
    with pytest.raises(ValueError, match="other settings"):
        shard.write_text(json.dumps({"settings": {"max_new_tokens": 99}}) + "\n")
        run(str(model_dir), str(data), str(out), max_new_tokens=5, batch_size=4)
