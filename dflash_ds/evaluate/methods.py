"""The decoders compared: the autoregressive baseline, every drafter (a LoRA adapter through dflash-ds's two loops,
a standalone DFlash drafter through its loop), transformers' ``generate`` (plain and prompt lookup), the
untrained-adapter floor and the n-gram drafter. :func:`build_methods` picks them for an
:class:`~dflash_ds.evaluate.config.EvalConfig` and the eval's drafters (:mod:`.drafters`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..lora import adapter_disabled
from ..speculative import (
    LoRABlockDrafter,
    Lockstep,
    NgramDrafter,
    StaticDecoding,
    autoregressive_generate,
    dflash_generate,
    fused_generate,
    speculative_generate,
    untrained_floor_drafter,
)
from .config import (
    AR,
    DFLASH_LOOP,
    FLOOR,
    HF_GREEDY,
    NGRAM,
    PROMPT_LOOKUP,
    EvalConfig,
    default_loop,
)


@dataclass
class Generation:
    """One method's output for one prompt: new ids, seconds, what the loop recorded (a :class:`SpecResult`, or a dict
    for transformers' ``generate``) and the model forwards it took."""

    ids: list[int]
    seconds: float
    result: Any
    forwards: int


@dataclass
class DecodeSetup:
    """What every method of one evaluation shares: the model, the resolved config, EOS/pad ids, the adapter's
    metadata, the static cache (``--compile``) and, in a lockstep eval, the :class:`Lockstep`."""

    model: nn.Module
    config: EvalConfig
    meta: Any
    eos: list[int]
    pad: int
    static: StaticDecoding | None = None
    lockstep: Lockstep | None = None  # every rank decodes every prompt: rank 0 decides (run_eval)


class Method:
    """One decoder in the comparison: ``name`` (its key in the report), ``label`` (its row in the table),
    :meth:`generate`, and ``max_new_tokens`` when it generates fewer tokens per prompt than the others (the floor).
    A drafter's method has its :class:`~dflash_ds.evaluate.drafters.EvalDrafter` (``drafter``), made the model's by
    :meth:`activate` before each generation (outside the timing)."""

    name: str
    label: str
    max_new_tokens: int | None = None
    drafter: Any = None

    def __init__(self, name: str, label: str, setup: DecodeSetup) -> None:
        self.name, self.label, self.setup = name, label, setup

    def activate(self) -> None:
        if self.drafter is not None:
            self.drafter.activate()

    def generate(self, prompt: list[int], generator: torch.Generator | None, max_new_tokens: int) -> Generation:
        raise NotImplementedError


class Autoregressive(Method):
    """The baseline every speedup is measured against: one adapter-off forward per token, on dflash-ds's engine."""

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = autoregressive_generate(s.model, prompt, max_new_tokens=max_new_tokens, eos_token_ids=s.eos,
                                    temperature=s.config.temperature, generator=generator, static=s.static,
                                    lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards)


class TwoForwardLoop(Method):
    """dflash-ds's draft-then-verify loop with a drafter (the adapter, the untrained floor, n-gram lookup)."""

    def __init__(self, name: str, label: str, setup: DecodeSetup, make_drafter: Callable[[], Any]) -> None:
        super().__init__(name, label, setup)
        self.make_drafter = make_drafter

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = speculative_generate(s.model, prompt, self.make_drafter(), block_size=s.config.block_size,
                                 max_new_tokens=max_new_tokens, eos_token_ids=s.eos, temperature=s.config.temperature,
                                 generator=generator, static=s.static, lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards)


class FusedLoop(Method):
    """The adapter through the fused loop (one forward per step)."""

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = fused_generate(s.model, prompt, s.meta.mask_token_id, block_size=s.config.block_size,
                           max_new_tokens=max_new_tokens, eos_token_ids=s.eos, temperature=s.config.temperature,
                           generator=generator, config=s.config.fused, static=s.static, lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards)


class StandaloneLoop(Method):
    """A standalone DFlash drafter (:func:`dflash_generate`): its own draft forward, then the target's verify
    forward on the session every loop uses (static/compiled, lockstep)."""

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = dflash_generate(s.model, self.drafter.draft_model, prompt, max_new_tokens, eos_token_ids=s.eos,
                            temperature=s.config.temperature, generator=generator, block_size=s.config.block_size,
                            mask_token_id=s.meta.mask_token_id, static=s.static, lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards)


class HFGenerate(Method):
    """transformers' own greedy ``generate``, optionally with its prompt lookup (``prompt_lookup`` tokens)."""

    def __init__(self, name: str, label: str, setup: DecodeSetup, prompt_lookup: int | None) -> None:
        super().__init__(name, label, setup)
        self.prompt_lookup = prompt_lookup

    def generate(self, prompt, generator, max_new_tokens):
        model, s = self.setup.model, self.setup
        count = [0]
        hook = model.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        ids = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
        kwargs: dict[str, Any] = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=s.eos or None, pad_token_id=s.pad)
        if self.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        try:
            with torch.no_grad(), adapter_disabled(model):
                t0 = time.perf_counter()
                out = model.generate(ids, **kwargs)
                seconds = time.perf_counter() - t0
        finally:
            hook.remove()
        new = out[0, len(prompt) :].tolist()
        for i, tok in enumerate(new):
            if tok in s.eos:
                new = new[: i + 1]
                break
        return Generation(new, seconds, {"forwards": count[0], "tokens": len(new)}, count[0])


def drafter_methods(setup: DecodeSetup, drafter) -> list[Method]:
    """The rows of one drafter (``setup`` resolved for it): a standalone drafter's loop; a LoRA adapter's
    ``--loop``, and with ``both`` the other loop beside it."""
    cfg, meta = setup.config, setup.meta

    def loop_method(loop: str, name: str) -> Method:
        label = drafter.label(loop)
        if loop == DFLASH_LOOP:
            m: Method = StandaloneLoop(name, label, setup)
        elif loop == "fused":
            m = FusedLoop(name, label, setup)
        else:
            m = TwoForwardLoop(name, label, setup, lambda: LoRABlockDrafter(meta.mask_token_id, meta.scope))
        m.drafter = drafter
        return m

    if cfg.loop == DFLASH_LOOP:
        return [loop_method(DFLASH_LOOP, drafter.key)]
    first = cfg.loop if cfg.loop != "both" else default_loop(next(setup.model.parameters()).device)
    methods = [loop_method(first, drafter.key)]
    if cfg.loop == "both":
        methods.append(loop_method("two_forward" if first == "fused" else "fused", drafter.other_key))
    return methods


def build_methods(setup: DecodeSetup, drafters: Sequence[Any] = (), configs: Sequence[EvalConfig] = ()
                  ) -> list[Method]:
    """The decoders of one evaluation, the autoregressive baseline first (every speedup is measured against it),
    then every drafter's rows (``drafters[i]`` resolved as ``configs[i]``; none given: the adapter on the model,
    ``setup``'s), then the baselines (``setup``'s config: the first drafter's)."""
    cfg, meta = setup.config, setup.meta
    greedy = cfg.temperature == 0
    if not drafters:
        from .drafters import in_memory_lora

        drafters, configs = [in_memory_lora(setup.model, meta)], [cfg]
    methods: list[Method] = [Autoregressive(AR, "autoregressive (our engine)", setup)]
    for drafter, dcfg in zip(drafters, configs):
        methods += drafter_methods(dataclasses.replace(setup, config=dcfg, meta=drafter.meta), drafter)
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
