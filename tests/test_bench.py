"""The benchmark scripts still run and still compare like with like (tiny shapes; no timing is asserted).

Benchmarks are run by hand, but a script that rots is found only on the day a GPU is lent: these run each one on
shapes that take seconds and check the parts of its report that are correctness, not speed (the fused and the
reference loss agree, the naive step computes the dflash-ds loss, speculative outputs equal greedy AR, every
case of the GPU script's CPU smoke run finishes).
"""

from __future__ import annotations

import json
import os

import sys
from pathlib import Path

import pytest

from ranks import run_ranks

pytestmark = pytest.mark.slow  # multi-rank / subprocess runs: left out of the fast subset (-m "not slow")

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = run_ranks(1, str(ROOT / "bench" / script), [*args, "--out", str(out)], env, ROOT)  # python SCRIPT ARGS
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_loss_memory_fused_matches_reference(tmp_path):
    report = run_bench("loss_memory.py", tmp_path / "lm.json", "--rows", "64", "--hidden", "32", "--vocab", "512",
                       "--chunk-size", "16", "--repeats", "1", "--no-auto-sweep")
    (case,) = report["cases"]
    assert case["reference"]["status"] == "ok" and case["fused"]["status"] == "ok"
    assert case["max_abs_diff_loss"] < 1e-5 and case["max_abs_diff_grad"] < 1e-6


def test_train_step_variants_run_and_naive_computes_the_same_loss(tmp_path):
    report = run_bench("train_step.py", tmp_path / "ts.json", "--seq", "64", "--block", "8", "--hidden", "32",
                       "--layers", "2", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--intermediate", "64",
                       "--vocab", "512", "--lora-r", "4", "--repeats", "1", "--threads", "1", "--goal-seq", "64")
    (case,) = report["cases"]
    for variant in ("dflash", "dflash_joint", "dflash_gc", "ar", "ar_gc", "naive"):
        assert case[variant]["status"] == "ok", (variant, case[variant])
    assert case["naive_minus_dflash_loss_abs"] < 1e-4
    assert case["dflash_joint"]["loss_first_step"] == pytest.approx(case["dflash"]["loss_first_step"], abs=1e-5)
    # checkpointing recomputes the same forward: the first step's loss must not move
    assert case["dflash_gc"]["loss_first_step"] == pytest.approx(case["dflash"]["loss_first_step"], abs=1e-5)


def test_spec_decode_is_lossless_and_reports_a_bound(tmp_path):
    report = run_bench("spec_decode.py", tmp_path / "sd.json", "--threads", "1", "--repeats", "1",
                       "--fwd-repeats", "3", "--num-prompts", "2", "--max-new-tokens", "16", "--no-tiny-cache",
                       "--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--head-dim", "32",
                       "--intermediate", "128", "--vocab", "512")
    assert [b["block_size"] for b in report["blocks"]] == [4, 8, 16]
    for b in report["blocks"]:
        assert b["lossless_outputs_equal"], b  # both loops reproduced the AR output
        for loop in ("two_forward", "fused"):
            assert 1.0 <= b[loop]["tau"] <= b["block_size"], (loop, b[loop])  # a bonus token per step at least
        assert b["fused_rows"] == (b["block_size"] - 1) * (b["block_size"] + 1)  # all groups: k+1 = B-1 of them


def test_gpu_bench_cpu_smoke_runs_every_case(tmp_path):
    report = run_bench("gpu/gpu_bench.py", tmp_path / "gpu.json", "--cpu-smoke")
    cases = report["train_8b"]["cases"]
    for name in ("dflash_gc", "dflash_gc_joint", "dflash", "naive", "long_dflash_gc", "long_naive_gc", "dflash_gc_deepspeed", "ar_gc", "ar"):
        assert cases[name]["status"] == "ok", (name, cases[name])
    for name in ("dflash_gc_flex", "long_dflash_gc_flex"):  # torch has no FlexAttention backward on the CPU
        assert cases[name]["status"] == "error" and "FlexAttention" in cases[name]["error"], cases[name]
    decode = report["decode_1p7b"]
    assert sorted(int(b) for b in decode["at_context_32"]["per_block"]) == [4, 8, 16]


