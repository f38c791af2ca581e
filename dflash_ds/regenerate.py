"""Self-distillation data: replace each conversation's last assistant turn with the target's own greedy answer.

Why: a drafter can only be accepted where it predicts the *target's* choices; trained on human-written answers it
reaches a fraction of the tau it reaches on the target's own (docs/benchmarks.md). DFlash and EAGLE do the same.

``dflash-ds regenerate --model-path DIR --in train.jsonl --out regen.jsonl`` (or under ``torchrun`` /
``deepspeed``: each rank takes every world-size-th conversation, rank 0 merges the shards in input order). Each
record says whether its answer was cut off at ``--max-new-tokens`` (``"truncated"``; training keeps them by
default without supervising the end-of-turn the target never wrote, or drops them with ``--truncated drop``).
Ranks save each answer as it finishes, so running the same command again after an interruption resumes where it
stopped.

An answer ends where evaluation would end it: at any id of :func:`dflash_ds.speculative.eos_ids_of` (the
tokenizer's eos and the generation config's). Each record keeps the target's own token ids of its answer
(``"answer_ids"``, without the stop token) next to the text, which is decoded for humans: training uses those ids,
because the text tokenised again may merge differently from what the target wrote (:mod:`dflash_ds.data`).
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
from types import SimpleNamespace
from typing import Callable, Collection, Iterator, Sequence

import torch

from . import collectives
from .data import read_conversations, render_chat
from .families import cache_kwarg
from .files import write_text_atomic
from .parallel import exit_on_dist_failure, set_dist_timeout
from .serving.openai_client import CompletionServer, server_stream
from .speculative import eos_ids_of


#: Bumped when a record's content changes (2: answers stop on every eos id and keep their token ids), so that an
#: interrupted run of an older version is not resumed into a file that mixes the two.
RECORD_FORMAT = 2


def stop_ids(eos: int | Collection[int] | None) -> frozenset[int]:
    """The ids an answer stops at, from one id (the old single-eos form callers may still pass) or several."""
    if eos is None:
        return frozenset()
    if isinstance(eos, int):
        return frozenset((eos,))
    return frozenset(int(i) for i in eos)


def prompt_messages(messages: list[dict]) -> list[dict] | None:
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
    failed: int = 0  # requests a server failed for good (written to OUT.errors.jsonl; a rerun retries them)
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        failed = f", {self.failed} FAILED (see the errors file; run again to retry them)" if self.failed else ""
        return (f"{self.answers} answers ({self.truncated} cut off at the token limit, {self.empty} empty dropped"
                f"{failed}), {self.new_tokens} tokens in {self.seconds:.0f} s: {self.tokens_per_s:.0f} tokens/s")


def answer_tokens(row: list[int], eos_ids: int | Collection[int]) -> tuple[list[int], bool]:
    """The answer's ids (up to, not including, the first of ``eos_ids``) and whether it was cut off (no eos: the row
    ran to max_new_tokens, so the end-of-turn after it would be the template's, not the target's)."""
    stop = stop_ids(eos_ids)
    end = next((k for k, t in enumerate(row) if t in stop), None)
    return (row, True) if end is None else (row[:end], False)


def _left_pad(cache, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Widen a left-padded batch's cache (every layer's K/V ``[b, h, L, d]``) and ``mask`` ``[b, L]`` to
    ``width`` columns by padding on the left; returns the new mask."""
    extra = width - mask.shape[1]
    if extra > 0:
        for layer in cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))
        mask = torch.nn.functional.pad(mask, (extra, 0))
    return mask


