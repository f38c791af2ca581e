"""The comparison of one evaluation (:func:`build_methods`): the autoregressive baseline, every drafter's rows (its
kind's loops, :meth:`dflash_ds.kinds.base.DraftKind.methods`) and the baselines (transformers' ``generate`` with
prompt lookup, the untrained-adapter floor, the n-gram drafter, transformers' greedy). The decoders themselves:
:mod:`dflash_ds.speculative.decoders`."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..kinds import in_memory_lora, kind_class, untrained_floor_drafter
from ..speculative import NgramDrafter
from ..speculative.decoders import Autoregressive, DecodeSetup, HFGenerate, Method, TwoForwardLoop
from .config import AR, FLOOR, HF_GREEDY, NGRAM, PROMPT_LOOKUP, EvalConfig


def build_methods(setup: DecodeSetup, drafters: Sequence[Any] = (), configs: Sequence[EvalConfig] = ()
                  ) -> list[Method]:
    """The decoders of one evaluation, the autoregressive baseline first (every speedup is measured against it),
    then every drafter's rows (``drafters[i]`` resolved as ``configs[i]``; none given: the adapter on the model,
    ``setup``'s), then the baselines (``setup``'s config: the first drafter's)."""
    cfg, meta = setup.config, setup.meta
    greedy = cfg.temperature == 0
    if not drafters:
        drafters, configs = [in_memory_lora(setup.model, meta)], [cfg]
    methods: list[Method] = [Autoregressive(AR, "autoregressive (our engine)", setup)]
    for drafter, dcfg in zip(drafters, configs):
        methods += kind_class(drafter.kind).methods(dataclasses.replace(setup, config=dcfg, meta=drafter.meta), drafter)
    if setup.lockstep is not None and greedy and cfg.baselines != "none":
        raise ValueError("an eval on every rank in lockstep (torch.distributed initialised, no shard) runs "
                         "dflash-ds's loops only: transformers' generate cannot follow rank 0's tokens, and a rank "
                         "that picked another token would wait on the others until the timeout; use "
                         "baselines='none', or shard the prompts (shard=(rank, world))")
    if cfg.baselines in ("fast", "all"):
        if greedy:
            methods.append(HFGenerate(PROMPT_LOOKUP, "prompt lookup (transformers)", setup, cfg.prompt_lookup_tokens))
        floor_tokens = min(cfg.floor_tokens or cfg.max_new_tokens, cfg.max_new_tokens)
        shorter = f", first {floor_tokens}" if floor_tokens < cfg.max_new_tokens else ""
        floor = TwoForwardLoop(FLOOR, f"untrained adapter (floor{shorter})", setup,
                               lambda: untrained_floor_drafter(meta.mask_token_id))
        floor.max_new_tokens = floor_tokens
        methods.append(floor)
    if cfg.baselines == "all":
        methods.append(TwoForwardLoop(NGRAM, "n-gram lookup (our loop)", setup, NgramDrafter))
        if greedy:
            methods.append(HFGenerate(HF_GREEDY, "greedy (transformers)", setup, None))
    return methods


__all__ = ["build_methods"]
