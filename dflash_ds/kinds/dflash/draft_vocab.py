"""The standalone drafter's draft vocabulary (EAGLE-3's ``d2t``): the ``N`` target tokens its own lm_head drafts
over, chosen as the most frequent tokens of the target's answers in the training data.

A draft id ``i`` stands for target id ``ids[i]`` (``ids`` ascending); the published map is the offset table
``d2t[i] = ids[i] - i`` (target id = draft id + ``d2t[draft id]``), which vLLM's ``qwen3_dflash.py`` reads beside
``draft_vocab_size`` and the drafter's own ``lm_head.weight [N, H]``. Verification stays over the full vocabulary, so
decoding stays lossless: a draft can only miss tokens outside the vocabulary, which the target then writes itself.

The choice is made once per training run and kept in ``OUTPUT/draft_vocab.json`` (rank 0 writes it before any
model loads; every rank and a resumed run read it): ids, the counts' source, and the coverage (the share of answer
tokens inside the vocabulary) on the examples it was counted on and on held-out ones.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

VOCAB_FILE = "draft_vocab.json"
HELD_OUT_EVERY = 20  # every 20th example is held out of the counting: the coverage reported on unseen answers


@dataclass(frozen=True)
class DraftVocab:
    """``ids``: the target ids the drafter drafts over, ascending (draft id ``i`` = target id ``ids[i]``);
    ``target_vocab_size``: the target's vocabulary (the width verification and sampling use)."""

    ids: tuple[int, ...]
    target_vocab_size: int

    def __post_init__(self) -> None:
        ids = list(self.ids)
        if not ids:
            raise ValueError("a draft vocabulary needs at least one token")
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError("draft vocabulary ids must be strictly ascending (no repeats)")
        if ids[0] < 0 or ids[-1] >= self.target_vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {self.target_vocab_size}), got {ids[0]}..{ids[-1]}")

    @property
    def size(self) -> int:
        return len(self.ids)

    def id_tensor(self) -> torch.Tensor:
        """``[N]`` long: the target id of each draft id."""
        return torch.tensor(self.ids, dtype=torch.long)

    def d2t(self) -> torch.Tensor:
        """``[N]`` long offsets, the published table: target id = draft id + ``d2t[draft id]``."""
        return self.id_tensor() - torch.arange(self.size)

    def digest(self) -> str:
        """A short hash of the ids and the target's vocabulary size (what a resumed run must match)."""
        return hashlib.sha256(json.dumps([self.target_vocab_size, list(self.ids)]).encode()).hexdigest()[:16]

    @classmethod
    def from_d2t(cls, d2t: torch.Tensor, target_vocab_size: int) -> "DraftVocab":
        return cls(tuple((d2t.long() + torch.arange(d2t.numel())).tolist()), int(target_vocab_size))


def target_to_draft(ids: torch.Tensor, target_vocab_size: int) -> torch.Tensor:
    """``[V]`` long: the draft id of each target id, -1 for the ids outside the vocabulary ``ids [N]``."""
    out = torch.full((target_vocab_size,), -1, dtype=torch.long, device=ids.device)
    out[ids] = torch.arange(ids.numel(), device=ids.device)
    return out