def _trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row (left behind by rows that left); returns the mask."""
    lead = int((mask.cumsum(-1) == 0).sum(-1).min())
    if lead > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        mask = mask[:, lead:]
    return mask


@torch.no_grad()
def greedy_stream(model, prompts: Sequence[list[int]], max_new_tokens: int, eos_ids: int | Collection[int],
                  batch_size: int) -> Iterator[tuple[int, list[int]]]:
    """Greedy continuations of ``prompts`` (token-id lists), ``batch_size`` rows at a time, yielded as ``(i, ids)``
    the moment row ``i`` ends: ``ids`` holds up to ``max_new_tokens`` tokens, ending with the first of ``eos_ids``
    (one id or several) the model wrote.

    Continuous batching: a row that has ended leaves the batch (its KV rows are dropped) and the next prompt takes
    its slot, so the batch stays full until the prompts run out. ``generate`` keeps computing a batch's finished
    rows until its longest one ends; answers of 20 and 128 tokens in one batch left it mostly idle on a
    compute-bound CPU. Rows share one left-padded cache: each prompt is prefilled on its own, then its cache or the
    batch's is left-padded to the wider of the two and they are joined; positions and the padding mask are per row,
    so each row gets the tokens ``generate`` gives it alone (tested).
    """
    from transformers import DynamicCache

    kw, device = cache_kwarg(model), next(model.parameters()).device
    stop = stop_ids(eos_ids)
    pending = list(range(len(prompts)))[::-1]  # popped from the end: prompts in the order given
    cache = mask = last = logits = None
    rows: list[int] = []  # the prompt index of each batch row
    out: dict[int, list[int]] = {}
    while True:
        for _ in range(min(batch_size - len(rows), len(pending))):
            i = pending.pop()  # prefilled alone: padding a group to its longest prompt cost more than the group saved
            ids = torch.tensor([prompts[i]], device=device)
            new_cache = DynamicCache(config=model.config)
            new_logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: new_cache}).logits[:, -1]
            new_mask, new_last = torch.ones_like(ids), torch.tensor([[ids.shape[1] - 1]], device=device)
            if rows:
                width = max(mask.shape[1], ids.shape[1])
                mask, new_mask = _left_pad(cache, mask, width), _left_pad(new_cache, new_mask, width)
                for layer, joined in zip(cache.layers, new_cache.layers):
                    layer.keys = torch.cat([layer.keys, joined.keys])
                    layer.values = torch.cat([layer.values, joined.values])
                mask, last = torch.cat([mask, new_mask]), torch.cat([last, new_last])
                logits = torch.cat([logits, new_logits])
            else:
                cache, mask, last, logits = new_cache, new_mask, new_last, new_logits
            rows.append(i)
            out[i] = []
        if not rows:
            return
        token = logits.argmax(-1)
        alive = []
        for r, (i, t) in enumerate(zip(rows, token.tolist())):
            out[i].append(t)
            if t in stop or len(out[i]) == max_new_tokens:
                yield i, out.pop(i)
            else:
                alive.append(r)
        if len(alive) < len(rows):
            if not alive:
                rows = []
                continue
            keep = torch.tensor(alive, device=device)
            cache.batch_select_indices(keep)
            rows = [rows[r] for r in alive]
            token, mask, last = token[keep], mask[keep], last[keep]
            mask = _trim_left(cache, mask)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        last = last + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                       **{kw: cache}).logits[:, -1]


@torch.no_grad()
def regenerate_conversations(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    batch_size: int = 32,
    progress: bool = True,
    on_answer: Callable[[int, dict | None], None] | None = None,
    server: CompletionServer | None = None,
    concurrency: int = 8,
    on_failure: Callable[[int, str], None] | None = None,
) -> tuple[list[tuple[int, dict]], RegenStats]:
    """Greedy answers for each conversation's prompt: ``[(i, {"conversations": [...], "truncated": bool,
    "answer_ids": [...]})]`` in input order (``i`` the conversation's position in ``conversations``; empty answers
    are dropped), and stats. ``answer_ids`` are the target's own ids of the last (assistant) message, without the
    stop token; its ``content`` is their text, decoded without special tokens.

    An answer stops at any id of :func:`dflash_ds.speculative.eos_ids_of`, the ids evaluation stops at: stopping
    at the tokenizer's eos alone ran past a generation-config eos (Llama 3's ``<|eot_id|>``) to the token limit.

    Prompts are rendered by :func:`dflash_ds.data.render_chat`, the rendering training and evaluation use. They are
    answered longest first, ``batch_size`` at a time with continuous batching (:func:`greedy_stream`), so the first
    batch shows the peak memory and a refill's prompt is about as long as the rows it joins. ``on_answer(i, record)``
    is called as each answer finishes (record None for an empty answer), so a caller can save progress.

    ``server``: the answers come from an OpenAI-compatible server instead (``concurrency`` requests in flight,
    :mod:`dflash_ds.serving.openai_client`; ``model`` then only needs a ``generation_config`` for the stop ids); a
    request that fails for good goes to ``on_failure(i, error)`` and is counted, not answered.
    """
    from tqdm import tqdm

    eos_ids = eos_ids_of(tokenizer, model)
    prompts = [(i, prompt_messages(conv)) for i, conv in enumerate(conversations)]
    prompts = [(i, p) for i, p in prompts if p is not None]
    texts = [render_chat(tokenizer, p, add_generation_prompt=True) for _, p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda k: (-len(ids[k]), prompts[k][0]))
    stats, records = RegenStats(), []
    t0 = time.perf_counter()
    bar = tqdm(total=len(order), desc="regenerate", disable=not progress, dynamic_ncols=True)
    rows = [ids[k] for k in order]
    stream = (server_stream(server, rows, max_new_tokens, eos_ids, concurrency) if server is not None
              else greedy_stream(model, rows, max_new_tokens, eos_ids, batch_size))
    for k, row in stream:
        index, prompt = prompts[order[k]]
        if isinstance(row, Exception):
            stats.failed += 1
            if on_failure is not None:
                on_failure(index, str(row))
            bar.update(1)
            continue
        answer_ids, truncated = answer_tokens(row, eos_ids)
        stats.new_tokens += len(answer_ids) + (0 if truncated else 1)
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
        record = None
        if answer.strip():
            stats.answers += 1
            stats.truncated += truncated
            record = {"conversations": prompt + [{"role": "assistant", "content": answer}], "truncated": truncated,
                      "answer_ids": answer_ids}
            records.append((index, record))
        else:
            stats.empty += 1
        if on_answer is not None:
            on_answer(index, record)
        stats.seconds = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}", cut=stats.truncated)
    bar.close()
    records.sort(key=lambda item: item[0])
    return records, stats


def errors_path(out_path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where a rank records the requests a server failed for good: ``OUT.errors.jsonl`` for one process,
    ``OUT.rank{r}.errors.jsonl`` per rank (each rank creates and removes its own)."""
    return Path(f"{out_path}.errors.jsonl" if world_size == 1 else f"{out_path}.rank{rank}.errors.jsonl")


