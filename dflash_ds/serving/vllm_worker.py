"""Runs INSIDE the vLLM environment (its own venv, :mod:`.vllm_env`), never imported by dflash-ds: greedy decoding
of token-id prompts by vLLM's engine, autoregressive or with a speculative method (a DFlash drafter, or vLLM's own
n-gram prompt lookup), and the engine's speculative-decoding counters.

    python vllm_worker.py --model TARGET [--dflash DRAFTER --num-spec N | --ngram N] --prompts P.json --out R.json

``P.json``: a list of token-id lists. ``R.json``: ``outputs`` (the generated ids per prompt, as vLLM returns them),
``seconds`` per prompt, ``tokens``, and for a speculative run ``drafts``, ``draft_tokens``, ``accepted``,
``accepted_per_position`` and ``mean_acceptance_length`` (1 + accepted / drafts: the committed tokens per verify
step, the bonus token included). Prompts are decoded one at a time (batch 1, as dflash-ds's decoder).
"""

import argparse
import json
import sys
import time


def counters(llm) -> dict:
    """vLLM's speculative-decoding counters (``vllm:spec_decode_*``) from ``LLM.get_metrics()``."""
    out = {}
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:spec_decode_")
        if name == m.name:
            continue
        if hasattr(m, "values"):
            out[name] = list(m.values)
        else:
            out[name] = m.value
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dflash", default=None, help="a DFlash drafter directory")
    p.add_argument("--num-spec", type=int, default=None, help="num_speculative_tokens (the drafter's block size - 1)")
    p.add_argument("--ngram", type=int, default=None, help="vLLM's n-gram prompt lookup with this many tokens")
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--memory", type=float, default=0.3, help="gpu_memory_utilization (on a CPU: the share of RAM)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=args.model, dtype="float32", enforce_eager=True, gpu_memory_utilization=args.memory,
                  max_model_len=args.max_model_len, seed=0, disable_log_stats=False)
    if args.dflash:
        kwargs["speculative_config"] = {"method": "dflash", "model": args.dflash,
                                        "num_speculative_tokens": args.num_spec}
    elif args.ngram:
        kwargs["speculative_config"] = {"method": "ngram", "num_speculative_tokens": args.ngram,
                                        "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    prompts = json.loads(open(args.prompts).read())
    llm.generate([TokensPrompt(prompt_token_ids=list(prompts[0]))], params, use_tqdm=False)  # warm-up, untimed
    before = counters(llm)
    outputs, seconds = [], []
    for ids in prompts:
        t0 = time.perf_counter()
        result = llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        outputs.append(list(result[0].outputs[0].token_ids))
    after = counters(llm)
    report = {"outputs": outputs, "seconds": seconds, "tokens": sum(map(len, outputs)), "load_s": load_s,
              "vllm_version": __import__("vllm").__version__}
    if args.dflash or args.ngram:
        def delta(key):
            a, b = after.get(key, 0), before.get(key, 0)
            return [x - y for x, y in zip(a, b)] if isinstance(a, list) else a - b
        drafts, accepted = delta("num_drafts"), delta("num_accepted_tokens")
        report.update(drafts=drafts, draft_tokens=delta("num_draft_tokens"), accepted=accepted,
                      accepted_per_position=delta("num_accepted_tokens_per_pos"),
                      mean_acceptance_length=(1 + accepted / drafts) if drafts else None)
    with open(args.out, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
