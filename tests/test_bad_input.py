"""Bad input to train, regenerate, eval and export: the rows of the README's bad-input table that no other test
covers (the README names the test of every row). Each asserts the behaviour a user sees: exit code 2 and a line
naming the file (and line) and the cause, or a counted skip; and that a failure leaves no half-written output."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch

from conftest import write_conversations, write_tiny_target
from dflash_ds import checkpoint, evaluate, metrics, regenerate, sampler, train
from dflash_ds.lora import DraftMeta, LoRAConfig, apply_lora, gather_full_lora_state, save_adapter_dir

BLOCK = 4


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny target, a few conversations, prompts, and an adapter trained (well, initialised) on this target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("bad_input")
    write_tiny_target(d / "model")
    write_conversations(d / "data.jsonl", n=4)
    (d / "prompts.jsonl").write_text(json.dumps({"prompt": "def f(x):"}) + "\n")
    model = AutoModelForCausalLM.from_pretrained(d / "model")
    apply_lora(model, LoRAConfig(r=4))
    mask_id = AutoTokenizer.from_pretrained(d / "model").convert_tokens_to_ids("<|mask|>")
    save_adapter_dir(d / "adapter", gather_full_lora_state(model), LoRAConfig(r=4),
                     DraftMeta(block_size=BLOCK, mask_token_id=mask_id, scope="block", base_model=str(d / "model")))
    return d


def write_adapter_like(target: Path, out: Path, **meta_changes) -> Path:
    """The target's adapter with its drafting metadata changed."""
    meta = json.loads((target / "adapter" / "dflash.json").read_text())
    out.mkdir()
    for f in (target / "adapter").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "dflash.json").write_text(json.dumps({**meta, **meta_changes}))
    return out


# ---------------------------------------------------------------------------------------------------------- eval


def test_eval_prompt_line_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(evaluate.PromptFileError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        evaluate.read_prompts(path)


def eval_main(target, tmp_path, prompts=None, adapter=None, model=None, extra=()) -> tuple[int, Path]:
    report = tmp_path / "report.json"
    rc = evaluate.main(["--model-path", str(model or target / "model"), "--adapter", str(adapter or target / "adapter"),
                        "--prompts", str(prompts or target / "prompts.jsonl"), "--report", str(report),
                        "--max-new-tokens", "4", "--repeats", "1", "--baselines", "none", "--no-progress", *extra])
    return rc, report


@pytest.mark.parametrize("content,message", [(None, "prompt file not found"), ("", "no prompts"),
                                             ("\n \n", "no prompts")], ids=["missing", "empty", "blank"])
def test_eval_without_a_usable_prompt_exits_2_and_writes_no_report(target, tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.jsonl"
    if content is not None:
        prompts.write_text(content)
    rc, report = eval_main(target, tmp_path, prompts=prompts)
    err = capsys.readouterr().err
    assert rc == 2 and f"{prompts}: {message}" in err, err
    assert not report.exists() and not list(tmp_path.glob(".report*"))


def test_eval_rejects_an_adapter_of_another_base_model_or_block_size(target, tmp_path, capsys):
    other = write_tiny_target(tmp_path / "other", hidden_size=32, intermediate_size=64, head_dim=8)
    cases = [
        (dict(model=other), "adapter weights do not match the model: base_model.model.model.layers.0.self_attn.q_proj"
                            ".lora_A.weight is (4, 64), this model takes (4, 32)"),
        (dict(adapter=write_adapter_like(target, tmp_path / "a1", mask_token_id=10**6)),
         "MASK id 1000000 is outside this model's vocabulary"),
        (dict(extra=["--block-size", str(2 * BLOCK)]), f"--block-size must be in [3, {BLOCK}]"),
        (dict(adapter=tmp_path / "no_adapter"), "adapter_config.json: missing (is"),
    ]
    for kwargs, message in cases:
        rc, report = eval_main(target, tmp_path, **kwargs)
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (kwargs, err)
        assert not report.exists()
    rc, report = eval_main(target, tmp_path)  # the same call with the right model and adapter works
    assert rc == 0 and json.loads(report.read_text())["config"]["block_size"] == BLOCK


# --------------------------------------------------------------------------------------------------------- train


def test_train_rejects_bad_input_before_any_model_loads(target, tmp_path, capsys):
    """In-process: each case fails in the flag/ds_config checks, before the process group or the model."""
    half = tmp_path / "checkpoints" / "step_00000004.partial"
    half.mkdir(parents=True)
    (half / "dflash_state.pt").write_bytes(b"torn")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 2},\n "bf16": }\n')
    cases = [
        (["--train-data", str(tmp_path / "nope.jsonl")], f"--train-data {str(tmp_path / 'nope.jsonl')!r}: no such file"),
        (["--eval-prompts", str(tmp_path / "empty.jsonl")], f"{tmp_path / 'empty.jsonl'}: no prompts"),
        (["--eval-prompts", str(tmp_path / "nope.jsonl")], "prompt file not found"),
        (["--deepspeed_config", str(tmp_path / "bad.json")], f"{tmp_path / 'bad.json'}:2:10: invalid JSON"),
        (["--resume", str(half)], "not a complete dflash-ds checkpoint"),
        (["--dist-timeout", "0"], "--dist-timeout must be > 0"),
        (["--clean-pass", "cached", "--lora-scope", "all"], "--clean-pass cached needs --lora-scope block"),
    ]
    for extra, message in cases:
        argv = ["--model-path", str(target / "model"), "--train-data", str(target / "data.jsonl"),
                "--output-dir", str(tmp_path / "out"), *extra]
        assert train.main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert not torch.distributed.is_initialized(), f"{extra} was caught only after the process group started"
    assert not (tmp_path / "out").exists()


