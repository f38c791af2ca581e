"""A small but real Qwen3-architecture target LM, built offline from the Python standard library.

Why this exists: the drafter (a LoRA adapter on the target itself) needs a target to be trained against, and a
newcomer without internet access or a GPU cannot download Qwen3-8B. Every machine that runs this project has a
Python standard library, so we train a tiny byte-level BPE tokenizer (:mod:`.tokenizer`) and a tiny
``Qwen3ForCausalLM`` (:mod:`.pretrain`) on the stdlib's own functions ("signature + docstring" -> "body",
:mod:`.corpus`), rendered as ChatML conversations. The result is a ``from_pretrained``-ready directory that behaves
like any Hugging Face causal LM (same chat template machinery, same KV cache, same attention code paths) so every
later stage (data, training, speculative decoding) can be exercised end to end on a laptop.

The build is deterministic for a given Python version (the stdlib differs between versions), seed and thread
count, and takes about 5 minutes on two otherwise idle CPU cores with the defaults. It is cached once per machine
(:mod:`.cache`); ``dflash-ds build-tiny-target`` / ``dflash-ds tiny-target`` are its commands (:mod:`.commands`).

Public API::

    TinyTargetConfig;  build_tiny_target(out_dir, config=None, progress=True) -> dict
    ensure_tiny_target(cache_dir=None) -> Path;  default_tiny_target_dir() -> Path;  is_tiny_target(path) -> bool
    summary(meta, path) -> str
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import build_dir, empty_or_missing
from ..stats import repetition_rate
from .cache import default_cache_dir, ensure_built, is_complete
from .corpus import extract_stdlib_functions, split_by_module, spread, to_conversation, write_jsonl, write_prompts_jsonl
from .pretrain import greedy_sample, mean_loss, pack_chunks, pretrain, render_chats
from .tokenizer import IM_END, IM_START, MASK_TOKEN, PAD_TOKEN, train_tokenizer

#: The cache entry's name: bump the version suffix whenever the defaults change in a way that makes an old cache
#: wrong.
CACHE_NAME = "tiny-target-v1"
#: Metadata file written last into a finished build; its presence marks a complete directory.
METADATA_FILE = "tiny_target.json"


@dataclass
class TinyTargetConfig:
    """Everything that determines a tiny-target build.

    The defaults were picked by measurement on 2 CPU cores (docs/benchmarks.md, "The tiny target's defaults"): a
    narrow model that sees the data several times, batches of 4 x 512 tokens, functions capped per module (tkinter's
    ``self.tk.call`` wrappers are the first loop attractor of a model this size) and 1100 steps.

    The target is still weak (held-out loss around 3.6 nats/token; some greedy continuations loop on argument
    lists); ``tiny_target.json`` records the achieved figures and greedy samples of each build.
    """

    # tokenizer / data
    vocab_size: int = 4096
    eval_fraction: float = 0.1
    max_functions: int | None = None  # None: every qualifying stdlib function
    max_per_module: int | None = 100  # caps tkinter's hundreds of one-line Tk wrappers (see extraction)
    min_lines: int = 3
    max_lines: int = 40
    # architecture (Qwen3)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 64
    intermediate_size: int = 384
    max_position: int = 4096
    rope_theta: float = 10000.0
    # training
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 1100
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int | None = None  # None: leave torch's default
    # reporting
    max_eval_tokens: int = 65536
    num_samples: int = 16
    sample_tokens: int = 128

    def to_qwen3_config(self, *, pad_id: int, eos_id: int, mask_id: int) -> Any:
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=False,  # a separate lm_head, as in Qwen3-8B
            attn_implementation="sdpa",
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=None,
            mask_token_id=mask_id,  # extra attribute, saved in config.json for the drafter
        )


def default_tiny_target_dir() -> Path:
    """Where the cached tiny target lives (``$DFLASH_DS_CACHE/tiny-target-v1`` or ``~/.cache/dflash_ds/...``)."""
    return default_cache_dir(CACHE_NAME)


def is_tiny_target(path: Path) -> bool:
    """``path`` holds a finished tiny-target build."""
    return is_complete(Path(path), METADATA_FILE)


def ensure_tiny_target(
    cache_dir: str | os.PathLike[str] | None = None,
    config: TinyTargetConfig | None = None,
    progress: bool = True,
) -> Path:
    """Return the directory of the cached tiny target, building it (a few minutes) on first use."""
    message = "building the tiny target in {path} (a few minutes, once)" if progress else None
    return ensure_built(cache_dir, CACHE_NAME, METADATA_FILE,
                        lambda path: build_tiny_target(path, config, progress=progress), message)


@contextlib.contextmanager
def _num_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_tiny_target(
    out_dir: str | os.PathLike[str], config: TinyTargetConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Extract data, train tokenizer and model, and write a ``from_pretrained``-ready directory.

    ``out_dir`` receives the model and tokenizer files, ``tiny_target.json`` (config, split, MASK id, losses,
    samples, timings) and ``data/{train,eval}.jsonl`` + ``data/eval_prompts.jsonl``. Everything is written to
    ``out_dir + ".tmp"`` first and renamed at the end, so an interrupted build never leaves a directory that
    looks finished. An existing ``out_dir`` is replaced only if it is a previous tiny-target build or empty.
    Returns the metadata dict that was written to ``tiny_target.json``.
    """
    cfg = config or TinyTargetConfig()
    out = Path(out_dir).expanduser().resolve()
    if not (empty_or_missing(out) or is_tiny_target(out)):
        raise FileExistsError(f"{out} exists and is not a tiny-target build; refusing to overwrite it")
    return build_dir(out, lambda tmp: _build_into(tmp, cfg, progress))


