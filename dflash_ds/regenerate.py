"""Self-distillation data: replace each conversation's last assistant turn with the target's own greedy answer.

Why: a drafter can only be accepted where it predicts the *target's* choices; trained on human-written answers it
reaches a fraction of the tau it reaches on the target's own (docs/benchmarks.md). DFlash and EAGLE do the same.

``dflash-ds regenerate --model-path DIR --in train.jsonl --out regen.jsonl`` (or under ``torchrun`` /
``deepspeed``: each rank takes every world-size-th conversation, rank 0 merges the shards in input order). Each
record says whether its answer was cut off at ``--max-new-tokens`` (``"truncated"``; training keeps them by
default without supervising the end-of-turn the target never wrote, or drops them with ``--truncated drop``). Ranks save their answers batch by batch, so running the same command again after an interruption
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .files import write_text_atomic


def _prompt_messages(messages: list[dict]) -> list[dict] | None:
    """Everything before the last assistant turn (None when there is no user turn to answer)."""
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    prompt = messages[:last_assistant]
    return prompt if prompt and prompt[-1]["role"] == "user" else None


@dataclass
class RegenStats:
    """What a regeneration produced and how fast: ``new_tokens`` counts answer tokens plus the end-of-turn where
    the target wrote one (padding and the rows' idle steps after their end are not counted)."""

    answers: int = 0
    truncated: int = 0  # answers cut off at max_new_tokens (recorded as "truncated": true)
    empty: int = 0  # empty answers, dropped
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.answers} answers ({self.truncated} cut off at the token limit, {self.empty} empty dropped), "
                f"{self.new_tokens} tokens in {self.seconds:.0f} s: {self.tokens_per_s:.0f} tokens/s")


def answer_tokens(row: list[int], eos_id: int) -> tuple[list[int], bool]:
    """The answer's ids (up to, not including, the first ``eos_id``) and whether it was cut off (no eos: the row
    ran to max_new_tokens, so the end-of-turn after it would be the template's, not the target's)."""
    if eos_id in row:
        return row[: row.index(eos_id)], False
    return row, True


