#!/usr/bin/env python
"""Self-distillation throughput: continuous batching against static batches, side by side on the same prompts.

``dflash_ds.regenerate.greedy_stream`` refills a finished row's slot with the next prompt. The static mode is the
same function fed one batch at a time (rows still leave when they end, nothing refills; as regenerate batched
before 2026-12-02, but with its per-prompt prefill, so the ratio is the refilling's alone). For each ``--batch-sizes`` entry both modes answer the same ``--num-prompts`` prompts (longest first, as
``regenerate`` orders them), one process with ``--threads`` threads (1: what each of the recipe's two regeneration
ranks gets), alternating mode by mode over ``--repeats`` rounds. Reported: answer tokens/s (answer tokens plus
the end-of-turn where the target wrote it, as ``RegenStats`` counts them), the ratio continuous/static per batch
size and against the static batch of 8 (the earlier SmolLM2 default), and how many answers differ between the modes
(greedy on one prompt is the same whatever it is batched with, up to float rounding on near-ties).

Prompts: the SmolLM2 recipe's training prompts (``dflash-ds demo --target smollm2``'s "complete this function"
turns), rendered as regenerate renders them. Model: ``--model-path`` (default: the cached SmolLM2 conversion of
``dflash-ds real-target``).

    python bench/regenerate.py --out bench/results/regenerate_smollm2.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure as M  # noqa: E402

M.ensure_repo_on_path()

BASELINE_BATCH = 8  # the SmolLM2 recipe's batch before continuous batching


def _prompts(tokenizer, num: int) -> list[list[int]]:
    from dflash_ds.data import read_conversations, render_chat
    from dflash_ds.recipes.corpus import write_function_prompts
    from dflash_ds.regenerate import prompt_messages

    with tempfile.TemporaryDirectory() as tmp:
        train, _ = write_function_prompts(Path(tmp), num, 1)
        conversations, _ = read_conversations(str(train), bad_lines="error")
    texts = [render_chat(tokenizer, prompt_messages(c), add_generation_prompt=True) for c in conversations]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sorted(ids, key=len, reverse=True)


def answer(model, prompts, max_new_tokens: int, eos_id: int, batch_size: int, continuous: bool):
    """``{i: ids}`` and seconds; static: one ``greedy_stream`` call per batch of ``batch_size`` prompts."""
    from dflash_ds.regenerate import greedy_stream

    t0 = time.perf_counter()
    out = {}
    if continuous:
        out.update(greedy_stream(model, prompts, max_new_tokens, eos_id, batch_size))
    else:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            out.update((start + k, ids) for k, ids in greedy_stream(model, chunk, max_new_tokens, eos_id, batch_size))
    return out, time.perf_counter() - t0


def answer_tokens(out: dict[int, list[int]], eos_id: int) -> int:
    from dflash_ds.regenerate import answer_tokens as split

    total = 0
    for row in out.values():
        ids, truncated = split(row, eos_id)
        total += len(ids) + (0 if truncated else 1)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None)
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="8,16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="bench/results/regenerate.json")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    if args.model_path is None:
        from dflash_ds.recipes.real_target import ensure_real_target

        args.model_path = str(ensure_real_target())
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    prompts = _prompts(tokenizer, args.num_prompts)
    eos = tokenizer.eos_token_id
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    answer(model, prompts[:2], 4, eos, 2, True)  # warm-up
    runs: dict[str, dict] = {}
    for rep in range(args.repeats):
        for bs in sizes:
            for continuous in (False, True):
                key = f"{'continuous' if continuous else 'static'}_b{bs}"
                out, seconds = answer(model, prompts, args.max_new_tokens, eos, bs, continuous)
                run = runs.setdefault(key, {"batch_size": bs, "continuous": continuous, "seconds": [], "outputs": out})
                run["seconds"].append(seconds)
                run["tokens"] = answer_tokens(out, eos)
                print(f"round {rep + 1} {key:<16} {run['tokens']} tokens in {seconds:6.1f} s: "
                      f"{run['tokens'] / seconds:6.1f} tokens/s", flush=True)
    results = {}
    for key, run in runs.items():
        median = statistics.median(run["seconds"])
        results[key] = {"batch_size": run["batch_size"], "continuous": run["continuous"], "tokens": run["tokens"],
                        "seconds": run["seconds"], "tokens_per_s": run["tokens"] / median}
    reference = runs[f"static_b{sizes[0]}"]["outputs"]
    differing = {key: sum(run["outputs"][i] != reference[i] for i in reference) for key, run in runs.items()}
    baseline = results.get(f"static_b{BASELINE_BATCH}")
    ratios = {f"continuous_over_static_b{bs}": results[f"continuous_b{bs}"]["tokens_per_s"]
              / results[f"static_b{bs}"]["tokens_per_s"] for bs in sizes}
    if baseline:
        ratios.update({f"continuous_b{bs}_over_static_b{BASELINE_BATCH}": results[f"continuous_b{bs}"]["tokens_per_s"]
                       / baseline["tokens_per_s"] for bs in sizes})
    report = {"date": M.utc_now().isoformat(timespec="seconds"), "command": M.command_line(__file__, argv),
              "machine": M.machine_info(), "model": args.model_path, "num_prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "repeats": args.repeats,
              "results": results, "ratios": ratios,
              "answers_differing_from_" + f"static_b{sizes[0]}": differing}
    path = M.write_json(args.out, report)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"answers differing from static_b{sizes[0]}: {differing}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