def count_answer_tokens(examples: Iterable[dict], vocab_size: int) -> torch.Tensor:
    """``[V]`` long: how often each id occurs as a supervised (answer) token of the tokenised ``examples`` (each with
    ``input_ids`` and ``loss_mask``)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:  # one bincount a batch: O(tokens + V), not O(examples x V)
            counts.add_(torch.bincount(torch.cat(batch), minlength=vocab_size)[:vocab_size])
            batch.clear()

    for ex in examples:
        ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        batch.append(ids[torch.as_tensor(ex["loss_mask"], dtype=torch.bool)])
        if len(batch) == 4096:
            flush()
    flush()
    return counts


def choose_draft_vocab(counts: torch.Tensor, size: int, keep: Sequence[int] = ()) -> DraftVocab:
    """The ``size`` most frequent ids of ``counts [V]`` (ties: the lower id), always including ``keep`` (the EOS ids
    decoding stops on: a draft that cannot end an answer costs a step at every answer's end)."""
    V = counts.numel()
    keep = sorted({int(k) for k in keep})
    if not 1 <= size < V:
        raise ValueError(f"--draft-vocab must be in [1, {V}) (fewer than the target's {V} tokens), got {size}")
    if len(keep) > size:
        raise ValueError(f"--draft-vocab {size} is smaller than the {len(keep)} EOS ids it must keep")
    if any(not 0 <= k < V for k in keep):
        raise ValueError(f"EOS ids {keep} outside the vocabulary [0, {V})")
    score = counts.double().clone()
    score[keep] = float("inf")
    order = torch.sort(-score, stable=True).indices[:size]  # stable: among equal counts the lower id first
    return DraftVocab(tuple(sorted(order.tolist())), V)


def coverage(vocab: DraftVocab, counts: torch.Tensor) -> float:
    """The share of counted tokens inside the vocabulary (1.0 when nothing was counted)."""
    total = int(counts.sum())
    return 1.0 if total == 0 else float(counts[vocab.id_tensor()].sum()) / total


@dataclass
class VocabReport:
    """What ``draft_vocab.json`` holds beside the ids."""

    size: int
    target_vocab_size: int
    keep: list[int]  # the EOS ids kept whatever their counts
    counted_examples: int
    held_out_examples: int
    coverage_train: float  # share of answer tokens inside the vocabulary, on the examples counted
    coverage_held_out: float  # ... on every HELD_OUT_EVERY-th example, left out of the counting

    def line(self) -> str:
        return (f"draft vocabulary: {self.size} of {self.target_vocab_size} tokens; coverage of answer tokens "
                f"{self.coverage_train:.2%} on {self.counted_examples} training examples, {self.coverage_held_out:.2%} "
                f"on {self.held_out_examples} held out")


def build_draft_vocab(examples: Sequence[dict], size: int, vocab_size: int, keep: Sequence[int]
                      ) -> tuple[DraftVocab, VocabReport]:
    """Choose the vocabulary from every example but each :data:`HELD_OUT_EVERY`-th, whose coverage is reported."""
    counted = [ex for i, ex in enumerate(examples) if i % HELD_OUT_EVERY]
    held = [ex for i, ex in enumerate(examples) if not i % HELD_OUT_EVERY]
    train_counts, held_counts = count_answer_tokens(counted, vocab_size), count_answer_tokens(held, vocab_size)
    vocab = choose_draft_vocab(train_counts, size, keep)
    report = VocabReport(size, vocab_size, sorted({int(k) for k in keep}), len(counted), len(held),
                         coverage(vocab, train_counts), coverage(vocab, held_counts))
    return vocab, report


def save_draft_vocab(path: Path, vocab: DraftVocab, report: VocabReport) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"ids": list(vocab.ids), **asdict(report)}) + "\n")
    tmp.replace(path)


def load_draft_vocab(path: Path) -> tuple[DraftVocab, VocabReport]:
    """The vocabulary and report of a ``draft_vocab.json``; ValueError naming the file when it is not one."""
    try:
        raw = json.loads(Path(path).read_text())
        ids = raw.pop("ids")
        report = VocabReport(**raw)
        return DraftVocab(tuple(int(i) for i in ids), report.target_vocab_size), report
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a draft vocabulary file ({type(exc).__name__}: {exc}); delete it to "
                         "choose the vocabulary again") from None


def run_draft_vocab(output_dir: str | Path, size: int | None, examples: Sequence[dict] | None, vocab_size: int,
                    keep: Sequence[int]) -> DraftVocab | None:
    """The run's vocabulary: ``OUTPUT/draft_vocab.json`` when it is there (a resumed run), else chosen from
    ``examples`` and written there (pass ``examples`` on rank 0 only; the others read the file after a barrier).
    None without ``--draft-vocab``. A file of another size is an error naming the flag."""
    if size is None:
        return None
    path = Path(output_dir) / VOCAB_FILE
    if path.exists():
        vocab, report = load_draft_vocab(path)
        if vocab.size != size or vocab.target_vocab_size != vocab_size:
            raise ValueError(f"{path} holds a draft vocabulary of {vocab.size} of {vocab.target_vocab_size} tokens; "
                             f"this run asks --draft-vocab {size} of {vocab_size}: use --draft-vocab {vocab.size} or "
                             "another --output-dir")
        return vocab
    if examples is None:
        raise FileNotFoundError(f"{path}: not written (rank 0 chooses the draft vocabulary before the others read it)")
    vocab, report = build_draft_vocab(examples, size, vocab_size, keep)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_draft_vocab(path, vocab, report)
    print(report.line() + f" -> {path}", flush=True)
    return vocab


__all__ = ["DraftVocab", "HELD_OUT_EVERY", "VOCAB_FILE", "VocabReport", "build_draft_vocab", "choose_draft_vocab",
           "count_answer_tokens", "coverage", "load_draft_vocab", "run_draft_vocab", "save_draft_vocab",
           "target_to_draft"]
