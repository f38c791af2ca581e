#!/usr/bin/env python
"""What the greedy verify saves by running the lm_head only on the rows it reads (``accept_greedy_lazy``).

One verify forward of ``B`` rows (``[t, d_1 .. d_{B-1}]``, adapter off) against ``--context-len`` cached tokens,
decided two ways, called round-robin (median of ``--repeats`` calls after warm-up):

* ``full``: the lm_head on all ``B`` rows, then ``accept_greedy`` (what the two-forward loop did before);
* ``lazy``: the final hidden states, then ``accept_greedy_lazy`` (the lm_head on 2 rows, then chunks that double, up
  to the first rejected row: what it does now on a CPU);
* ``body``: the forward without any lm_head (so ``1 - body/full`` is the lm_head's share of the full verify);

for drafts that the target accepts for ``n = 0 .. B-1`` tokens (built from the target's own argmax, so the decision
and its cost are the real ones), plus one autoregressive step (1 row) as the unit. Both decisions must agree.

Usage (from the repository root; default model: the cached SmolLM2 conversion, else a random Qwen3)::

    python bench/lazy_head.py --threads 1 --out bench/results/lazy_head_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import command_line, ensure_repo_on_path, machine_info, write_json  # noqa: E402

ensure_repo_on_path()


def lazy_head_costs(model, context_len: int, block_size: int, repeats: int, warmup: int, seed: int = 0) -> dict:
    import torch

    from dflash_ds.speculative import DecodeSession, accept_greedy, accept_greedy_lazy, cache_len, crop_cache
    from spec_decode import _interleaved_times

    B, L = block_size, context_len
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (L + B,), generator=g).tolist()
    session = DecodeSession(model, L + B + 2, B)
    cache = session.cache
    with torch.no_grad():
        session.forward(session.ids(tokens[:L]), 0, cache, kind="prefill")
        # the target's own greedy continuation after the anchor: drafting its first n tokens gets n accepted
        anchor = tokens[L]
        ids, chain = [anchor], []
        for _ in range(B - 1):
            nxt = session.forward(session.ids(ids[-1:]), L + len(ids) - 1, cache).argmax(-1).tolist()[0]
            chain.append(nxt)
            ids.append(nxt)
        crop_cache(cache, cache_len(cache) - L)
        out = {"context_len": L, "block_size": B, "per_accepted": {}}
        one = session.ids([anchor])
        for n in range(B):
            drafted = chain[:n] + [(c + 1) % model.config.vocab_size for c in chain[n:]]
            block = session.ids([anchor, *drafted])

            def ar():
                return session.forward(one, L, cache).argmax(-1).tolist()

            def full():
                return accept_greedy(drafted, session.forward(block, L, cache))

            def lazy():
                return accept_greedy_lazy(drafted, session.forward(block, L, cache, head=False), session.lm_head,
                                          session.verify_first_rows)

            def body():  # no lm_head at all: what the head costs is full - body
                return session.forward(block, L, cache, head=False)[-1, 0].item()

            decisions = []
            for decide in (full, lazy):
                decisions.append(decide())
                crop_cache(cache, cache_len(cache) - L)
            assert decisions[0] == decisions[1] and decisions[0][0] == n, (n, decisions)
            t = _interleaved_times({"ar": ar, "full": full, "lazy": lazy, "body": body},
                                   lambda: crop_cache(cache, cache_len(cache) - L), repeats, warmup, None)
            out["per_accepted"][n] = {
                "t_ar_s": t["ar"]["median_s"], "t_full_s": t["full"]["median_s"], "t_lazy_s": t["lazy"]["median_s"],
                "full_over_ar": t["full"]["median_s"] / t["ar"]["median_s"],
                "lazy_over_ar": t["lazy"]["median_s"] / t["ar"]["median_s"],
                "lazy_over_full": t["lazy"]["median_s"] / t["full"]["median_s"],
                "t_body_s": t["body"]["median_s"],
                "head_share_of_full": 1 - t["body"]["median_s"] / t["full"]["median_s"],
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="target directory (default: the cached SmolLM2 conversion)")
    p.add_argument("--context-len", type=int, default=300)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results/lazy_head.json")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = args.model_path
    if path is None:
        from dflash_ds.recipes.real_target import ensure_real_target

        path = str(ensure_real_target())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    res = lazy_head_costs(model, args.context_len, args.block_size, args.repeats, args.warmup)
    for n, r in res["per_accepted"].items():
        print(f"n={n}: full {r['full_over_ar']:.2f} AR, lazy {r['lazy_over_ar']:.2f} AR, "
              f"lazy/full {r['lazy_over_full']:.3f}, lm_head share of full {r['head_share_of_full']:.2f}")
    write_json(args.out, {"command": command_line(__file__, argv), "machine": machine_info(), "model": path,
                          "threads": args.threads, **res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
