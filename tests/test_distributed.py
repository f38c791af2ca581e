"""Multi-rank training on CPU (gloo): parity across parallel layouts, crash-safe resume, export.

Each run is ``python -m dflash_ds.train`` in 1 or 2 real processes (2: gloo ranks as torchrun starts them, forked
from a warm interpreter by tests/ranks.py; the real launchers are tested in test_cluster.py).
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_conversations, write_tiny_target
from ranks import run_ranks

pytestmark = pytest.mark.slow  # multi-rank / subprocess runs: left out of the fast subset (-m "not slow")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5


# the run every parallel layout must reproduce (model, data and output come separately)
RUN_FLAGS = ["--block-size", "4", "--max-length", "96", "--lr", "5e-3", "--seed", "3", "--max-steps", str(STEPS),
             "--kl-weight", "0.5", "--lora-r", "4"]


def train_args(assets, out, config=None, extra=()) -> list[str]:
    args = ["--model-path", str(assets / "model"), "--train-data", str(assets / "data.jsonl"), "--output-dir", str(out),
            *RUN_FLAGS]
    if config:
        args += ["--deepspeed_config", str(ROOT / "ds_configs" / config)]
    return args + list(extra)


def dist_env(env_extra=None) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}


def run_train(assets, out, nproc=1, config=None, extra=(), env_extra=None, check=True):
    proc = run_ranks(nproc, "dflash_ds.train", train_args(assets, out, config, extra), dist_env(env_extra), ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def adapter(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def assert_same_run(ref_out, out, rel=1e-4, atol=2e-5):
    ref_m, m = metrics(ref_out), metrics(out)
    assert [r["step"] for r in ref_m] == [r["step"] for r in m] == list(range(1, STEPS + 1))
    for a, b in zip(ref_m, m):
        assert b["loss"] == pytest.approx(a["loss"], rel=rel), (a, b)
    ref_a, a = adapter(ref_out), adapter(out)
    assert ref_a.keys() == a.keys()
    for k in ref_a:
        torch.testing.assert_close(a[k], ref_a[k], rtol=1e-3, atol=atol, msg=k)


@pytest.fixture(scope="module")
def llama_assets(tmp_path_factory):
    """SmolLM2-shaped: Llama architecture, tied lm_head, every embedding row used (MASK from a code special)."""
    d = tmp_path_factory.mktemp("dist_llama")
    write_tiny_target(d / "model", family="llama")
    write_conversations(d / "data.jsonl", n=24)
    return d


def _reference_run(assets, out):
    """One process, global batch 2 via gradient accumulation."""
    run_train(assets, out, nproc=1, extra=["--grad-accum", "2"])
    m = metrics(out)
    assert m[-1]["loss"] < m[0]["loss"], "training did not lower the loss: parity would prove nothing"
    b = [v for k, v in adapter(out).items() if "lora_B" in k]
    assert any(t.abs().max() > 1e-3 for t in b), "adapter did not move"
    return out


@pytest.fixture(scope="module")
def llama_reference(llama_assets, tmp_path_factory):
    return _reference_run(llama_assets, tmp_path_factory.mktemp("ref_llama"))


def family_run(request, family):
    """(assets, single-process reference run) of a family's tiny target."""
    prefix = "" if family == "qwen3" else f"{family}_"
    return request.getfixturevalue(f"{prefix}assets"), request.getfixturevalue(f"{prefix}reference")


@pytest.mark.parametrize(
    "family,config,extra",
    [
        ("qwen3", "zero2.json", []),
        ("qwen3", "zero3.json", []),
        ("qwen3", "zero3_offload.json", []),
        ("qwen3", "zero3.json", ["--gradient-checkpointing"]),  # non-reentrant recompute under ZeRO-3 hooks
        ("qwen3", "autotp2_zero1.json", ["--grad-accum", "2"]),
        ("qwen3", "autotp2_zero3.json", ["--grad-accum", "2"]),
        # Llama: a representative subset (ZeRO-3 partitions the tied embedding/lm_head; TP splits its projections)
        ("llama", "zero3.json", []),
        ("llama", "autotp2_zero1.json", ["--grad-accum", "2"]),
    ],
)
def test_parallel_layouts_match_single_process(request, tmp_path, family, config, extra):
    assets, reference = family_run(request, family)
    run_train(assets, tmp_path, nproc=2, config=config, extra=extra)
    assert_same_run(reference, tmp_path)


