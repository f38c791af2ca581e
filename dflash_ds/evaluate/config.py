"""The eval's settings (:class:`EvalConfig`) and names: the method keys of the report, the loop and compile choices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..kinds import DRAFTER, DRAFTER_OTHER_LOOP, FusedConfig, kind_class, kind_of
from ..settings import check_choices, setting

BASELINE_CHOICES = ("none", "fast", "all")
SPLIT_AT = 32  # tau is split into steps that start within the first 32 generated tokens and the rest

# method keys, in table order (DRAFTER, DRAFTER_OTHER_LOOP: the drafters' rows, named by the kinds' seam)
NGRAM = "ngram"
PROMPT_LOOKUP = "prompt_lookup_hf"
FLOOR = "untrained_floor"
HF_GREEDY = "hf_greedy"
AR = "autoregressive"
TABLE_ORDER = (DRAFTER, DRAFTER_OTHER_LOOP, NGRAM, PROMPT_LOOKUP, FLOOR, HF_GREEDY)
LOOP_CHOICES = ("auto", "fused", "two_forward", "both")
COMPILE_CHOICES = ("none", "static", "compile")


def compile_mode(model: nn.Module) -> str | None:
    """``reduce-overhead`` (CUDA graphs) on a GPU, where launch overhead is most of a decode forward at batch 1;
    inductor's default elsewhere."""
    return "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None


@dataclass
class EvalConfig:
    """Decoding (what every method generates, and how the drafter's loop runs)."""

    max_new_tokens: int = setting(256, "tokens generated per prompt")
    temperature: float = setting(0.0, "0 = greedy; above 0 every method samples (lossless rejection sampling)")
    block_size: int | None = setting(None, "draft block size (default: the trained one)")
    repeats: int = setting(3, "timing rounds for the speedup interval")
    baselines: str = setting("fast", "none; fast: prompt lookup (transformers) and the untrained-adapter floor; all: "
                             "also the same n-gram drafter through dflash-ds's loop and transformers' greedy generate",
                             choices=BASELINE_CHOICES)
    loop: str = setting("auto", "a LoRA adapter's decoding loop: fused (one forward per step), two_forward (draft, "
                        "then verify), both side by side (the drafter row: two_forward on a CPU, fused on a GPU, as "
                        "measured), or auto: both for scope block adapters, two_forward for scope all (a standalone "
                        "DFlash drafter always drafts with its own forward, then verifies)",
                        choices=LOOP_CHOICES)
    fused: FusedConfig = dataclasses.field(default_factory=FusedConfig)
    compile: str = setting("none", "decode forwards on a static KV cache (static), and torch.compile-d (compile; CUDA "
                           "graphs on a GPU): the target's forwards of dflash-ds's loops and the AR baseline alike "
                           "(LoRA adapters of scope block; a standalone drafter's own forward stays eager)",
                           choices=COMPILE_CHOICES)
    seed: int = setting(0, "seed of the sampled generations")
    prompt_lookup_tokens: int | None = setting(None, "K for prompt lookup (default B-1)")
    floor_tokens: int | None = setting(None, "tokens per prompt for the untrained-adapter floor (default: all of "
                                       "--max-new-tokens); at tau ~1 it costs two forwards a token, the slowest row, "
                                       "and its tau barely moves along an answer")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.floor_tokens is not None and self.floor_tokens < 1:
            raise ValueError(f"--floor-tokens must be >= 1, got {self.floor_tokens}")

    def resolved(self, meta, name: str | None = None) -> "EvalConfig":
        """This config with ``auto``/None filled for a drafter's ``meta`` (a LoRA adapter's or a standalone
        drafter's): the loop, the block size (checked against the trained one) and prompt lookup's K. ``name``
        (the drafter's) goes into the errors."""
        who = f"{name}: " if name else ""
        return kind_class(kind_of(meta)).resolve_eval(self, meta, who)