@torch.no_grad()
def greedy_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 eos_id: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch (``input_ids``, ``attention_mask``: [b, S]); row ``i`` of the
    result holds up to ``max_new_tokens`` ids, ending with ``eos_id`` where the model wrote it.

    The same tokens as ``generate(do_sample=False)`` (tested), but a row that has written its end-of-turn leaves
    the batch (its KV cache rows are dropped): ``generate`` keeps computing finished rows until the longest one
    ends, which on a compute-bound CPU is that much wasted time.
    """
    from transformers import DynamicCache

    from .families import cache_kwarg

    kw = cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{kw: cache}).logits[:, -1]
    rows = torch.arange(input_ids.shape[0])  # which original row each batch row is
    last = positions[:, -1:]
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        for r, t in zip(rows.tolist(), token.tolist()):
            out[r].append(t)
        if step == max_new_tokens - 1:
            break
        alive = token != eos_id
        if not alive.all():
            keep = alive.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            rows, token, attention_mask, last = rows[keep], token[keep], attention_mask[keep], last[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        last = last + 1
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=last, use_cache=True,
                       **{kw: cache}).logits[:, -1]
    return out


@torch.no_grad()
def regenerate_conversations(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    batch_size: int = 32,
    progress: bool = True,
    on_batch: Callable[[list[tuple[int, dict | None]]], None] | None = None,
) -> tuple[list[tuple[int, dict]], RegenStats]:
    """Greedy answers for each conversation's prompt: ``[(i, {"conversations": [...], "truncated": bool})]`` in
    input order (``i`` the conversation's position in ``conversations``; empty answers are dropped), and stats.

    Prompts are rendered by :func:`dflash_ds.data.render_chat`, the rendering training and evaluation use. They run
    in batches of similar length (longest first): left padding then costs little, and the first batch shows the
    peak memory. Within a batch, a row that has ended leaves it (:func:`greedy_batch`). ``on_batch`` receives each
    batch's ``(i, record)`` pairs as they finish (record None for an empty answer), so a caller can save progress.
    """
    from tqdm import tqdm

    from .data import render_chat

    tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right edge
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
    eos_id = tokenizer.eos_token_id
    prompts = [(i, _prompt_messages(conv)) for i, conv in enumerate(conversations)]
    texts = [(i, p, render_chat(tokenizer, p, add_generation_prompt=True)) for i, p in prompts if p is not None]
    lengths = {i: len(ids) for (i, _, _), ids in zip(texts, tokenizer([t for _, _, t in texts], add_special_tokens=False)["input_ids"])}
    texts.sort(key=lambda item: (-lengths[item[0]], item[0]))
    stats, records = RegenStats(), []
    t0 = time.perf_counter()
    bar = tqdm(total=len(texts), desc="regenerate", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        enc = tokenizer([t for _, _, t in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = greedy_batch(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, eos_id)
        finished: list[tuple[int, dict | None]] = []
        for (index, prompt, _), row in zip(chunk, out):
            ids, truncated = answer_tokens(row, eos_id)
            stats.new_tokens += len(ids) + (0 if truncated else 1)
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            if not answer.strip():
                stats.empty += 1
                finished.append((index, None))
                continue
            stats.answers += 1
            stats.truncated += truncated
            conv = prompt + [{"role": "assistant", "content": answer}]
            records.append((index, {"conversations": conv, "truncated": truncated}))
            finished.append(records[-1])
        if on_batch is not None:
            on_batch(finished)
        stats.seconds = time.perf_counter() - t0
        bar.update(len(chunk))
        bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}", cut=stats.truncated)
    bar.close()
    records.sort(key=lambda item: item[0])
    return records, stats


def shard_path(out_path: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` keeps its answers while it works: one JSON line per finished conversation
    (``source_index`` = its line among the input conversations; ``empty`` for an empty answer), appended batch by
    batch, so an interrupted run resumes where it stopped."""
    return Path(f"{out_path}.rank{rank}.partial")


def _read_shard(path: Path, settings: dict) -> dict[int, dict]:
    """Finished records of an earlier, interrupted run (by source index); a torn last line is ignored."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    header = json.loads(lines[0]) if lines else {}
    if header.get("settings") != settings:
        raise ValueError(
            f"{path}: left by a regeneration with other settings ({header.get('settings')}, now {settings}); "
            "delete it to start over"
        )
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # the run was killed mid-write: everything after is redone
        done[rec["source_index"]] = rec
    return done


def regenerate_file(
    model_path: str,
    in_path: str,
    out_path: str,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> RegenStats:
    """Regenerate this rank's share of ``in_path`` (conversations ``rank::world_size``) into its shard file,
    skipping what an interrupted run already finished; with ``world_size == 1`` also write ``out_path``
    (:func:`merge_shards`). Returns the stats of the conversations regenerated now."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import read_conversations

    conversations, _ = read_conversations(in_path, bad_lines="skip")
    conversations = [c for c in conversations if c[0]["role"] != "text"][:limit]
    if not conversations:
        raise ValueError(f"{in_path}: no usable conversation to answer")
    shard = shard_path(out_path, rank)
    settings = {"in": os.path.abspath(in_path), "model": os.path.abspath(model_path), "limit": limit,
                "max_new_tokens": max_new_tokens, "world_size": world_size}
    done = _read_shard(shard, settings)
    todo = [i for i in range(rank, len(conversations), world_size) if i not in done]
    stats = RegenStats()
    if done and rank == 0:
        print(f"regenerate: resuming, {len(done)} conversations of rank 0 already done", flush=True)
    if todo:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if torch.cuda.is_available():
            device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.bfloat16
        else:
            device, dtype = torch.device("cpu"), torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        with _append_lines(shard, done, settings) as f:

            def save(items: list[tuple[int, dict | None]]) -> None:
                for k, rec in items:
                    f.write(json.dumps({"source_index": todo[k], **(rec or {"empty": True})}) + "\n")
                f.flush()

            _, stats = regenerate_conversations(model, tokenizer, [conversations[i] for i in todo], max_new_tokens,
                                                batch_size, progress=rank == 0, on_batch=save)
    if world_size == 1:
        merge_shards(out_path, 1)
    return stats


@contextmanager
def _append_lines(path: Path, done: dict, settings: dict):
    """The shard file open for appending; a new (or torn) file is rewritten with its header and the good lines."""
    lines = [json.dumps({"settings": settings}), *(json.dumps(rec) for rec in done.values())]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    with path.open("a") as f:
        yield f


def merge_shards(out_path: str | os.PathLike, world_size: int) -> int:
    """Join the ranks' shard files into ``out_path`` in input order (atomically), then delete them. Returns lines."""
    records = []
    for r in range(world_size):
        lines = shard_path(out_path, r).read_text().splitlines()[1:]
        records += [json.loads(line) for line in lines]
    records.sort(key=lambda rec: rec["source_index"])
    merged = [json.dumps({"conversations": rec["conversations"], "truncated": rec["truncated"]})
              for rec in records if not rec.get("empty")]
    write_text_atomic(out_path, "".join(line + "\n" for line in merged))
    for r in range(world_size):
        shard_path(out_path, r).unlink()
    return len(merged)


def main(argv: list[str] | None = None) -> int:
    from .parallel import exit_on_dist_failure

    try:
        with exit_on_dist_failure("dflash-ds regenerate", hint="run it again"):  # another rank died or hangs: exit 3
            return _main(argv)
    except (FileNotFoundError, ValueError) as exc:  # bad input: one line naming the file, exit 2
        print(f"dflash-ds regenerate: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="dflash-ds regenerate", description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--in", dest="in_path", required=True, help="JSONL conversations")
    p.add_argument("--out", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--dist-timeout", type=float, default=4 * 3600.0, metavar="SECONDS",
                   help="with several ranks: how long a rank that finished waits for the others before failing "
                        "(a dead or hung rank); must exceed the ranks' difference in generation time (default 4 h)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        stats = regenerate_file(args.model_path, args.in_path, args.out, args.max_new_tokens, args.batch_size, args.limit)
        print(f"wrote {stats.answers} conversations to {args.out}: {stats.summary()}")
        return 0
    import torch.distributed as dist

    from .parallel import set_dist_timeout

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.dist_timeout))
    set_dist_timeout(args.dist_timeout)
    stats = regenerate_file(args.model_path, args.in_path, args.out, args.max_new_tokens, args.batch_size, args.limit,
                            rank, world)
    print(f"rank {rank}: {stats.summary()}", flush=True)
    dist.barrier()
    if rank == 0:  # merge the shards back into input order
        n = merge_shards(args.out, world)
        print(f"wrote {n} conversations to {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
