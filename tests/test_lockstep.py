"""The in-training eval decodes in lockstep on every rank (issue 23): rank 0 decides, the others follow.

Under ZeRO-3 or tensor parallelism every forward is collective, and ``train.py``'s periodic eval calls
``run_eval(model, tokenizer, meta, prompts, settings, progress=False)`` on every rank. Greedy decoding alone does not
keep the ranks on one path: an argmax tie, or a last-bit difference between the ranks' kernels, can pick another
token on one rank, which then runs other forwards than the rest, and they wait on each other until the timeout.

The test runs that call on 2 gloo ranks (torchrun) whose models differ slightly (rank 1 has noise on its output head
and adapter, so its greedy tokens, drafts and draft confidences are not rank 0's) and whose decoder forwards are
collective (a pre-hook all-reduces, as ZeRO-3 gathers weights): every rank must return rank 0's outputs, and the run
must finish. This file is also the worker: ``python tests/test_lockstep.py OUT_DIR`` under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-rank / subprocess runs: left out of the fast subset (-m "not slow")

NEW, PROMPTS, B = 12, 3, 4


def run_two_ranks(worker: str, out: Path) -> tuple[dict, dict]:
    """Run ``worker`` (a test file that is also a torchrun worker) on 2 gloo ranks; each writes ``out/rank{r}.json``.
    A hang (the ranks waiting on each other) or a failure is an AssertionError with the ranks' output."""
    from ranks import run_ranks
    from test_distributed import ROOT, dist_env

    try:
        proc = run_ranks(2, str(Path(worker).resolve()), [str(out)], dist_env(), ROOT, timeout=240)
    except subprocess.TimeoutExpired as exc:  # the ranks waited on each other
        raise AssertionError(f"the 2-rank eval hung:\n{(exc.stderr or b'')[-3000:]!r}") from None
    assert proc.returncode == 0, f"the 2-rank eval failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return tuple(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))


def perturb_on_rank_1(model, *extra) -> None:
    """Another rank's kernels, exaggerated: noise on the output head, the adapter's B factors and ``extra``
    weights, so this rank's argmaxes, drafts and draft confidences differ from rank 0's."""
    import torch

    from dflash_ds.lora import lora_modules

    gen = torch.Generator().manual_seed(11)
    weights = [model.lm_head.weight] + [m.lora_B.weight for _, m in lora_modules(model)] + list(extra)
    with torch.no_grad():
        for w in weights:
            w.add_(torch.randn(w.shape, generator=gen) * 0.05)


def count_collective_forwards(model) -> tuple[list[int], object]:
    """A pre-hook on the decoder that all-reduces, as ZeRO-3's parameter gather does (every rank must run each
    forward too); returns ``(counter, hook handle)``."""
    import torch
    import torch.distributed as dist

    forwards = [0]

    def collective(*_):
        forwards[0] += 1
        dist.all_reduce(torch.ones(1))

    return forwards, model.model.register_forward_pre_hook(collective)


def test_every_rank_returns_rank_0s_outputs_and_the_run_finishes(tmp_path):
    r0, r1 = run_two_ranks(__file__, tmp_path)
    assert r0["solo"] != r1["solo"], "rank 1's noise must change its own greedy output, or the test shows nothing"
    assert r0["ar"] == r1["ar"] == r0["solo"]  # rank 0's greedy output on both ranks
    assert r0["spec"] == r1["spec"] == r0["solo"]  # and both loops commit it (two-forward, then fused)
    assert r0["other_loop_match"] is r1["other_loop_match"] is True
    assert r0["forwards"] == r1["forwards"]  # the same forwards, so no rank waited on another
    assert "lockstep" in r0["hf_baselines"] and "lockstep" in r1["hf_baselines"]  # refused, not left to hang
    for r in (r0, r1):  # an overflowing decision is an error on every rank, at once (the timeout is 60 s)
        assert "3 values for a capacity of 2" in r["overflow"] and r["overflow_s"] < 20, r


def _worker(out: Path) -> None:
    """One rank: the trainer's call of run_eval on a model whose decoder forward is collective."""
    from datetime import timedelta
    from types import SimpleNamespace

    import time

    import torch
    import torch.distributed as dist

    from dflash_ds.evaluate import EvalConfig, run_eval
    from dflash_ds.kinds import DRAFTER_OTHER_LOOP, FusedConfig
    from dflash_ds.lora import DraftMeta
    from dflash_ds.speculative import Lockstep, autoregressive_generate
    from test_speculative import MASK, prompts, tiny_model

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = tiny_model("sdpa", seed=3)
    if rank == 1:
        perturb_on_rank_1(model)
    forwards, hook = count_collective_forwards(model)
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)  # token-id prompts need no vocabulary
    meta = DraftMeta(B, MASK, "block")
    prompt_ids = prompts(PROMPTS - 1, length=9, seed=5)
    settings = EvalConfig(max_new_tokens=NEW, baselines="none", repeats=1, loop="both", block_size=B,
                          fused=FusedConfig(groups=2))  # anchors chosen by the drafter's (float) confidence
    report = run_eval(model, tokenizer, meta, prompt_ids, settings, progress=False)
    try:
        run_eval(model, tokenizer, meta, prompt_ids, EvalConfig(max_new_tokens=NEW, repeats=1), progress=False)
        hf_baselines = "ran"
    except ValueError as exc:
        hf_baselines = str(exc)
    dist.barrier()
    # more values than the broadcast holds: every rank raises at once (rank 1 must not wait out the timeout)
    t0 = time.perf_counter()
    try:
        Lockstep().agree([7, 8, 9], capacity=2, device=torch.device("cpu"))
        overflow = "agreed"
    except ValueError as exc:
        overflow = str(exc)
    overflow_s = time.perf_counter() - t0
    hook.remove()  # from here on this rank alone: its own greedy output
    solo = [autoregressive_generate(model, p, max_new_tokens=NEW).output_ids for p in prompt_ids]
    result = {"ar": [p["ar_ids"] for p in report["per_prompt"]], "spec": [p["spec_ids"] for p in report["per_prompt"]],
              "other_loop_match": report["baselines"][DRAFTER_OTHER_LOOP]["greedy_match"], "solo": solo,
              "forwards": forwards[0], "hf_baselines": hf_baselines, "overflow": overflow, "overflow_s": overflow_s}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared tiny models of test_speculative
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _worker(Path(sys.argv[1]))
