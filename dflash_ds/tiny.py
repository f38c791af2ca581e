"""A small but real Qwen3-architecture target LM, built offline from the Python standard library.

Why this exists: the drafter (a LoRA adapter on the target itself) needs a target to be trained against, and a
newcomer without internet access or a GPU cannot download Qwen3-8B. Every machine that runs this project has a
Python standard library, so we train a tiny byte-level BPE tokenizer and a tiny ``Qwen3ForCausalLM`` on the
stdlib's own functions ("signature + docstring" -> "body"), rendered as ChatML conversations. The result is a
``from_pretrained``-ready directory that behaves like any Hugging Face causal LM (same chat template machinery,
same KV cache, same attention code paths) so every later stage (data, training, speculative decoding) can be
exercised end to end on a laptop.

The build is deterministic for a given Python version (the stdlib differs between versions), seed and thread
count, and takes about 5 minutes on two otherwise idle CPU cores with the defaults.

Public API::

    extract_stdlib_functions(stdlib_dir=None, max_functions=None) -> list[FunctionSample]
    split_by_module(samples, eval_fraction=0.1, seed=0) -> (train, eval)
    to_conversation(sample) -> dict;  to_prompt_conversation(sample) -> dict
    write_jsonl(path, records);  write_prompts_jsonl(path, samples)
    train_tokenizer(texts, vocab_size=4096) -> PreTrainedTokenizerFast
    TinyTargetConfig;  build_tiny_target(out_dir, config=None, progress=True) -> dict
    ensure_tiny_target(cache_dir=None) -> Path
    greedy_sample(model, tokenizer, prompt, max_new_tokens) -> GreedySample
    main_build(argv) / main_tiny_target(argv)   # `dflash-ds build-tiny-target` / `dflash-ds tiny-target`
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import textwrap
import time
import tokenize
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import replace_dir
from .stats import repetition_rate

# --------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------

#: Bump the version suffix whenever the defaults change in a way that makes an old cache wrong.
CACHE_NAME = "tiny-target-v1"
#: Environment variable that replaces ``~/.cache/dflash_ds`` as the cache root.
CACHE_ENV = "DFLASH_DS_CACHE"
#: Metadata file written last into a finished build; its presence marks a complete directory.
METADATA_FILE = "tiny_target.json"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK_TOKEN = "<|mask|>"
#: Order fixes the ids: pad 0, im_start 1, im_end 2, mask 3 (the BPE merges come after).
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, MASK_TOKEN)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The pre-tokenizer split of Qwen2/Qwen3's tokenizer.json (letters, single digits, punctuation, newline runs,
#: other whitespace runs).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Directory names never descended into: tests are huge and repetitive, idlelib/lib2to3 are tools, and
#: site-packages is not the standard library.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})


# --------------------------------------------------------------------------------------------------------------
# 1. Extraction
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSample:
    """One stdlib function split at the end of its docstring.

    ``prompt`` is the ``def`` line(s) plus the docstring, ``body`` the rest of the function; both are dedented by
    the same amount so that ``prompt + "\\n" + body`` is valid top-level source.
    """

    module: str
    prompt: str
    body: str


def _iter_py_files(root: Path) -> Iterator[Path]:
    """Yield ``.py`` files under ``root`` in a sorted, platform-independent order, skipping ``SKIP_DIRS``."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's descent order, which is otherwise filesystem-dependent.
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".dist-info"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _module_name(path: Path, root: Path) -> str:
    """``email/utils.py`` -> ``email.utils``; ``json/__init__.py`` -> ``json``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _read_source(path: Path) -> str | None:
    """Decode a source file honouring its PEP 263 coding cookie; ``None`` if it cannot be decoded."""
    try:
        raw = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        text = raw.decode(encoding)
    except (OSError, SyntaxError, UnicodeDecodeError, LookupError):
        return None
    # ast counts lines on \n, \r\n and \r; normalising first keeps our own line split aligned with ast's.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _functions_of(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Top-level functions and methods defined directly in top-level classes, in source order."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child


def _split_function(
    fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], min_lines: int, max_lines: int
) -> tuple[str, str] | None:
    """Return ``(prompt, body)`` for a function with a docstring and a non-empty body, else ``None``."""
    if ast.get_docstring(fn, clean=False) is None or len(fn.body) < 2:
        return None  # no docstring, or nothing after it (abstract stubs) -> nothing to predict
    doc = fn.body[0]
    assert doc.end_lineno is not None and fn.end_lineno is not None
    if fn.body[1].lineno <= doc.end_lineno:
        return None  # `"""doc"""; return x` on one line cannot be split at a line boundary
    # Start at the `def` line: decorators are dropped so every prompt starts the same way.
    n_lines = fn.end_lineno - fn.lineno + 1
    if not min_lines <= n_lines <= max_lines:
        return None
    source = textwrap.dedent("\n".join(lines[fn.lineno - 1 : fn.end_lineno]))
    src_lines = source.split("\n")
    split_at = doc.end_lineno - fn.lineno + 1  # number of lines that belong to the prompt
    prompt = "\n".join(src_lines[:split_at]).rstrip()
    body = "\n".join(src_lines[split_at:]).rstrip()
    # Leading blank lines of the body carry no information and would teach the model to emit empty lines.
    body = "\n".join(_drop_leading_blank(body.split("\n")))
    if not body.strip():
        return None
    return prompt, body


def _drop_leading_blank(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    return lines


def extract_stdlib_functions(
    stdlib_dir: str | os.PathLike[str] | None = None,
    max_functions: int | None = None,
    *,
    min_lines: int = 3,
    max_lines: int = 40,
    max_per_module: int | None = None,
) -> list[FunctionSample]:
    """Collect documented functions from the standard library's source.

    Walks ``stdlib_dir`` (default ``sysconfig.get_paths()["stdlib"]``) in sorted order, parses every ``.py``
    file with ``ast`` (files that fail to decode or parse are skipped) and keeps top-level functions and
    class-level methods that have a docstring and span ``min_lines..max_lines`` source lines (``def`` line to
    last line). ``max_functions`` stops early, which keeps tests fast; the order is deterministic so the first
    ``N`` functions are always the same ones.

    ``max_per_module`` keeps at most that many functions of one module, spread evenly over the file. Why: a
    few modules are dominated by near-identical one-line wrappers (``tkinter`` has hundreds of
    ``return self.tk.call(...)`` methods), and a tiny model trained on them learns one loop attractor.
    """
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory not found: {root}")
    samples: list[FunctionSample] = []
    for path in _iter_py_files(root):
        source = _read_source(path)
        if source is None:
            continue
        try:
            tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # e.g. deliberately broken files, null bytes, or grammar from another Python version
        lines = source.split("\n")
        module = _module_name(path, root)
        found = [p for p in (_split_function(fn, lines, min_lines, max_lines) for fn in _functions_of(tree)) if p]
        if max_per_module is not None and len(found) > max_per_module:
            found = [found[i] for i in _spread(len(found), max_per_module)]
        for prompt, body in found:
            samples.append(FunctionSample(module=module, prompt=prompt, body=body))
            if max_functions is not None and len(samples) >= max_functions:
                return samples
    return samples


# --------------------------------------------------------------------------------------------------------------
# 2. Split
# --------------------------------------------------------------------------------------------------------------


def _module_fraction(module: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) for a module (``hash()`` is salted per process, sha256 is not)."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_module(
    samples: Sequence[FunctionSample], eval_fraction: float = 0.1, seed: int = 0
) -> tuple[list[FunctionSample], list[FunctionSample]]:
    """Split samples into ``(train, eval)`` so that every module's functions land on one side only.

    A module goes to eval when the hash of ``(seed, module)`` falls below ``eval_fraction``, which is stable
    across processes, machines and sample subsets. With at least two modules and ``0 < eval_fraction < 1``
    each side gets at least one module (small test inputs could otherwise end up with an empty side).
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    modules = sorted({s.module for s in samples})
    frac = {m: _module_fraction(m, seed) for m in modules}
    eval_modules = {m for m in modules if frac[m] < eval_fraction}
    if len(modules) >= 2 and 0.0 < eval_fraction < 1.0:
        by_hash = sorted(modules, key=lambda m: (frac[m], m))
        if not eval_modules:
            eval_modules = {by_hash[0]}
        elif len(eval_modules) == len(modules):
            eval_modules.discard(by_hash[-1])
    train = [s for s in samples if s.module not in eval_modules]
    held_out = [s for s in samples if s.module in eval_modules]
    return train, held_out