def test_grouped_by_length_two_ranks_match_one(assets, tmp_path):
    """--group-by-length reorders the data by the global batch alone: two ranks (one sequence each) train exactly
    what one process does with two micro-steps, and the order really changed (the run differs from the shuffled
    one). --max-length 320 keeps the samples' own lengths (at the usual 96 most are cut to the same length)."""
    grouped, longer = ["--group-by-length", "2"], ["--max-length", "320"]
    run_train(assets, tmp_path / "one", nproc=1, extra=[*longer, *grouped, "--grad-accum", "2"])
    run_train(assets, tmp_path / "two", nproc=2, config="zero2.json", extra=[*longer, *grouped])
    assert_same_run(tmp_path / "one", tmp_path / "two")
    run_train(assets, tmp_path / "plain", nproc=1, extra=[*longer, "--grad-accum", "2"])
    plain, one = metrics(tmp_path / "plain"), metrics(tmp_path / "one")
    assert any(a["loss"] != pytest.approx(b["loss"], rel=1e-4) for a, b in zip(plain, one))


KILL_EXTRA = ["--save-interval", "2"]


@pytest.fixture(scope="module")
def killed_two_rank_run(assets, tmp_path_factory):
    """A 2-rank ZeRO-2 run SIGKILLed after step 3, its step-2 checkpoint complete: the start of both resume tests
    (each resumes a copy). The kill must have happened, or resuming would prove nothing."""
    out = tmp_path_factory.mktemp("killed_2rank")
    proc = run_train(assets, out, nproc=2, config="zero2.json", extra=KILL_EXTRA,
                     env_extra={"DFLASH_DS_TEST_KILL_AFTER_STEP": "3"}, check=False)
    assert proc.returncode != 0, "the run was not killed"
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert not (out / "checkpoints" / "step_00000004").exists() and not (out / "adapter").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    return out


def resume_copy(killed: Path, dest: Path) -> Path:
    shutil.copytree(killed, dest)
    return dest


def test_sigkill_after_checkpoint_then_resume_matches(killed_two_rank_run, assets, reference, tmp_path):
    out = resume_copy(killed_two_rank_run, tmp_path / "run")
    run_train(assets, out, nproc=2, config="zero2.json", extra=[*KILL_EXTRA, "--resume", "auto"])
    assert_same_run(reference, out)


def test_resume_two_rank_checkpoint_on_one_rank(killed_two_rank_run, assets, reference, tmp_path):
    """Saved at 2 ranks (global batch 2), resumed on 1: without --grad-accum 2 a step would be one sequence, so
    step 2 would restart at sequence 2 instead of 4 and --max-steps would count other steps. That is refused,
    naming the flag, before anything is written; with the flag the run matches the uninterrupted one."""
    out = resume_copy(killed_two_rank_run, tmp_path / "run")
    shifted = run_train(assets, out, nproc=1, config="zero2.json", extra=[*KILL_EXTRA, "--resume", "auto"],
                        check=False)
    assert shifted.returncode == 2, shifted.stderr[-3000:]
    assert "global batch 2" in shifted.stderr and "resume with --grad-accum 2" in shifted.stderr, shifted.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # refused before the resume touched the run
    run_train(assets, out, nproc=1, config="zero2.json", extra=[*KILL_EXTRA, "--grad-accum", "2", "--resume", "auto"])
    assert_same_run(reference, out)