def _build_into(tmp: Path, cfg: TinyTargetConfig, progress: bool) -> dict[str, Any]:
    """The build proper, writing into the scratch directory ``tmp``; returns the metadata."""
    from transformers import Qwen3ForCausalLM

    t0 = time.perf_counter()

    with _num_threads(cfg.num_threads):
        # -- data --------------------------------------------------------------------------------------------
        samples = extract_stdlib_functions(
            max_functions=cfg.max_functions,
            min_lines=cfg.min_lines,
            max_lines=cfg.max_lines,
            max_per_module=cfg.max_per_module,
        )
        if not samples:
            raise RuntimeError("no documented functions found in the standard library")
        train, held_out = split_by_module(samples, cfg.eval_fraction, cfg.seed)
        if not train:
            raise RuntimeError("the split left no training data; lower eval_fraction or raise max_functions")
        train_records = [to_conversation(s) for s in train]
        eval_records = [to_conversation(s) for s in held_out]
        write_jsonl(tmp / "data" / "train.jsonl", train_records)
        write_jsonl(tmp / "data" / "eval.jsonl", eval_records)
        write_prompts_jsonl(tmp / "data" / "eval_prompts.jsonl", held_out)
        t_data = time.perf_counter() - t0

        # -- tokenizer (trained on the train split only, so held-out loss is honest) ----------------------------
        tokenizer = train_tokenizer((t for s in train for t in (s.prompt, s.body)), cfg.vocab_size)
        # BPE stops early when the data runs out of merges (tiny test inputs): the model must match.
        cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer))
        pad_id, eos_id, mask_id = (tokenizer.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_END, MASK_TOKEN))

        # -- packed token chunks ---------------------------------------------------------------------------
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        train_texts = render_chats(tokenizer, train_records)
        shuffled = torch.randperm(len(train_texts), generator=gen).tolist()
        train_chunks = pack_chunks(tokenizer, train_texts, cfg.seq_len, shuffled)
        eval_chunks = None
        if eval_records:
            eval_texts = render_chats(tokenizer, eval_records)
            with contextlib.suppress(ValueError):  # less than one sequence of held-out text: no eval loss
                eval_chunks = pack_chunks(tokenizer, eval_texts, cfg.seq_len, range(len(eval_texts)))

        # -- model -----------------------------------------------------------------------------------------
        torch.manual_seed(cfg.seed)
        model = Qwen3ForCausalLM(cfg.to_qwen3_config(pad_id=pad_id, eos_id=eos_id, mask_id=mask_id))
        n_params = sum(p.numel() for p in model.parameters())
        losses, train_seconds = pretrain(
            model, train_chunks, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed,
            progress=progress, desc="tiny target",
        )
        tokens_seen = cfg.steps * cfg.batch_size * cfg.seq_len

        # -- report ----------------------------------------------------------------------------------------
        tail = max(1, len(losses) // 10)
        train_eval_loss = mean_loss(model, train_chunks, cfg.batch_size, cfg.max_eval_tokens)
        eval_loss = None
        if eval_chunks is not None:
            eval_loss = mean_loss(model, eval_chunks, cfg.batch_size, cfg.max_eval_tokens)
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = pad_id
        model.generation_config.do_sample = False
        report_samples = held_out or train
        picks = [report_samples[i] for i in spread(len(report_samples), cfg.num_samples)]
        generated = [greedy_sample(model, tokenizer, s.prompt, cfg.sample_tokens) for s in picks]
        references = [tokenizer(s.body, add_special_tokens=False)["input_ids"][: cfg.sample_tokens] for s in picks]

        # -- write -----------------------------------------------------------------------------------------
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta: dict[str, Any] = {
            "format": CACHE_NAME,
            "config": dataclasses.asdict(cfg),
            "num_parameters": n_params,
            "mask_token": MASK_TOKEN,
            "mask_token_id": mask_id,
            "pad_token_id": pad_id,
            "eos_token_id": eos_id,
            "im_start_token_id": tokenizer.convert_tokens_to_ids(IM_START),
            "trained_context": cfg.seq_len,
            "num_functions": {"train": len(train), "eval": len(held_out)},
            "train_modules": sorted({s.module for s in train}),
            "eval_modules": sorted({s.module for s in held_out}),
            "tokens": {
                "train_total": int(train_chunks.numel()),
                "eval_total": int(eval_chunks.numel()) if eval_chunks is not None else 0,
                "seen_in_training": tokens_seen,
                "epochs": tokens_seen / train_chunks.numel(),
            },
            "train_loss_first": losses[0],
            "train_loss": sum(losses[-tail:]) / tail,  # mean over the last 10% of steps
            "train_eval_loss": train_eval_loss,  # eval-mode loss on (a prefix of) the training chunks
            "eval_loss": eval_loss,  # held-out modules
            "ln_vocab": math.log(cfg.vocab_size),  # loss of a uniform guess, for scale
            "loss_curve": [[i, losses[i]] for i in range(0, len(losses), max(1, len(losses) // 50))],
            "greedy_samples": [
                {
                    "module": s.module,
                    "prompt": s.prompt,
                    "continuation": g.text,
                    "hit_eos": g.hit_eos,
                    "repetition_rate_4": repetition_rate([g.token_ids], 4),
                }
                for s, g in zip(picks, generated, strict=True)
            ],
            "repetition_rate_4": _mean([repetition_rate([g.token_ids], 4) for g in generated]),
            "greedy_hit_eos": sum(g.hit_eos for g in generated) / max(1, len(generated)),
            # The same measure on the true bodies: real code repeats some 4-grams too (indentation, `self.`).
            "reference_repetition_rate_4": _mean([repetition_rate([r], 4) for r in references]),
            "timing_s": {
                "data": t_data,
                "train": train_seconds,
                "train_tokens_per_s": tokens_seen / train_seconds,
                "total": time.perf_counter() - t0,
            },
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "tokenizers": _version("tokenizers"),
            },
            "torch_threads": torch.get_num_threads(),
        }
        # Written last: its presence is what marks the directory as complete.
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return meta


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - metadata only, never fatal
        return "unknown"


def summary(meta: dict[str, Any], path: Path) -> str:
    """A few human-readable lines about a finished build (``meta``: its ``tiny_target.json``)."""
    ev = meta.get("eval_loss")
    ev_text = f"{ev:.3f}" if ev is not None else "n/a"
    return (
        f"tiny target in {path}\n"
        f"  parameters {meta['num_parameters']:,}, vocab {meta['config']['vocab_size']}, "
        f"MASK id {meta['mask_token_id']}, trained context {meta['trained_context']}\n"
        f"  train loss {meta['train_loss']:.3f}, held-out loss {ev_text} (ln vocab {meta['ln_vocab']:.3f})\n"
        f"  greedy 4-gram repetition {meta['repetition_rate_4']:.2f} "
        f"(true bodies {meta['reference_repetition_rate_4']:.2f}), build {meta['timing_s']['total']:.0f} s"
    )


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``tiny_target.json`` of a build."""
    return json.loads((Path(path) / METADATA_FILE).read_text(encoding="utf-8"))