def test_scaling_runs_the_trainer_and_computes_bytes_per_step(tmp_path):
    """One 1-rank case of the real trainer (the script's plumbing), and the communication arithmetic at 2 ranks:
    ZeRO-2 moves the adapter twice (reduce-scatter + all-gather, half each), ZeRO-3 also gathers base + adapter in
    the forward and the backward, TP x2 moves 4 activation all-reduces per layer."""
    from conftest import write_conversations, write_tiny_target

    write_tiny_target(tmp_path / "model")
    write_conversations(tmp_path / "data.jsonl", n=8)
    report = run_bench("scaling.py", tmp_path / "sc.json", "--ranks", "1", "--layouts", "zero2", "--steps", "2",
                       "--warmup", "0", "--model-path", str(tmp_path / "model"), "--train-data",
                       str(tmp_path / "data.jsonl"), "--block-size", "4", "--max-length", "64", "--lora-r", "4",
                       "--micro-batch-size", "1", "--workdir", str(tmp_path / "runs"))
    (case,) = report["cases"]
    assert case["status"] == "ok" and case["tokens_per_s_median"] > 0 and case["bytes_per_step_computed"]["total"] == 0

    sys.path.insert(0, str(ROOT / "bench"))
    from scaling import bytes_per_step
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "model")  # 2 layers, hidden 64, intermediate 128, kv 2 x 16
    adapter = 2 * 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))  # r (in + out) per projection
    common = dict(r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  base_params=1000, micro_steps=1, tokens_per_micro=10)
    z2 = bytes_per_step(config, dp=2, tp=1, zero_stage=2, **common)
    z3 = bytes_per_step(config, dp=2, tp=1, zero_stage=3, **common)
    tp = bytes_per_step(config, dp=1, tp=2, zero_stage=1, **common)
    assert z2["adapter_params"] == adapter and z2["total"] == 4 * adapter
    assert z3["total"] == 4 * adapter + 4 * (1000 + adapter)
    assert tp["tp_activation_all_reduce"] == 4 * 2 * 1 * 10 * 64 * 4 and tp["dp_grad_reduce_scatter"] == 0


def test_regenerate_bench_compares_both_modes_on_the_same_answers(tmp_path):
    from conftest import write_tiny_target

    model = write_tiny_target(tmp_path / "model", family="llama")
    report = run_bench("regenerate.py", tmp_path / "regen.json", "--model-path", str(model), "--num-prompts", "6",
                       "--max-new-tokens", "6", "--batch-sizes", "2,8")
    results = report["results"]
    assert set(results) == {"static_b2", "continuous_b2", "static_b8", "continuous_b8"}
    assert len({r["tokens"] for r in results.values()}) == 1  # every mode answered the same prompts in full
    assert report["answers_differing_from_static_b2"] == {k: 0 for k in results}
    for bs in (2, 8):
        assert report["ratios"][f"continuous_over_static_b{bs}"] == pytest.approx(
            results[f"continuous_b{bs}"]["tokens_per_s"] / results[f"static_b{bs}"]["tokens_per_s"])
    assert report["ratios"]["continuous_b2_over_static_b8"] == pytest.approx(
        results["continuous_b2"]["tokens_per_s"] / results["static_b8"]["tokens_per_s"])


def test_lazy_head_bench_decides_as_the_full_head_at_every_accepted_length(tmp_path):
    """The script asserts both decisions equal (and n accepted) before timing; the report holds every n."""
    from conftest import write_tiny_target

    model = write_tiny_target(tmp_path / "model", family="llama")
    report = run_bench("lazy_head.py", tmp_path / "lazy.json", "--model-path", str(model), "--context-len", "20",
                       "--block-size", "4", "--repeats", "1", "--warmup", "0")
    per = report["per_accepted"]
    assert sorted(int(n) for n in per) == [0, 1, 2, 3]
    for r in per.values():
        assert r["lazy_over_full"] == pytest.approx(r["t_lazy_s"] / r["t_full_s"])


def test_rank_balance_times_both_orders_on_two_ranks(tmp_path):
    """The real trainer on two ranks, grouped then shuffled: per-rank phase times from every rank, ratio to the
    first case."""
    from conftest import write_conversations, write_tiny_target

    write_tiny_target(tmp_path / "model")
    write_conversations(tmp_path / "data.jsonl", n=8)
    report = run_bench("rank_balance.py", tmp_path / "rb.json", "--model-path", str(tmp_path / "model"),
                       "--train-data", str(tmp_path / "data.jsonl"), "--steps", "2", "--groups", "2,0",
                       "--block-size", "4", "--max-length", "64")
    assert [c["group_by_length"] for c in report["cases"]] == [2, 0]
    for case in report["cases"]:
        assert len(case["per_rank"]) == 2
        for rank in case["per_rank"]:
            assert rank["forward"] > 0 and rank["backward"] > 0 and rank["all_reduce"] > 0
            assert rank["train_step"] >= rank["forward"] + rank["backward"]