# --------------------------------------------------------------------------------------------------------------
# 3. Conversation records
# --------------------------------------------------------------------------------------------------------------


def to_conversation(sample: FunctionSample) -> dict[str, Any]:
    """The project's JSONL data format: the prompt as the user turn, the body as the assistant turn."""
    return {
        "conversations": [
            {"role": "user", "content": sample.prompt},
            {"role": "assistant", "content": sample.body},
        ]
    }


def to_prompt_conversation(sample: FunctionSample) -> dict[str, Any]:
    """An evaluation prompt: only the user turn (the assistant turn is what gets generated)."""
    return {"conversations": [{"role": "user", "content": sample.prompt}]}


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept); return the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_prompts_jsonl(path: str | os.PathLike[str], samples: Iterable[FunctionSample]) -> int:
    """Write user-turn-only conversations for evaluation / regeneration."""
    return write_jsonl(path, (to_prompt_conversation(s) for s in samples))


# --------------------------------------------------------------------------------------------------------------
# 4. Tokenizer
# --------------------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, special_tokens: Sequence[str] | None = None) -> Any:
    """Train a byte-level BPE tokenizer and wrap it as a ``transformers`` fast tokenizer.

    Byte-level BPE without a normalizer maps any string to bytes and back, so code (tabs, runs of spaces,
    newlines, non-ASCII) round-trips exactly. Ids 0..3 are the special tokens ``<|endoftext|>`` (pad),
    ``<|im_start|>``, ``<|im_end|>`` (eos, ends every turn) and ``<|mask|>`` (the drafter's MASK token).
    ``special_tokens`` replaces that list (it must start with those three; tests use it to build a tokenizer
    without ``<|mask|>``, like SmolLM2's); ``<|mask|>`` is the mask token only if listed.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if specials[:3] != list(SPECIAL_TOKENS[:3]):
        raise ValueError(f"special_tokens must start with {list(SPECIAL_TOKENS[:3])}, got {specials[:3]}")
    n_base = 256 + len(specials)
    if vocab_size < n_base:
        raise ValueError(f"vocab_size must be at least {n_base} (bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Qwen2/3's split regex, then bytes. Unlike GPT-2's, it keeps newlines apart from the indentation that
    # follows them, so "assistant\n" + "    return" tokenises the same whether the body is there or not:
    # the generation prompt's ids are a prefix of the full conversation's ids (GPT-2's split merges "\n   "
    # and the model then never sees a lone "\n" before a body, which wrecks chat-prompted generation).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        mask_token=MASK_TOKEN if MASK_TOKEN in specials else None,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,  # the clean-up would eat spaces before punctuation in code
        model_max_length=1_000_000,  # no truncation warnings; the trained context is in tiny_target.json
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# --------------------------------------------------------------------------------------------------------------
# 5. Model configuration
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# 5b. Training helpers
# --------------------------------------------------------------------------------------------------------------


def _render(tokenizer: Any, records: Sequence[dict[str, Any]]) -> list[str]:
    return [tokenizer.apply_chat_template(r["conversations"], tokenize=False) for r in records]


def _pack(tokenizer: Any, texts: Sequence[str], seq_len: int, order: Sequence[int]) -> torch.Tensor:
    """Concatenate the token ids of ``texts`` (in ``order``) and cut them into ``[n, seq_len]`` chunks.

    Packing wastes no compute on padding; every conversation carries its own ``<|im_start|>`` markers, so
    crossing a conversation boundary inside a chunk is harmless for a model this size.
    """
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for i in order:
        stream.extend(encoded[i])
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"only {len(stream)} tokens of data, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_lambda(cfg: TinyTargetConfig) -> Any:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return fn


@torch.no_grad()
def _mean_loss(model: Any, chunks: torch.Tensor, batch_size: int, max_tokens: int) -> float:
    """Token-weighted mean next-token loss over (at most ``max_tokens`` of) ``chunks``."""
    model.eval()
    n = max(1, min(len(chunks), max_tokens // chunks.shape[1]))
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = chunks[i : min(n, i + batch_size)]
        out = model(input_ids=batch, labels=batch)
        tokens = batch.numel() - batch.shape[0]  # the last position of each row has no target
        total += out.loss.item() * tokens
        count += tokens
    model.train()
    return total / count


def _train(model: Any, chunks: torch.Tensor, cfg: TinyTargetConfig, progress: bool) -> tuple[list[float], float]:
    """AdamW + warm-up/cosine over a seeded permutation of ``chunks``; returns (loss per step, seconds)."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    # Data order comes from its own generator so it does not depend on how many random numbers init used.
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(chunks), generator=gen)
    cursor = 0
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="tiny target", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if cursor + cfg.batch_size > len(order):  # next epoch: fresh permutation
            order = torch.randperm(len(chunks), generator=gen)
            cursor = 0
        batch = chunks[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{(step + 1) * batch.numel() / elapsed:.0f}")
    bar.close()
    return losses, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------
# Quality report (used by the build, the README and evaluation)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GreedySample:
    """A greedy continuation: the generated ids (without the prompt), their text, and whether EOS was hit."""

    prompt: str
    text: str
    token_ids: list[int]
    hit_eos: bool


@torch.no_grad()
def greedy_sample(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 128, *, chat: bool = True
) -> GreedySample:
    """Greedy-decode a continuation of ``prompt``.

    With ``chat=True`` (default) the prompt is the user turn and the chat template adds the assistant header,
    which is how the target was trained; with ``chat=False`` the raw text is continued.
    """
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    new = out[0, input_ids.shape[1] :].tolist()
    hit_eos = tokenizer.eos_token_id in new
    if hit_eos:
        new = new[: new.index(tokenizer.eos_token_id)]
    return GreedySample(prompt=prompt, text=tokenizer.decode(new), token_ids=new, hit_eos=hit_eos)


# --------------------------------------------------------------------------------------------------------------
# 6. Build
# --------------------------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / METADATA_FILE).is_file() and (path / "config.json").is_file()


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
    if out.exists() and not (_is_complete(out) or (out.is_dir() and not any(out.iterdir()))):
        raise FileExistsError(f"{out} exists and is not a tiny-target build; refusing to overwrite it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # leftovers of a crashed build
    tmp.mkdir(parents=True)
    try:
        meta = _build_into(tmp, cfg, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-built is left behind, not even the .tmp
        raise
    replace_dir(tmp, out)
    return meta


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
        train_texts = _render(tokenizer, train_records)
        shuffled = torch.randperm(len(train_texts), generator=gen).tolist()
        train_chunks = _pack(tokenizer, train_texts, cfg.seq_len, shuffled)
        eval_chunks = None
        if eval_records:
            eval_texts = _render(tokenizer, eval_records)
            with contextlib.suppress(ValueError):  # less than one sequence of held-out text: no eval loss
                eval_chunks = _pack(tokenizer, eval_texts, cfg.seq_len, range(len(eval_texts)))

        # -- model -----------------------------------------------------------------------------------------
        torch.manual_seed(cfg.seed)
        model = Qwen3ForCausalLM(cfg.to_qwen3_config(pad_id=pad_id, eos_id=eos_id, mask_id=mask_id))
        n_params = sum(p.numel() for p in model.parameters())
        losses, train_seconds = _train(model, train_chunks, cfg, progress)
        tokens_seen = cfg.steps * cfg.batch_size * cfg.seq_len

        # -- report ----------------------------------------------------------------------------------------
        tail = max(1, len(losses) // 10)
        train_eval_loss = _mean_loss(model, train_chunks, cfg.batch_size, cfg.max_eval_tokens)
        eval_loss = None
        if eval_chunks is not None:
            eval_loss = _mean_loss(model, eval_chunks, cfg.batch_size, cfg.max_eval_tokens)
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = pad_id
        model.generation_config.do_sample = False
        report_samples = held_out or train
        picks = [report_samples[i] for i in _spread(len(report_samples), cfg.num_samples)]
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


def empty_or_missing(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def copy_dir(src: Path, dst: Path) -> None:
    """Copy a cached build to ``dst`` (missing or empty) through ``dst.tmp``, so ``dst`` is never half-written."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    if dst.exists():
        dst.rmdir()  # empty (the caller checked)
    tmp.rename(dst)


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic, covers different modules)."""
    k = min(n, k)
    return sorted({(i * n) // k for i in range(k)}) if k > 0 else []


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - metadata only, never fatal
        return "unknown"


# --------------------------------------------------------------------------------------------------------------
# 7. Cache
# --------------------------------------------------------------------------------------------------------------


def default_cache_dir(name: str = CACHE_NAME) -> Path:
    """``$DFLASH_DS_CACHE/<name>`` if the variable is set, else ``~/.cache/dflash_ds/<name>`` (``name``: the tiny
    target's ``tiny-target-v1`` by default; :mod:`dflash_ds.real_target` caches under its own name)."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dflash_ds"
    return base / name


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that several processes (e.g. ranks of one launch) build the cache only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: best effort without a lock
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_tiny_target(
    cache_dir: str | os.PathLike[str] | None = None,
    config: TinyTargetConfig | None = None,
    progress: bool = True,
) -> Path:
    """Return the directory of the cached tiny target, building it (a few minutes) on first use."""
    path = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    if _is_complete(path):
        return path
    with file_lock(path.with_name(path.name + ".lock")):
        if not _is_complete(path):  # another process may have finished it while we waited
            if progress:
                print(f"building the tiny target in {path} (a few minutes, once)", file=sys.stderr)
            build_tiny_target(path, config, progress=progress)
    return path


# --------------------------------------------------------------------------------------------------------------
# 8. Command line
# --------------------------------------------------------------------------------------------------------------


def _summary(meta: dict[str, Any], path: Path) -> str:
    """A few human-readable lines about a finished build."""
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


def main_build(argv: Sequence[str] | None = None) -> int:
    """``dflash-ds build-tiny-target --out DIR [--steps N] [--seed S]``: build a tiny target into DIR."""
    parser = argparse.ArgumentParser(
        prog="dflash-ds build-tiny-target",
        description="Train a small Qwen3-architecture target LM and tokenizer on the Python standard library.",
    )
    parser.add_argument("--out", required=True, help="output directory (replaced if it is an earlier build)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default %(default)s: config)")
    parser.add_argument("--seed", type=int, default=None, help="seed for init, split and data order")
    parser.add_argument("--max-functions", type=int, default=None, help="limit the number of stdlib functions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "seed": args.seed,
            "max_functions": args.max_functions,
            "num_threads": args.threads,
        }.items()
        if v is not None
    }
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    cfg = dataclasses.replace(TinyTargetConfig(), **overrides)
    try:
        meta = build_tiny_target(args.out, cfg, progress=not args.quiet)
    except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"dflash-ds build-tiny-target: error: {e}", file=sys.stderr)
        return 1
    print(_summary(meta, Path(args.out).expanduser().resolve()))
    return 0


def copy_cached_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    ensure: Callable[[str | None, bool], Path],
    errors: tuple[type[BaseException], ...],
    summary: Callable[[Path], str],
) -> int:
    """The ``--out DIR [--cache-dir D] [--quiet]`` command of a cached target: ``ensure(cache_dir, progress)`` builds
    or finds the cache, which is copied to DIR (missing or empty); ``errors`` become one line and exit code 1."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="destination directory (must not exist or be empty)")
    parser.add_argument("--cache-dir", default=None, help="cache directory to use instead of the default")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    dst = Path(args.out).expanduser().resolve()
    if not empty_or_missing(dst):
        print(f"{prog}: error: {dst} exists and is not an empty directory", file=sys.stderr)
        return 1
    try:
        src = ensure(args.cache_dir, not args.quiet)
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    copy_dir(src, dst)
    print(summary(dst))
    return 0


def main_tiny_target(argv: Sequence[str] | None = None) -> int:
    """``dflash-ds tiny-target --out DIR``: copy the cached tiny target to DIR (building the cache if needed)."""
    return copy_cached_main(
        argv,
        prog="dflash-ds tiny-target",
        description=f"Copy the cached tiny target (default {default_cache_dir()}, "
        f"root overridable with ${CACHE_ENV}) to DIR, building it first if needed.",
        ensure=lambda cache_dir, progress: ensure_tiny_target(cache_dir, progress=progress),
        errors=(FileExistsError, FileNotFoundError, RuntimeError, ValueError),
        summary=lambda dst: _summary(json.loads((dst / METADATA_FILE).read_text(encoding="utf-8")), dst),
    )


if __name__ == "__main__":  # python -m dflash_ds.tiny {build-tiny-target,tiny-target} ...
    commands = {"build-tiny-target": main_build, "tiny-target": main_tiny_target}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m dflash_ds.tiny {{{','.join(commands)}}} --out DIR [...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
