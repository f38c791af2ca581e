"""Batching a :func:`~dflash_ds.data.dataset.build_dataset` result: its sequence lengths (for length-grouped
sampling) and the right-padding collate function."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch

if TYPE_CHECKING:
    import datasets


def sequence_lengths(dataset: datasets.Dataset) -> list[int]:
    """Tokens per example of a :func:`build_dataset` result, read from the Arrow column (no Python lists built)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def collate_batch(examples: Iterable[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest one.

    ``examples``: dicts with ``input_ids`` and ``loss_mask`` (lists or 1-D tensors of equal length).
    Returns ``input_ids`` [b, S] (``pad_token_id`` on padding), ``loss_mask`` [b, S] (0 on padding) and
    ``attention_mask`` [b, S] (1 real, 0 padding), all long, ``S`` the longest length.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("collate_batch got no examples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token)")
    lengths = [len(ex["input_ids"]) for ex in examples]
    batch, seq = len(examples), max(lengths)
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((batch, seq), dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    for i, (ex, n) in enumerate(zip(examples, lengths)):
        if len(ex["loss_mask"]) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(ex['loss_mask'])} loss_mask entries")
        input_ids[i, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        loss_mask[i, :n] = torch.as_tensor(ex["loss_mask"], dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