def test_train_on_an_empty_data_file_exits_2_naming_it(target, tmp_path):
    from test_distributed import run_train

    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "model").symlink_to(target / "model")
    (assets / "data.jsonl").write_text("\n")
    proc = run_train(assets, tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"dflash-ds train: error: no usable conversations in ['{assets / 'data.jsonl'}']" in proc.stderr


def test_data_empty_after_truncation_or_under_one_batch(target):
    from transformers import AutoTokenizer

    from dflash_ds.data import DataConfig, build_dataset

    tok = AutoTokenizer.from_pretrained(target / "model")
    with pytest.raises(ValueError, match=r"no training examples left in .*data.jsonl.* \(max_length=4\)"):
        build_dataset(tok, DataConfig(paths=[str(target / "data.jsonl")], max_length=4))
    with pytest.raises(ValueError, match="4 usable conversations, fewer than one global batch \\(6 ="):
        sampler.StepBatches(4, micro=1, accum=3, dp_size=2, dp_rank=0, seed=0)


def test_mask_token_in_training_text_is_a_bad_line(tmp_path, capsys):
    """A message quoting the MASK token's text ("<|mask|>") tokenises to the MASK id, as does a regenerated answer
    in which the target wrote it: the drafter would read MASK in the clean stream. It went into training unseen;
    now each such line is reported with its file and line: skipped and counted, or an error (--bad-lines)."""
    import sysconfig

    from dflash_ds.data import BadLineError, DataConfig, build_dataset
    from dflash_ds.recipes.tokenizer import train_tokenizer

    tok = train_tokenizer([(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()], vocab_size=300)
    mask = tok.convert_tokens_to_ids("<|mask|>")
    wrote_mask = tok(" return", add_special_tokens=False)["input_ids"] + [mask]

    def conv(user: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"conversations": conv("def f():", "    return 1")},
        {"conversations": conv("what does <|mask|> mean?", "    return 2")},
        {"conversations": conv("def g():", tok.decode(wrote_mask, skip_special_tokens=True)), "answer_ids": wrote_mask},
    )))
    with pytest.raises(BadLineError, match=rf"^{re.escape(str(path))}:2: the MASK token {mask} \('<\|mask\|>'\) "
                                           r"occurs at token \d+ \(in '.* does <\|mask\|> mean"):
        build_dataset(tok, DataConfig(paths=[str(path)], bad_lines="error"), mask_token_id=mask)
    kept = build_dataset(tok, DataConfig(paths=[str(path)]), mask_token_id=mask)
    assert len(kept) == 1 and mask not in kept[0]["input_ids"]
    assert f"skipped 2 lines containing the MASK token {mask} in {path}" in capsys.readouterr().err
    assert len(build_dataset(tok, DataConfig(paths=[str(path)]), mask_token_id=tok.eos_token_id + 100)) == 3