def shard_path(out_path: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` keeps its answers while it works: one JSON line per finished conversation
    (``source_index`` = its line among the input conversations; ``empty`` for an empty answer), appended as each
    finishes, so an interrupted run resumes where it stopped."""
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
    server: CompletionServer | None = None,
    concurrency: int = 8,
) -> RegenStats:
    """Regenerate this rank's share of ``in_path`` (conversations ``rank::world_size``) into its shard file,
    skipping what an interrupted run already finished; with ``world_size == 1`` also write ``out_path``
    (:func:`merge_shards`). Returns the stats of the conversations regenerated now.

    ``server``: the answers come from that OpenAI-compatible server (the target served there), ``model_path`` gives
    the tokenizer, chat template and stop ids. Requests that fail for good are appended to ``OUT.errors.jsonl`` (the
    prompt's index and the error) and left out, so running the command again retries exactly them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    conversations, _ = read_conversations(in_path, bad_lines="skip")
    conversations = [c for c in conversations if c[0]["role"] != "text"][:limit]
    if not conversations:
        raise ValueError(f"{in_path}: no usable conversation to answer")
    shard = shard_path(out_path, rank)
    settings = {"in": os.path.abspath(in_path), "model": os.path.abspath(model_path), "limit": limit,
                "max_new_tokens": max_new_tokens, "world_size": world_size, "format": RECORD_FORMAT}
    done = _read_shard(shard, settings)
    todo = [i for i in range(rank, len(conversations), world_size) if i not in done]
    stats = RegenStats()
    if done and rank == 0:
        print(f"regenerate: resuming, {len(done)} conversations of rank 0 already done", flush=True)
    if todo:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if server is not None:  # no weights here: the stop ids come from the generation config alone
            model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model_path))
        else:
            if torch.cuda.is_available():
                device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), torch.bfloat16
            else:
                device, dtype = torch.device("cpu"), torch.float32
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        errors = errors_path(out_path, rank, world_size)
        with _append_lines(shard, done, settings) as f, errors.open("a") as err:

            def save(k: int, rec: dict | None) -> None:
                f.write(json.dumps({"source_index": todo[k], **(rec or {"empty": True})}) + "\n")
                f.flush()

            def failed(k: int, error: str) -> None:
                err.write(json.dumps({"source_index": todo[k], "rank": rank, "error": error}) + "\n")
                err.flush()

            _, stats = regenerate_conversations(model, tokenizer, [conversations[i] for i in todo], max_new_tokens,
                                                batch_size, progress=rank == 0, on_answer=save, server=server,
                                                concurrency=concurrency, on_failure=failed)
        if not errors.stat().st_size:
            errors.unlink()  # this rank's own file: no other rank writes or removes it
    if world_size == 1 and not stats.failed:
        merge_shards(out_path, 1)
    return stats


@contextmanager
def _append_lines(path: Path, done: dict, settings: dict):
    """The shard file open for appending; a new (or torn) file is rewritten with its header and the good lines."""
    lines = [json.dumps({"settings": settings}), *(json.dumps(rec) for rec in done.values())]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    with path.open("a") as f:
        yield f


def output_record(shard_record: dict) -> dict:
    """A shard line as the output file holds it: without the rank's bookkeeping (``source_index``)."""
    return {key: shard_record[key] for key in ("conversations", "truncated", "answer_ids") if key in shard_record}


def merge_shards(out_path: str | os.PathLike, world_size: int) -> int:
    """Join the ranks' shard files into ``out_path`` in input order (atomically), then delete them. Returns lines."""
    records = []
    for r in range(world_size):
        lines = shard_path(out_path, r).read_text().splitlines()[1:]
        records += [json.loads(line) for line in lines]
    records.sort(key=lambda rec: rec["source_index"])
    merged = [json.dumps(output_record(rec)) for rec in records if not rec.get("empty")]
    write_text_atomic(out_path, "".join(line + "\n" for line in merged))
    for r in range(world_size):
        shard_path(out_path, r).unlink()
    return len(merged)


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--server", default=None, metavar="URL",
                   help="answer through this OpenAI-compatible server (vllm serve / SGLang serving --model-path's "
                        "target, e.g. http://127.0.0.1:8000) instead of in this process")
    p.add_argument("--served-model", default=None, help="the model name on --server (default: its first)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight to --server (default 16)")
    p.add_argument("--retries", type=int, default=6,
                   help="retries of a request after a connection error, a timeout, 429 or 5xx (exponential back-off)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    server = None
    if args.server:
        server = CompletionServer(args.server, model=args.served_model, retries=args.retries)
    if world == 1:
        stats = regenerate_file(args.model_path, args.in_path, args.out, args.max_new_tokens, args.batch_size,
                                args.limit, server=server, concurrency=args.concurrency)
        if stats.failed:
            print(f"{args.out}: not written, {stats.summary()}; errors in {args.out}.errors.jsonl", file=sys.stderr)
            return 1
        print(f"wrote {stats.answers} conversations to {args.out}: {stats.summary()}")
        return 0
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=args.dist_timeout))
    set_dist_timeout(args.dist_timeout)
    stats = regenerate_file(args.model_path, args.in_path, args.out, args.max_new_tokens, args.batch_size, args.limit,
                            rank, world, server=server, concurrency=args.concurrency)
    print(f"rank {rank}: {stats.summary()}", flush=True)
    failed = collectives.all_reduce(torch.tensor([stats.failed]))
    if failed.item():
        if rank == 0:
            print(f"{args.out}: not written, {int(failed.item())} requests failed (OUT.rank*.errors.jsonl); run "
                  "again to retry them", file=sys.stderr)
        dist.destroy_process_group()
        return 1
    if rank == 0:  # merge the shards back into input order
        n = merge_shards(args.out, world)
        print(f"wrote {n} conversations to {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
