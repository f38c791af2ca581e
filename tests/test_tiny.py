"""Tests for the tiny target (dflash_ds.recipes: corpus, tokenizer, pretrain, tiny_target, cache, commands): stdlib
extraction, module split, tokenizer, chat template, tiny build, metrics, the cache and the commands."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from dflash_ds.recipes import cache, commands
from dflash_ds.recipes import tiny_target as tiny
from dflash_ds.recipes.corpus import (
    FunctionSample,
    extract_stdlib_functions,
    split_by_module,
    to_conversation,
    to_prompt_conversation,
    write_jsonl,
    write_prompts_jsonl,
)
from dflash_ds.recipes.tiny_target import TinyTargetConfig, build_tiny_target
from dflash_ds.recipes.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, train_tokenizer

CODE = (
    "def f(x, *, y=1):\n"
    '    """Doc\tstring with tab and  two spaces."""\n'
    "    if x:\n"
    "\treturn  {'a': [x ,y]}   \n"
    "\n"
    "\n"
    "        # deep comment é ünïcode → 漢字\n"
    "    return None\r\n"
)


@pytest.fixture(scope="module")
def samples() -> list[FunctionSample]:
    return extract_stdlib_functions(max_functions=300)


@pytest.fixture(scope="module")
def tokenizer(samples):
    return train_tokenizer((t for s in samples for t in (s.prompt, s.body)), vocab_size=512)


# -- extraction -------------------------------------------------------------------------------------------------


def test_extraction_splits_at_docstring(samples):
    assert len(samples) == 300
    for s in samples:
        assert s.prompt.startswith(("def ", "async def ")), s.prompt
        # The prompt alone is a function whose whole body is its docstring...
        (fn,) = ast.parse(s.prompt).body
        assert ast.get_docstring(fn) is not None and len(fn.body) == 1
        # ...and the body holds the rest: prompt + body parses to the same function with more statements.
        (full,) = ast.parse(s.prompt + "\n" + s.body).body
        assert ast.get_docstring(full) == ast.get_docstring(fn) and len(full.body) >= 2
        # Dedented consistently: the def is at column 0, the body indented under it, no blank edges.
        assert s.body.split("\n")[0][:1] in (" ", "\t") and s.body.strip()
        assert s.body == s.body.rstrip() and 3 <= len((s.prompt + "\n" + s.body).split("\n")) <= 40


def test_extraction_on_a_fake_stdlib(tmp_path: Path):
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "class C:\n"
        "    def m(self, a):\n"
        '        """Method doc."""\n'
        "        b = a + 1\n"
        "        return b\n"
        "\n"
        "    def stub(self):\n"
        '        """Only a docstring: skipped."""\n'
        "\n"
        "def nodoc(a):\n"
        "    return a\n"
        "\n"
        "def outer():\n"
        '    """Outer."""\n'
        "    def inner():\n"
        '        """Nested functions are not taken on their own."""\n'
        "        return 1\n"
        "    return inner\n"
    )
    (pkg / "tests" / "test_x.py").write_text('def t():\n    """Doc."""\n    return 1\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "latin.py").write_bytes(b"def g():\n    '''caf\xe9'''\n    return 2\n")  # undecodable as utf-8
    got = extract_stdlib_functions(tmp_path)
    assert [(s.module, s.prompt.split("(")[0]) for s in got] == [("pkg", "def m"), ("pkg", "def outer")]
    method = got[0]
    assert method.prompt == 'def m(self, a):\n    """Method doc."""'
    assert method.body == "    b = a + 1\n    return b"
    assert extract_stdlib_functions(tmp_path, max_functions=1) == got[:1]


def test_extraction_is_deterministic():
    assert extract_stdlib_functions(max_functions=50) == extract_stdlib_functions(max_functions=50)


# -- split ------------------------------------------------------------------------------------------------------


def test_split_by_module_disjoint_and_deterministic(samples):
    train, held = split_by_module(samples, eval_fraction=0.3, seed=0)
    assert train and held
    assert len(train) + len(held) == len(samples)
    assert not {s.module for s in train} & {s.module for s in held}
    assert split_by_module(samples, 0.3, 0) == (train, held)
    # Split is per module, not per sample subset: a module's side does not change with other modules present.
    subset = [s for s in samples if s.module in {held[0].module, train[0].module}]
    sub_train, sub_held = split_by_module(subset, 0.3, 0)
    assert {s.module for s in sub_held} == {held[0].module}
    # Another seed gives another split.
    assert split_by_module(samples, 0.3, 1) != (train, held)


def test_split_never_leaves_a_side_empty():
    fake = [FunctionSample(module=m, prompt="def f():", body="    pass") for m in ("a", "b")]
    for frac in (1e-9, 0.999999):
        train, held = split_by_module(fake, frac, 0)
        assert len(train) == 1 and len(held) == 1


# -- records ----------------------------------------------------------------------------------------------------


def test_conversation_records(tmp_path: Path, samples):
    s = samples[0]
    rec = to_conversation(s)
    assert rec == {"conversations": [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.body}]}
    assert to_prompt_conversation(s) == {"conversations": [{"role": "user", "content": s.prompt}]}
    assert write_jsonl(tmp_path / "d" / "a.jsonl", [rec, rec]) == 2
    lines = (tmp_path / "d" / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [rec, rec]
    write_prompts_jsonl(tmp_path / "p.jsonl", samples[:3])
    prompts = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [p["conversations"][0]["content"] for p in prompts] == [s.prompt for s in samples[:3]]
    assert all(len(p["conversations"]) == 1 for p in prompts)


# -- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_code(tokenizer, samples):
    for text in [CODE, samples[7].prompt + "\n" + samples[7].body, "  \n\t\t x\n\n\n    ", "<|im_end|> in text"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # BPE learned merges: fewer tokens than bytes on code.
    ids = tokenizer(samples[7].body, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(samples[7].body.encode())


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 512
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|mask|>": 3}
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2 and tokenizer.mask_token_id == 3
    # Each special token in text is one id, never split into bytes.
    for t, i in ids.items():
        assert i in tokenizer(f"x{t}y", add_special_tokens=False)["input_ids"]
    assert (
        tokenizer("hello", add_special_tokens=True)["input_ids"]
        == tokenizer("hello", add_special_tokens=False)["input_ids"]
    )  # no BOS / EOS added behind the user's back


def test_chat_template_renders_chatml(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "def f():\n    '''d'''"}, {"role": "assistant", "content": "    return 1"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>user\ndef f():\n    '''d'''<|im_end|>\n<|im_start|>assistant\n    return 1<|im_end|>\n"
    )
    gen = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_generation_prompt_is_a_token_prefix_of_the_conversation(tokenizer, samples):
    # What the model is prompted with at generation time must tokenise exactly as in training, else the
    # model sees a token boundary it never saw (a lone "\n" after "assistant") and generates garbage.
    for s in samples[:100]:
        conv = to_conversation(s)["conversations"]
        full = tokenizer(tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        prompt = tokenizer(
            tokenizer.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        assert full[: len(prompt)] == prompt
        assert full[-2:] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\u010a")]  # "<|im_end|>\n"


# -- metrics ----------------------------------------------------------------------------------------------------


# -- build ------------------------------------------------------------------------------------------------------

SMALL = TinyTargetConfig(
    vocab_size=384,
    max_functions=250,
    eval_fraction=0.2,
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
    intermediate_size=128,
    seq_len=64,
    batch_size=8,
    steps=30,
    lr=5e-3,
    warmup_steps=3,
    max_eval_tokens=2048,
    num_samples=2,
    sample_tokens=16,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("build") / "target"
    meta = build_tiny_target(out, SMALL, progress=False)
    return out, meta


def test_build_writes_loadable_directory(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, meta = built
    assert not out.with_name(out.name + ".tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.tie_word_embeddings is False
    assert model.config.vocab_size == len(tok) == meta["config"]["vocab_size"]
    assert model.config.mask_token_id == tok.mask_token_id == meta["mask_token_id"] == 3
    assert tok.decode(tok(CODE, add_special_tokens=False)["input_ids"]) == CODE
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == (
        "<|im_start|>user\nx<|im_end|>\n"
    )
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, len(tok)) and torch.isfinite(logits).all()


def test_build_metadata_and_data(built):
    out, meta = built
    on_disk = json.loads((out / "tiny_target.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    # Training loss went down, and well below a uniform guess.
    assert meta["train_loss"] < meta["train_loss_first"] - 0.5
    assert meta["train_loss"] < meta["ln_vocab"]
    assert meta["ln_vocab"] == pytest.approx(math.log(meta["config"]["vocab_size"]))
    assert meta["eval_loss"] is not None and math.isfinite(meta["eval_loss"])
    assert meta["train_modules"] and meta["eval_modules"]
    assert not set(meta["train_modules"]) & set(meta["eval_modules"])
    assert 0.0 <= meta["repetition_rate_4"] <= 1.0 and len(meta["greedy_samples"]) == 2
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (out / "data" / "eval.jsonl").read_text().splitlines()]
    prompts = [json.loads(x) for x in (out / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(train) == meta["num_functions"]["train"] and len(held) == meta["num_functions"]["eval"]
    assert [p["conversations"][0] for p in prompts] == [h["conversations"][0] for h in held]
    assert all([t["role"] for t in r["conversations"]] == ["user", "assistant"] for r in train)


def test_build_is_reproducible(built, tmp_path: Path):
    from safetensors.torch import load_file

    out, meta = built
    cfg = TinyTargetConfig(**{**meta["config"], "steps": 5, "max_eval_tokens": 512, "num_samples": 1})
    a = build_tiny_target(tmp_path / "a", cfg, progress=False)
    b = build_tiny_target(tmp_path / "b", cfg, progress=False)
    assert a["train_loss_first"] == b["train_loss_first"] and a["train_loss"] == b["train_loss"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Rebuilding over a previous build replaces it; a foreign directory is never overwritten.
    build_tiny_target(tmp_path / "a", cfg, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        build_tiny_target(foreign, cfg, progress=False)
    assert (foreign / "precious.txt").read_text() == "keep"


def test_failed_build_leaves_nothing(tmp_path: Path):
    out = tmp_path / "t"
    with pytest.raises(ValueError, match="fewer than one sequence"):
        build_tiny_target(out, TinyTargetConfig(max_functions=3, vocab_size=300, steps=1), progress=False)
    assert not out.exists() and not out.with_name("t.tmp").exists()


def test_ensure_and_cli(built, tmp_path: Path, monkeypatch, capsys):
    out, _ = built
    # ensure_tiny_target returns a complete cache without rebuilding it.
    monkeypatch.setattr(tiny, "build_tiny_target", lambda *a, **k: pytest.fail("must not rebuild"))
    assert tiny.ensure_tiny_target(out) == out.resolve()
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    assert tiny.default_tiny_target_dir() == tmp_path / "cache" / tiny.CACHE_NAME
    # tiny-target copies the cache; a non-empty destination is an error.
    dst = tmp_path / "copy"
    assert commands.main_tiny_target(["--out", str(dst), "--cache-dir", str(out), "--quiet"]) == 0
    assert (dst / "model.safetensors").is_file() and (dst / "data" / "train.jsonl").is_file()
    assert commands.main_tiny_target(["--out", str(dst), "--cache-dir", str(out), "--quiet"]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        commands.main_build([])  # --out is required


def test_ensure_builds_once_when_missing(tmp_path: Path, monkeypatch):
    calls = []

    def fake_build(path, config=None, progress=True):
        calls.append(Path(path))
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        (Path(path) / tiny.METADATA_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(tiny, "build_tiny_target", fake_build)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert tiny.ensure_tiny_target() == tmp_path / tiny.CACHE_NAME
    assert tiny.ensure_tiny_target() == tmp_path / tiny.CACHE_NAME
    assert calls == [tmp_path / tiny.CACHE_NAME]