def test_ds_config_value_contradicting_a_flag_is_named(tmp_path):
    from dflash_ds.config import OptimConfig, TrainConfig, resolve_ds_config
    from dflash_ds.data import DataConfig

    cfg = TrainConfig(model_path="m", data=DataConfig(paths=["d"]), output_dir=str(tmp_path), optim=OptimConfig(lr=5e-3))
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ValueError, match=r"--lr=0.005 contradicts optimizer.params.lr=0.001 in the ds_config"):
        resolve_ds_config(ds, cfg, dp_size=1, use_bf16=False)


def test_resume_drops_a_torn_metrics_line(tmp_path):
    """A run killed while appending to metrics.jsonl leaves a torn last line; resuming must not choke on it."""
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    metrics.MetricsLog(str(tmp_path), engine=None, resume_step=2, is_main=True)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"


# ---------------------------------------------------------------------------------------------------- regenerate


def regen_main(target, in_path, out):
    return regenerate.main(["--model-path", str(target / "model"), "--in", str(in_path), "--out", str(out),
                            "--max-new-tokens", "3"])


def test_regenerate_skips_and_counts_bad_lines(target, tmp_path, capsys):
    good = (target / "data.jsonl").read_text().splitlines()
    path = tmp_path / "in.jsonl"
    path.write_bytes("\n".join([good[0], "not json", good[1]]).encode() + b'\n{"text": "caf\xe9"}\n'
                     + json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode() + b"\n")
    assert regen_main(target, path, tmp_path / "out.jsonl") == 0
    assert f"skipped 3 bad lines in {path}" in capsys.readouterr().err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) <= 2


@pytest.mark.parametrize("content,message", [(None, "No such file"), ("", "no usable conversation to answer"),
                                             ("not json\n", "no usable conversation to answer")],
                         ids=["missing", "empty", "all-bad"])
def test_regenerate_without_usable_input_exits_2(target, tmp_path, capsys, content, message):
    path = tmp_path / "in.jsonl"
    if content is not None:
        path.write_text(content)
    assert regen_main(target, path, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert "dflash-ds regenerate: error:" in err and message in err and str(path) in err
    assert not (tmp_path / "out.jsonl").exists()


def test_regenerate_failing_mid_write_leaves_the_previous_output(target, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    calls = []

    def dumps(obj, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return json.dumps(obj, *args, **kwargs)

    monkeypatch.setattr(regenerate, "json", types.SimpleNamespace(dumps=dumps, loads=json.loads))
    with pytest.raises(OSError, match="No space left"):
        regen_main(target, target / "data.jsonl", out)
    assert len(calls) == 2  # it failed after writing one record
    assert out.read_text() == "previous\n"


# -------------------------------------------------------------------------------------------------------- export


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint directory as save_checkpoint leaves it (the state file only: export needs nothing else)."""
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    adapter = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full((4, 8), float(step))}
    torch.save({"adapter": adapter, "lora_config": LoRAConfig(r=4, target_modules=("q_proj",)).__dict__,
                "draft_meta": DraftMeta(block_size=BLOCK, mask_token_id=1, scope="block").__dict__},
               d / checkpoint.STATE_FILE)
    if complete:
        (d / checkpoint.COMPLETE).write_text(f"{step}\n")
        (root / "latest").write_text(d.name + "\n")
    return d


def test_export_refuses_missing_and_half_written_checkpoints(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts, 2)
    half = fake_checkpoint(ckpts, 4, complete=False)
    for path, message in ((tmp_path / "nope", "no dflash_state.pt"), (half, "a half-written checkpoint")):
        assert checkpoint.main_export([str(path), str(tmp_path / "exp")]) == 2
        err = capsys.readouterr().err
        assert f"dflash-ds export: error: {path}: {message}" in err, err
        assert not (tmp_path / "exp").exists()
    assert checkpoint.main_export([str(ckpts), str(tmp_path / "exp")]) == 0  # the latest complete one: step 2
    assert json.loads((tmp_path / "exp" / "dflash.json").read_text())["block_size"] == BLOCK


def test_export_failing_mid_write_keeps_the_previous_adapter(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts, 2)
    out = tmp_path / "exp"
    assert checkpoint.main_export([str(ckpts / "step_00000002"), str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fake_checkpoint(ckpts, 4)

    def save_file(*args, **kwargs):
        raise OSError("No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(OSError):
        checkpoint.main_export([str(ckpts / "step_00000004"), str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
