"""The decoders an evaluation compares, as :class:`Method` objects on one :class:`DecodeSetup`: the autoregressive
baseline, the two-forward loop with any :class:`~.proposal.Drafter` and transformers' ``generate`` (plain and
prompt lookup). Each drafter kind adds its own loops (:meth:`dflash_ds.kinds.base.DraftKind.methods`);
:func:`dflash_ds.evaluate.methods.build_methods` puts a comparison together."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..lora import adapter_disabled
from .engine import StaticDecoding
from .lockstep import Lockstep
from .loop import autoregressive_generate, speculative_generate


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
    """What every method of one evaluation shares: the model, the resolved config (an ``EvalConfig``), EOS/pad ids,
    the drafter's metadata, the static cache (``--compile``) and, in a lockstep eval, the :class:`Lockstep`."""

    model: nn.Module
    config: Any
    meta: Any
    eos: list[int]
    pad: int
    static: StaticDecoding | None = None
    lockstep: Lockstep | None = None  # every rank decodes every prompt: rank 0 decides (run_eval)


class Method:
    """One decoder in the comparison: ``name`` (its key in the report), ``label`` (its row in the table),
    :meth:`generate`, and ``max_new_tokens`` when it generates fewer tokens per prompt than the others (the floor).
    A drafter's method has its :class:`~dflash_ds.kinds.base.EvalDrafter` (``drafter``), made the model's by
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


__all__ = ["Autoregressive", "DecodeSetup", "Generation", "HFGenerate", "Method", "TwoForwardLoop"]
