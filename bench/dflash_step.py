#!/usr/bin/env python
"""Time of one standalone-drafter training step (forward + backward, no optimizer): the target run online against
its features read from disk (``--features``), at several blocks per sequence, side by side in one run.

A SmolLM2-135M-shaped target with random weights (Llama, 30 layers, hidden 576, 9 heads / 3 kv, vocab 49,152,
tied head; fp32 on the CPU) and a 2-layer drafter reading 2 target layers; one sequence of ``--seq`` tokens whose
last 3/4 are supervised, ``N`` random anchors per sequence (``--anchors``: counts, ``0`` = every valid anchor), block
size 8, CE + KL. ``online``: :class:`DFlashDraftObjective` runs the target's decoder over the sequence each step;
``offline``: the same objective reads the features (written once by a :class:`FeatureWriter`, then memory-mapped).
Every case: one warm-up step, then the median of ``--repeats`` timed steps. Writes ``--out`` (JSON) and prints a
table with each case's time, blocks/s and the offline/online ratio. ``--draft-vocabs N ...`` adds offline cases whose
drafter has its own lm_head over N rows (frozen or ``--draft-heads trained``), timed against the full vocabulary's.

    python bench/dflash_step.py --threads 2 --out bench/results/dflash_step_smollm2_shape.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dflash_ds.blocks import BlockConfig, build_block_layout  # noqa: E402
from dflash_ds.kinds.dflash import DFlashDraftModel, DFlashDraftObjective, FeatureTap, make_draft_config  # noqa: E402
from dflash_ds.kinds.dflash.dflash_model import init_draft_head  # noqa: E402
from dflash_ds.kinds.dflash.feature_cache import (  # noqa: E402
    COMPLETE, FeatureManifest, FeatureStore, FeatureWriter, open_for_writing,
)
from dflash_ds.loss import LossConfig  # noqa: E402

B, MASK = 8, 3


def smollm2_shape() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=8192, rms_norm_eps=1e-5)
    return LlamaForCausalLM(cfg).float().eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--anchors", type=int, nargs="+", default=[32, 0], help="blocks per sequence (0: every valid one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--draft-vocabs", type=int, nargs="*", default=[],
                   help="offline cases with a draft vocabulary of these sizes (its own lm_head), beside the full one")
    p.add_argument("--draft-heads", nargs="+", default=["frozen"], choices=["frozen", "trained"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = smollm2_shape()
    ids_layers = [8, 20]
    drafter = DFlashDraftModel(make_draft_config(target.config, 2, ids_layers, block_size=B, mask_token_id=MASK))
    S = args.seq
    input_ids = torch.randint(20, 49000, (1, S), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.zeros(1, S, dtype=torch.long)
    loss_mask[:, S // 4 :] = 1
    attention = torch.ones(1, S, dtype=torch.long)

    with tempfile.TemporaryDirectory() as tmp:  # the features of this one sequence, written as dflash-ds features does
        root = Path(tmp) / "f"
        manifest = FeatureManifest(target={}, layer_ids=ids_layers, hidden_size=576, data_key="bench", max_length=S,
                                   examples=1, tokens=S, dtype="float32", with_final=True, world_size=1)
        open_for_writing(root, manifest)
        writer = FeatureWriter(root, 0, manifest)
        tap = FeatureTap.of(target, ids_layers)
        with torch.no_grad(), tap.recording():
            out = target.model(input_ids=input_ids, use_cache=False)
            writer.append(0, tap.take(ids_layers)[0], out.last_hidden_state[0], flush=False)
        writer.close()
        (root / COMPLETE).write_text("")
        store = FeatureStore(root)

        loss = LossConfig(kl_weight=1.0)
        modes = {"online": DFlashDraftObjective(target, drafter, loss),
                 "offline": DFlashDraftObjective(target, drafter, loss, features=store)}
        for vocab in args.draft_vocabs:
            for head in args.draft_heads:
                own = DFlashDraftModel(make_draft_config(target.config, 2, ids_layers, block_size=B, mask_token_id=MASK,
                                                         draft_vocab_size=vocab), train_head=head == "trained")
                own.load_state_dict(drafter.state_dict(), strict=False)  # the same draft layers, its own head
                with torch.no_grad():
                    init_draft_head(own, target.lm_head.weight, torch.arange(vocab))
                modes[f"offline v{vocab} {head}"] = DFlashDraftObjective(target, own, loss, features=store)
        valid = int(loss_mask[0, 1:].sum())
        results = []
        for anchors in args.anchors:
            n = valid if anchors == 0 else min(anchors, valid)
            layout = build_block_layout(input_ids, loss_mask, attention, BlockConfig(block_size=B, mask_token_id=MASK,
                                                                                      num_anchors=n), [0])
            for mode, objective in modes.items():
                times = []
                for r in range(args.repeats + 1):
                    objective.drafter.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    objective(input_ids, attention, layout, examples=[0]).loss.backward()
                    if r:  # the first is the warm-up
                        times.append(time.perf_counter() - t0)
                sec = statistics.median(times)
                results.append({"mode": mode, "blocks": layout.num_blocks, "seconds": sec,
                                "blocks_per_s": layout.num_blocks / sec})
                print(f"{mode:22s} blocks {layout.num_blocks:4d}: {sec * 1000:8.1f} ms, "
                      f"{layout.num_blocks / sec:7.1f} blocks/s", flush=True)
    def ratios(mode: str, over: str) -> dict:
        base = {x["blocks"]: x["seconds"] for x in results if x["mode"] == over}
        return {str(x["blocks"]): x["seconds"] / base[x["blocks"]] for x in results if x["mode"] == mode}

    print("offline / online time:", {k: round(v, 3) for k, v in ratios("offline", "online").items()})
    vocab_ratios = {m: ratios(m, "offline") for m in modes if m.startswith("offline v")}
    for mode, r in vocab_ratios.items():
        print(f"{mode} / offline full vocabulary time:", {k: round(v, 3) for k, v in r.items()})
    report = {"shape": "SmolLM2-135M (random weights), 2-layer drafter, block 8, CE+KL, fp32 CPU", "seq": S,
              "threads": torch.get_num_threads(), "results": results,
              "offline_over_online": ratios("offline", "online"), "draft_vocab_over_full": vocab_ratios}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
