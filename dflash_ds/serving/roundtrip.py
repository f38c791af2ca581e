"""``dflash-ds serve-check``: an exported standalone drafter served by vLLM, checked against dflash-ds's own decoder.

On the same prompts (token ids, rendered once here), greedy:

1. dflash-ds: ``run_eval`` with the drafter next to the target (its τ, tokens/s, and the autoregressive output);
2. vLLM (its own environment, :mod:`.vllm_env`): the target alone, the target with the drafter
   (``speculative_config={"method": "dflash", "num_speculative_tokens": B - 1}``), and vLLM's own n-gram prompt
   lookup with ``B - 1`` tokens.

Checked: vLLM's outputs with the drafter equal its outputs without it and dflash-ds's autoregressive outputs, token
for token; vLLM's mean acceptance length agrees with dflash-ds's τ within :data:`TAU_TOLERANCE`. The two count steps
alike (committed tokens per verify forward, the bonus included) but not the same steps: dflash-ds drafts its first
block from the last prompt token, while vLLM's prefill emits the first token itself and drafts from there; and each
engine's last step of an answer is cut at ``max_new_tokens``. So the two are close, not equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..evaluate import EvalConfig, load_prompts, run_eval
from ..files import write_json_atomic
from ..kinds import DFLASH, load_drafters, open_drafter
from ..speculative import eos_ids_of
from .vllm_env import VLLMEnvError, ensure_vllm_env, run_worker

TAU_TOLERANCE = 0.15  # relative: |vLLM's mean acceptance length / dflash-ds's tau - 1|


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    """An answer up to and including its first EOS (what both engines stop on)."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def serve_check(model_path: str, drafter_dir: str, prompts_path: str, *, limit: int | None = 16,
                max_new_tokens: int = 64, python: Path | None = None, ngram: bool = True) -> dict:
    """The round trip's report: per engine and method the outputs' agreement, τ / mean acceptance length and
    tokens/s; ``ok`` when every check passed."""
    artifact = open_drafter(drafter_dir, expect=DFLASH)
    B = int(artifact.meta.block_size)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = load_prompts(prompts_path, tokenizer, limit=limit)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = set(eos_ids_of(tokenizer, model))
    ours = run_eval(model, tokenizer, load_drafters(model, [artifact]), prompts,
                    EvalConfig(max_new_tokens=max_new_tokens, repeats=1, baselines="none"), progress=False)
    ar = [_strip_eos(p["ar_ids"], eos) for p in ours["per_prompt"]]
    python = python or ensure_vllm_env()
    max_len = max(map(len, prompts)) + max_new_tokens + 2 * B
    runs = {"autoregressive": run_worker(python, model_path, prompts, max_new_tokens, max_model_len=max_len),
            "dflash": run_worker(python, model_path, prompts, max_new_tokens, dflash=str(artifact.path),
                                 num_spec=B - 1, max_model_len=max_len)}
    if ngram:
        runs["ngram"] = run_worker(python, model_path, prompts, max_new_tokens, ngram=B - 1, max_model_len=max_len)
    base_tps = runs["autoregressive"]["tokens"] / sum(runs["autoregressive"]["seconds"])
    engines = {}
    for name, r in runs.items():
        outs = [_strip_eos(o, eos) for o in r["outputs"]]
        tps = r["tokens"] / sum(r["seconds"])
        engines[name] = {"identical_to_dflash_ds_ar": sum(o == a for o, a in zip(outs, ar)),
                         "mean_acceptance_length": r.get("mean_acceptance_length"),
                         "accepted_per_position": r.get("accepted_per_position"), "drafts": r.get("drafts"),
                         "tokens_per_s": tps, "speedup": tps / base_tps, "tokens": r["tokens"]}
    drafter = ours["drafters"]["drafter"]
    tau, vllm_tau = drafter["tau"], engines["dflash"]["mean_acceptance_length"]
    checks = {
        "vllm_dflash_equals_vllm_ar": all(_strip_eos(a, eos) == _strip_eos(b, eos) for a, b in
                                          zip(runs["dflash"]["outputs"], runs["autoregressive"]["outputs"])),
        "vllm_ar_equals_dflash_ds_ar": engines["autoregressive"]["identical_to_dflash_ds_ar"] == len(prompts),
        "vllm_dflash_equals_dflash_ds_ar": engines["dflash"]["identical_to_dflash_ds_ar"] == len(prompts),
        "dflash_ds_lossless": bool(drafter["greedy_match"]),
        "acceptance_agrees": vllm_tau is not None and abs(vllm_tau / tau - 1) <= TAU_TOLERANCE,
    }
    return {"ok": all(checks.values()), "checks": checks, "prompts": len(prompts), "block_size": B,
            "max_new_tokens": max_new_tokens, "tau_tolerance_relative": TAU_TOLERANCE,
            "dflash_ds": {"tau": tau, "speedup": drafter.get("speedup"),
                          "tokens_per_s": drafter.get("tokens_per_s"),
                          "acceptance_by_position": drafter.get("acceptance_by_position"),
                          "ar_tokens_per_s": ours.get("ar_tokens_per_s")},
            "vllm": engines, "vllm_version": runs["dflash"].get("vllm_version"),
            "per_prompt_tokens": [len(a) for a in ar], "median_prompt_tokens": statistics.median(map(len, prompts))}


def format_report(r: dict) -> str:
    lines = [f"{'engine / method':34s} {'tau':>6s} {'tok/s':>8s} {'speedup':>8s}  identical to dflash-ds AR",
             "-" * 82,
             f"{'dflash-ds, dflash drafter':34s} {r['dflash_ds']['tau']:6.2f} "
             f"{r['dflash_ds']['tokens_per_s'] or 0:8.1f} {r['dflash_ds']['speedup'] or 0:7.2f}x  "
             f"{'yes' if r['checks']['dflash_ds_lossless'] else 'NO'}"]
    for name, e in r["vllm"].items():
        tau = e["mean_acceptance_length"]
        lines.append(f"{'vLLM ' + name:34s} {tau if tau is not None else 1.0:6.2f} {e['tokens_per_s']:8.1f} "
                     f"{e['speedup']:7.2f}x  {e['identical_to_dflash_ds_ar']}/{r['prompts']}")
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["checks"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dflash-ds serve-check", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True, help="the target model directory")
    p.add_argument("--drafter", required=True, help="an exported standalone drafter (OUTPUT/drafter)")
    p.add_argument("--prompts", required=True, help="JSONL prompts (as dflash-ds eval)")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-ngram", action="store_true", help="skip vLLM's own n-gram prompt lookup")
    p.add_argument("--report", default=None, help="write the report (JSON) here")
    args = p.parse_args(argv)
    try:
        report = serve_check(args.model_path, args.drafter, args.prompts, limit=args.limit,
                             max_new_tokens=args.max_new_tokens, ngram=not args.no_ngram)
    except (FileNotFoundError, ValueError, VLLMEnvError) as exc:
        print(f"dflash-ds serve-check: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.report:
        write_json_atomic(args.report, report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
