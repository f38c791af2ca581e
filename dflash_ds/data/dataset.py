"""The tokenised training set: :class:`DataConfig` and :func:`build_dataset` (read, tokenise in ``datasets.map``
workers, drop examples without supervision, report lines containing the MASK id), cached on disk under a key of
everything it depends on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..settings import REQUIRED, check_choices, setting
from .chat import is_text_record, special_ids, check_template_roundtrip, tokenize_with_stored_answer
from .records import BAD_LINE_POLICIES, BadLineError, Record, read_records

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# What to do with an answer that regeneration cut off at --max-new-tokens (record field "truncated": true): "keep" it
# without supervising the end-of-turn token after it (the target never wrote one there), or "drop" it. Keep is the
# default because it measured better (docs/benchmarks.md): dropping removes exactly the long answers the target keeps
# writing at evaluation time.
TRUNCATED_POLICIES = ("drop", "keep")
# Bump when the tokenisation or masking logic changes, so that old caches are not reused.
# 3: regenerated answers keep their stored token ids; examples containing the MASK id are reported and dropped.
_CACHE_FORMAT_VERSION = 3


@dataclass
class DataConfig:
    """Data (JSONL conversations, tokenised with the target's chat template).

    ``cache_dir``: if set, the tokenised dataset is saved there and reused while the files, the tokenizer, the
    chat template, max_length, bad_lines and truncated stay the same.
    """

    paths: list[str] = setting(REQUIRED, "JSONL conversation file(s), concatenated in this order", flag="train-data",
                               metavar="FILE")
    max_length: int = setting(2048, "examples are truncated to this many tokens")
    bad_lines: str = setting("skip", "a malformed line: skip it (counted, with file:line) or stop with an error",
                             choices=BAD_LINE_POLICIES)
    num_proc: int = setting(1, "processes for tokenisation")
    cache_dir: str | None = setting(None, cli=False)
    truncated: str = setting("keep", "regenerated answers cut off at their token limit: keep them without "
                             "supervising the end-of-turn the target never wrote, or drop them",
                             choices=TRUNCATED_POLICIES)

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            # A lone string would otherwise be iterated character by character.
            self.paths = [os.fspath(self.paths)]
        self.paths = [os.fspath(p) for p in self.paths]
        check_choices(self)
        if self.max_length < 1:
            raise ValueError(f"--max-length must be >= 1, got {self.max_length}")
        if self.num_proc < 1:
            raise ValueError(f"--num-proc must be >= 1, got {self.num_proc}")


def mask_position(ids: list[int], mask_token_id: int | None) -> int:
    """Index of the first ``mask_token_id`` in ``ids``; -1 when there is none (or no MASK id is given)."""
    if mask_token_id is None:
        return -1
    return next((k for k, t in enumerate(ids) if t == mask_token_id), -1)


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, max_length: int,
                    mask_token_id: int | None = None) -> dict[str, list]:
    """datasets.map worker (module level so that num_proc > 1 can pickle it). Besides the example, each row says
    where the MASK id first occurs (``mask_at``, -1 if nowhere) and whether its stored answer ids were given but
    not used (``stale_ids``), for :func:`build_dataset` to report."""
    out: dict[str, list] = {"input_ids": [], "loss_mask": [], "mask_at": [], "stale_ids": []}
    for messages, truncated, answer_ids in zip(batch["messages"], batch["truncated"], batch["answer_ids"]):
        example, used = tokenize_with_stored_answer(tokenizer, messages, max_length, truncated, answer_ids)
        out["input_ids"].append(example["input_ids"])
        out["loss_mask"].append(example["loss_mask"])
        out["mask_at"].append(mask_position(example["input_ids"], mask_token_id))
        out["stale_ids"].append(int(answer_ids is not None and not used))
    return out


def _has_supervised_token(batch: dict[str, list]) -> list[bool]:
    return [any(m) for m in batch["loss_mask"]]


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_key(tokenizer: Any, config: DataConfig, mask_token_id: int | None = None) -> str:
    """Hash of everything the tokenised dataset depends on: file contents (in order), the tokenizer (its full
    serialised model, special tokens and chat template), max_length, the bad-line policy and the MASK id (examples
    containing it were dropped)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {
        "format": _CACHE_FORMAT_VERSION,
        "mask_token_id": mask_token_id,
        "files": [_sha256_file(p) for p in config.paths],
        "max_length": config.max_length,
        "bad_lines": config.bad_lines,
        "truncated": config.truncated,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_name": getattr(tokenizer, "name_or_path", ""),
        "vocab_size": len(tokenizer),
        "tokenizer_json": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else None,
        "special_ids": sorted(special_ids(tokenizer)),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _mask_error(tokenizer: Any, record: Record, ids: list[int], position: int, mask_token_id: int) -> BadLineError:
    """The bad-line report of an example in which the MASK id occurs at token ``position``."""
    token = tokenizer.convert_ids_to_tokens(mask_token_id) if mask_token_id < len(tokenizer) else None
    context = tokenizer.decode(ids[max(0, position - 6) : position + 6])
    return BadLineError(
        record.path, record.line,
        f"the MASK token {mask_token_id} ({token!r}) occurs at token {position} (in {context!r}): the drafter would "
        "read MASK in the clean stream; remove it from the data, or choose another --mask-token-id",
    )


def _rows_with_mask(tokenizer: Any, tokenized: datasets.Dataset, records: list[Record], mask_token_id: int | None,
                    bad_lines: str) -> list[int]:
    """Rows of ``tokenized`` (one per record) in which the MASK id occurs: each reported with its file and line,
    raised as a BadLineError under ``bad_lines="error"``, else returned to be dropped (counted per file)."""
    if mask_token_id is None:
        return []
    positions = tokenized.with_format("arrow")["mask_at"].to_pylist()
    rows = [i for i, pos in enumerate(positions) if pos >= 0]
    per_file: dict[str, int] = {}
    for i in rows:
        error = _mask_error(tokenizer, records[i], tokenized[i]["input_ids"], positions[i], mask_token_id)
        if bad_lines == "error":
            raise error
        logger.warning("skipping example %s", error)
        per_file[records[i].path] = per_file.get(records[i].path, 0) + 1
    for path, n in per_file.items():
        print(f"skipped {n} lines containing the MASK token {mask_token_id} in {path}", file=sys.stderr)
    return rows


def build_dataset(tokenizer: Any, config: DataConfig, mask_token_id: int | None = None) -> datasets.Dataset:
    """Read, validate and tokenise ``config.paths`` into a Dataset with columns ``input_ids`` and
    ``loss_mask`` (lists of ints of equal length ``<= max_length``), in file order then line order.

    Examples without a supervised token within ``max_length`` are dropped (counted and logged). An example in
    which ``mask_token_id`` (the drafter's MASK, :func:`dflash_ds.mask_token.resolve_mask_token`) occurs within
    ``max_length`` is a bad line: skipped and counted with its file and line, or an error, as ``bad_lines`` says.
    Regenerated answers use their stored ids (:func:`tokenize_conversation`); those that no longer decode to their
    text are tokenised from it, with a count. With ``cache_dir`` the result is saved there under a key that changes
    with the file contents, the tokenizer, max_length and the MASK id, and a later call with the same inputs loads
    it without tokenising. Under multi-process training, let one rank build the cache first, then the others load
    it.
    """
    import datasets  # here, not at module level: reading prompts for eval/regenerate must not need it

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("build_dataset needs a fast tokenizer (offset mappings locate the assistant turns)")
    if not config.paths:
        raise ValueError("DataConfig.paths is empty")

    key = dataset_key(tokenizer, config, mask_token_id)
    cache_path = None
    if config.cache_dir is not None:
        cache_path = os.path.join(config.cache_dir, f"dflash_data_{key}")
        if os.path.isdir(cache_path):
            logger.info("loading tokenised dataset from cache %s", cache_path)
            return datasets.load_from_disk(cache_path)

    records: list[Record] = []
    dropped_truncated = 0
    for path in config.paths:
        read, _ = read_records(path, config.bad_lines)
        kept_here = [r for r in read if not (r.truncated and config.truncated == "drop")]
        dropped_truncated += len(read) - len(kept_here)
        records.extend(kept_here)
    if dropped_truncated:
        print(f"dropped {dropped_truncated} conversations whose answer was cut off at the regeneration token limit "
              "(--truncated drop; 'keep' trains on them without their end-of-turn)", file=sys.stderr)
    if not records:
        why = f" ({dropped_truncated} dropped as truncated: see --truncated)" if dropped_truncated else ""
        raise ValueError(f"no usable conversations in {config.paths}{why}")
    first_chat = next((r.conversation for r in records if not is_text_record(r.conversation)), None)
    if first_chat is not None:
        check_template_roundtrip(tokenizer, first_chat)

    raw = datasets.Dataset.from_list(
        [{"messages": r.conversation, "truncated": r.truncated, "answer_ids": r.answer_ids} for r in records]
    )
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "loss_mask": datasets.List(datasets.Value("int8")),
         "mask_at": datasets.Value("int32"), "stale_ids": datasets.Value("int8")}
    )
    num_proc = min(config.num_proc, len(records))
    # new_fingerprint: skips hashing the tokenizer passed in fn_kwargs (slow for a 150k vocabulary); our own
    # cache key already covers every input.
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "max_length": config.max_length, "mask_token_id": mask_token_id},
        remove_columns=["messages", "truncated", "answer_ids"],
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=f"{key}-tokenize",
        desc="tokenizing",
    )
    stale = sum(tokenized.with_format("arrow")["stale_ids"].to_pylist())
    if stale:
        print(f"{stale} regenerated answers' stored token ids do not decode to their text with this tokenizer "
              "(regenerated with another tokenizer, or the answer was edited): tokenised from the text instead",
              file=sys.stderr)
    with_mask = set(_rows_with_mask(tokenizer, tokenized, records, mask_token_id, config.bad_lines))
    tokenized = tokenized.remove_columns(["mask_at", "stale_ids"])
    if with_mask:
        tokenized = tokenized.select([i for i in range(len(tokenized)) if i not in with_mask],
                                     new_fingerprint=f"{key}-no-mask")
    kept = tokenized.filter(_has_supervised_token, batched=True, new_fingerprint=f"{key}-filter")
    dropped = len(tokenized) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d examples with no assistant token within max_length=%d",
            dropped,
            len(tokenized),
            config.max_length,
        )
    if len(kept) == 0:
        raise ValueError(f"no training examples left in {config.paths} (max_length={config.max_length})")

    if cache_path is None:
        return kept
    # Save under a temporary name, then rename: an interrupted run never leaves a half-written cache behind.
    os.makedirs(config.cache_dir, exist_ok=True)
    tmp_path = f"{cache_path}.tmp-{os.getpid()}"
    kept.save_to_disk(tmp_path)
    try:
        os.rename(tmp_path, cache_path)
    except OSError:
        # Another process finished the same cache first; its copy is identical.
        shutil.rmtree(tmp_path, ignore_errors=True)
    return datasets.load_from_disk(cache_path)