def test_kill_during_save_keeps_previous_checkpoint(assets, reference, tmp_path):
    extra = ["--save-interval", "2"]
    proc = run_train(assets, tmp_path, nproc=1, extra=[*extra, "--grad-accum", "2"],
                     env_extra={"DFLASH_DS_TEST_KILL_IN_SAVE": "4"}, check=False)
    assert proc.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "step_00000004.partial").exists() and not (ckpts / "step_00000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    run_train(assets, tmp_path, nproc=1, extra=[*extra, "--grad-accum", "2", "--resume", "auto"])
    assert_same_run(reference, tmp_path)


def test_export_cli_matches_final_adapter(assets, reference, tmp_path):
    from dflash_ds.cli import main

    assert main(["export", str(Path(reference) / "checkpoints"), str(tmp_path / "exp")]) == 0
    a, b = adapter(reference), load_file(str(tmp_path / "exp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "exp" / "dflash.json").read_text())
    assert meta["block_size"] == 4 and meta["scope"] == "block"


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_peft_loads_exported_adapter_with_same_logits(request, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dflash_ds.lora import adapter_control, load_adapter_dir

    assets, reference = family_run(request, family)

    ours = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    load_adapter_dir(ours, Path(reference) / "adapter")
    adapter_control(ours).set(True)
    base = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(Path(reference) / "adapter"))
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, peft_model(input_ids=ids).logits
        with adapter_control(ours).disabled():
            plain = ours(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-4), "adapter has no effect: the comparison proves nothing"
    # which MASK and why, recorded for the decoder: <|mask|> in the Qwen3 target; the Llama one uses every
    # embedding row, so the first code special (<repo_name>, id 3) that chat text never contains
    meta = json.loads((Path(reference) / "adapter" / "dflash.json").read_text())
    expected = {"qwen3": ("<|mask|>", "tokenizer mask token"), "llama": ("<repo_name>", "unused special token")}
    assert (meta["mask_token"], meta["mask_token_rule"]) == expected[family] and meta["mask_token_id"] == 3


@pytest.mark.parametrize(
    "extra,config,message",
    [
        (["--block-size", "1"], None, "--block-size"),
        (["--micro-batch-size", "2"], "autotp2_zero1.json", "autotp_size=2 must be >= 1 and divide"),
        (["--grad-accum", "3"], "bad_batch.json", "train_batch_size"),
    ],
)
def test_bad_configs_fail_fast_naming_the_setting(assets, tmp_path, extra, config, message):
    if config == "bad_batch.json":
        cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
        cfg["train_batch_size"] = 4
        (tmp_path / config).write_text(json.dumps(cfg))
        extra = [*extra, "--deepspeed_config", str(tmp_path / config)]
        config = None
    proc = run_train(assets, tmp_path / "out", nproc=1, config=config, extra=extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr


def test_missing_model_path_and_tp_above_kv_heads(assets, tmp_path, capsys):
    from dflash_ds.train import main

    argv = ["--train-data", str(assets / "data.jsonl"), "--output-dir", str(tmp_path)]
    assert main(["--model-path", str(tmp_path / "nope"), *argv]) == 2
    assert "--model-path" in capsys.readouterr().err
    cfg = json.loads((ROOT / "ds_configs" / "autotp2_zero1.json").read_text())
    cfg["tensor_parallel"]["autotp_size"] = 4  # the tiny model has 2 key-value heads
    (tmp_path / "tp4.json").write_text(json.dumps(cfg))
    assert main(["--model-path", str(assets / "model"), *argv, "--deepspeed_config", str(tmp_path / "tp4.json")]) == 2
    assert "exceeds the model's key-value head count" in capsys.readouterr().err


def test_periodic_eval_and_tensorboard_scalars(assets, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(l) for l in (assets / "data.jsonl").read_text().splitlines()][:2]
    prompts.write_text("".join(json.dumps({"conversations": r["conversations"][:1]}) + "\n" for r in rows))
    out = tmp_path / "run"
    run_train(assets, out, nproc=1, extra=["--eval-interval", "2", "--eval-prompts", str(prompts),
                                           "--eval-max-new-tokens", "6", "--eval-limit", "2",
                                           "--save-interval", "2", "--keep-last", "5"])
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))  # one object per optimizer step
    evals = [r for r in m if "eval_tau" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["eval_speedup"] > 0 for r in evals)

    # the in-training eval is the offline eval of the same weights: export step 2's checkpoint and decode again
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dflash_ds.checkpoint import export_checkpoint
    from dflash_ds.evaluate import EvalConfig, load_prompts, run_eval
    from dflash_ds.lora import load_adapter_dir

    export_checkpoint(out / "checkpoints" / "step_00000002", tmp_path / "step2")
    model = AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(assets / "model")
    meta = load_adapter_dir(model, tmp_path / "step2")
    offline = run_eval(model, tok, meta, load_prompts(prompts, tok, limit=2),
                       EvalConfig(max_new_tokens=6, baselines="none", repeats=1, loop="fused"), progress=False)
    assert evals[0]["eval_tau"] == pytest.approx(offline["tau"])
    for key in ("loss", "ce", "kl", "acc", "sim_tau", "skipped_samples", "lr", "grad_norm", "tokens_per_s"):
        assert key in m[0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")}
    tags = set()
    for d in event_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/sim_tau", "train/eval_tau", "train/acc_pos_1"} <= tags


def test_nonfinite_loss_is_skipped_then_aborts_past_the_limit(assets, tmp_path):
    proc = run_train(assets, tmp_path / "a", nproc=1, extra=["--max-nonfinite", "3"],
                     env_extra={"DFLASH_DS_TEST_NAN_AT_STEP": "2"})
    assert "step 2: non-finite loss skipped (1/3)" in proc.stdout
    m = metrics(tmp_path / "a")
    assert len(m) == STEPS and all(r["loss"] == r["loss"] for r in m if r["step"] != 2)  # NaN only at step 2
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").exists()
    a = adapter(tmp_path / "a")
    assert all(torch.isfinite(t).all() for t in a.values()), "a skipped NaN step must not poison the adapter"
    proc = run_train(assets, tmp_path / "b", nproc=1, extra=["--max-nonfinite", "1"],
                     env_extra={"DFLASH_DS_TEST_NAN_AT_STEP": "2"}, check=False)
    assert proc.returncode != 0 and "aborting: 1 non-finite losses (--max-nonfinite 1)" in proc.stderr


def test_poisoned_micro_batch_is_left_out_of_the_step_metrics(assets, tmp_path):
    """Micro-batch 0 of step 2 gets a NaN loss (tests/guarded_train.py), micro-batch 1 trains: the step's logged
    loss, ce, kl and acc are those of micro-batch 1 alone (before: NaN ce/kl, and a loss halved by the skipped
    micro-batch's zero stand-in)."""
    losses, out = tmp_path / "losses.jsonl", tmp_path / "run"
    env = dist_env({"DFLASH_DS_TEST_NAN_MICRO": "2:0", "DFLASH_DS_TEST_LOSS_LOG": str(losses)})
    proc = run_ranks(1, ROOT / "tests" / "guarded_train.py",
                     train_args(assets, out, extra=["--grad-accum", "2", "--max-steps", "2"]), env, ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: non-finite loss skipped (1/10)" in proc.stdout
    seen = {(r["step"], r["micro"]): r["loss"] for r in map(json.loads, losses.read_text().splitlines())}
    first, second = metrics(out)
    assert first["loss"] == pytest.approx((seen[1, 0] + seen[1, 1]) / 2, rel=1e-5)  # the log reads the losses
    assert second["loss"] == pytest.approx(seen[2, 1], rel=1e-5)
    for key in ("ce", "kl", "acc", "sim_tau"):
        assert math.isfinite(second[key]), (key, second)
    assert (first["nonfinite_micro_batches"], second["nonfinite_micro_batches"]) == (0, 1)


@pytest.mark.parametrize("nproc,config", [(1, None), (2, "zero3.json")])
def test_fully_skipped_step_leaves_the_adapter_unchanged(assets, tmp_path, nproc, config):
    """AdamW with zero gradients still moves the weights (momentum, weight decay): a step whose every micro-batch
    was non-finite must not, and the step after it must train again (the lr comes back)."""
    skipped = STEPS - 1
    run_train(assets, tmp_path, nproc=nproc, config=config,
              extra=["--save-interval", "1", "--keep-last", "10", "--weight-decay", "0.1"],
              env_extra={"DFLASH_DS_TEST_NAN_AT_STEP": str(skipped)})
    ckpts = tmp_path / "checkpoints"
    earlier, before, after, later = (
        torch.load(ckpts / f"step_{n:08d}" / "dflash_state.pt", weights_only=False)["adapter"]
        for n in (skipped - 2, skipped - 1, skipped, skipped + 1)
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the skipped step moved the adapter"
    assert any(not torch.equal(before[k], earlier[k]) for k in before), "the steps before it must still train"
    assert any(not torch.equal(after[k], later[k]) for k in after), "the step after it must train again"


def regenerate_args(assets, out) -> list[str]:
    return ["--model-path", str(assets / "model"), "--in", str(assets / "data.jsonl"), "--max-new-tokens", "6",
            "--out", str(out)]


def test_regenerate_sharded_over_two_ranks_keeps_input_order(assets, regenerated, tmp_path):
    proc = run_ranks(2, "dflash_ds.regenerate", regenerate_args(assets, tmp_path / "two.jsonl"), dist_env(), ROOT,
                     timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = regenerated.read_text(), (tmp_path / "two.jsonl").read_text()
    assert one == two and len(one.splitlines()) > 10
    prompts = [json.loads(l)["conversations"][0]["content"] for l in (assets / "data.jsonl").read_text().splitlines()]
    got = [json.loads(l)["conversations"][0]["content"] for l in two.splitlines()]
    assert got == [p for p in prompts if p in got]  # input order


def test_eval_sharded_over_two_ranks_matches_one_process(assets, reference, tmp_path):
    """``dflash-ds eval`` on two ranks (as torchrun starts them): the ranks share the prompts and rank 0 writes one
    report with every prompt's generations in input order, the same as one process decoding them all."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [json.loads(l) for l in (assets / "data.jsonl").read_text().splitlines()][:5]
    prompts.write_text("".join(json.dumps({"conversations": r["conversations"][:1]}) + "\n" for r in rows))
    args = ["--model-path", str(assets / "model"), "--adapter", str(Path(reference) / "adapter"), "--prompts",
            str(prompts), "--max-new-tokens", "10", "--repeats", "1", "--loop", "both", "--no-progress"]
    reports = {}
    for nproc in (1, 2):
        report = tmp_path / f"report{nproc}.json"
        proc = run_ranks(nproc, "dflash_ds.evaluate", [*args, "--report", str(report)], dist_env(), ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[nproc] = json.loads(report.read_text())
    one, two = reports[1], reports[2]
    assert two["config"]["eval_ranks"] == 2 and one["config"]["eval_ranks"] == 1
    assert "2 processes decoded the prompts side by side" in proc.stdout
    assert [p["spec_ids"] for p in two["per_prompt"]] == [p["spec_ids"] for p in one["per_prompt"]]
    assert [p["ar_ids"] for p in two["per_prompt"]] == [p["ar_ids"] for p in one["per_prompt"]]
    assert len(set(map(tuple, (p["ar_ids"] for p in one["per_prompt"])))) > 1  # the order is checkable
    for key in ("tau", "tau_histogram", "acceptance_by_position", "greedy_match", "repetition_rate"):
        assert two[key] == one[key], key
    for name, entry in one["baselines"].items():
        assert two["baselines"][name]["tau"] == entry["tau"] and two["baselines"][name]["greedy_match"]
    assert two["config"]["ar_tokens"] == one["config"]["ar_tokens"]
