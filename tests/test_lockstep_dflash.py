"""A standalone DFlash drafter decodes in lockstep on every rank, beside a LoRA adapter, in one ``run_eval`` (the
in-training eval's call under ZeRO-3 / tensor parallelism, where every target forward is collective).

As tests/test_lockstep.py does for the LoRA loops: 2 gloo ranks whose models differ slightly (rank 1 has noise on
its output head, adapter and standalone drafter, so its own greedy tokens and drafts are not rank 0's) and whose
target forwards are collective (a pre-hook all-reduces). Every rank must return rank 0's outputs for both drafters,
run the same forwards, and finish. This file is also the worker: ``python tests/test_lockstep_dflash.py OUT_DIR``
under torchrun.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_lockstep import count_collective_forwards, perturb_on_rank_1, run_two_ranks

pytestmark = pytest.mark.slow  # multi-rank / subprocess runs: left out of the fast subset (-m "not slow")

NEW, B = 12, 4


def test_both_kinds_follow_rank_0_and_the_run_finishes(tmp_path):
    r0, r1 = run_two_ranks(__file__, tmp_path)
    assert r0["solo"] != r1["solo"], "rank 1's noise must change its own greedy output, or the test shows nothing"
    assert r0["ar"] == r1["ar"] == r0["solo"]  # rank 0's greedy output on both ranks
    assert r0["matches"] == r1["matches"] == {"drafter": True, "drafter_2": True}  # both kinds commit it
    assert r0["taus"] == r1["taus"]  # the same drafts accepted: rank 0's
    assert r0["kinds"] == ["lora", "dflash"]
    assert r0["forwards"] == r1["forwards"]  # the same target forwards, so no rank waited on another


def _worker(out: Path) -> None:
    from datetime import timedelta
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from dflash_ds.kinds.dflash import DFlashDraftModel, init_from_target, make_draft_config
    from dflash_ds.evaluate import EvalConfig, run_eval
    from dflash_ds.kinds import in_memory_lora, standalone_drafter
    from conftest import tiny_model
    from dflash_ds.lora import DraftMeta, LoRAConfig, apply_lora, lora_modules
    from dflash_ds.speculative import autoregressive_generate
    from test_speculative import MASK, prompts

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = tiny_model("qwen3", seed=3, num_hidden_layers=3)
    torch.manual_seed(4)
    draft = DFlashDraftModel(make_draft_config(model.config, 1, target_layer_ids=[1], block_size=B,
                                               mask_token_id=MASK)).eval()
    init_from_target(draft, model)  # from the plain target's last layer
    apply_lora(model, LoRAConfig(r=4, alpha=8))  # then a random scope-block adapter on it
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    if rank == 1:
        perturb_on_rank_1(model, draft.fc.weight)
    forwards, hook = count_collective_forwards(model)
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)  # token-id prompts need no vocabulary
    drafters = [in_memory_lora(model, DraftMeta(B, MASK, "block")), standalone_drafter(draft)]
    prompt_ids = prompts(2, length=9, seed=5)
    settings = EvalConfig(max_new_tokens=NEW, baselines="none", repeats=1, loop="two_forward", block_size=B)
    report = run_eval(model, tokenizer, drafters, prompt_ids, settings, progress=False)
    dist.barrier()
    hook.remove()  # from here on this rank alone: its own greedy output
    solo = [autoregressive_generate(model, p, max_new_tokens=NEW).output_ids for p in prompt_ids]
    result = {"ar": [p["ar_ids"] for p in report["per_prompt"]], "solo": solo, "forwards": forwards[0],
              "matches": {k: e["greedy_match"] for k, e in report["drafters"].items()},
              "taus": [p["drafters"] for p in report["per_prompt"]],
              "kinds": [e["kind"] for e in report["drafters"].values()]}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared tiny models of test_speculative
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _worker(Path(sys.argv[1]))
