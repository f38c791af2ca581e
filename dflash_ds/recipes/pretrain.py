"""Pretraining a small causal LM from scratch on one CPU process: chat-rendered texts packed into fixed-length chunks,
AdamW with linear warm-up and cosine decay, the held-out loss, and greedy samples to look at.

It is what builds the tiny target (:mod:`.tiny_target`); nothing here knows the tiny target's settings, every knob
is an argument.

Public API::

    render_chats(tokenizer, records) -> list[str]
    pack_chunks(tokenizer, texts, seq_len, order) -> LongTensor [n, seq_len]
    warmup_cosine(warmup_steps, steps, min_lr_ratio) -> (step -> LR factor)
    pretrain(model, chunks, *, steps, batch_size, lr, ...) -> (loss per step, seconds)
    mean_loss(model, chunks, batch_size, max_tokens) -> float
    greedy_sample(model, tokenizer, prompt, max_new_tokens) -> GreedySample
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def render_chats(tokenizer: Any, records: Sequence[dict[str, Any]]) -> list[str]:
    """Each record's ``conversations`` rendered by the tokenizer's chat template (text, not ids)."""
    return [tokenizer.apply_chat_template(r["conversations"], tokenize=False) for r in records]


def pack_chunks(tokenizer: Any, texts: Sequence[str], seq_len: int, order: Sequence[int]) -> torch.Tensor:
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


def warmup_cosine(warmup_steps: int, steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The LR factor of a step: linear warm-up then cosine decay to ``min_lr_ratio``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return fn


@torch.no_grad()
def mean_loss(model: Any, chunks: torch.Tensor, batch_size: int, max_tokens: int) -> float:
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


def pretrain(
    model: Any,
    chunks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grad_clip: float,
    warmup_steps: int,
    min_lr_ratio: float,
    seed: int,
    progress: bool = True,
    desc: str = "pretraining",
) -> tuple[list[float], float]:
    """AdamW + warm-up/cosine over a seeded permutation of ``chunks``; returns (loss per step, seconds)."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, steps, min_lr_ratio))
    # Data order comes from its own generator so it does not depend on how many random numbers init used.
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(chunks), generator=gen)
    cursor = 0
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        if cursor + batch_size > len(order):  # next epoch: fresh permutation
            order = torch.randperm(len(chunks), generator=gen)
            cursor = 0
        batch = chunks[order[cursor : cursor + batch_size]]
        cursor += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{(step + 1) * batch.numel() / elapsed:.0f}")
    bar.close()
    return losses, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------
# Quality report
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
