"""Offline target features for the standalone kind: one pass of the frozen target over the training set writes what
the objective reads from it, so that training runs none of the target's decoder layers (SpecForge's and ModelOpt's
offline mode).

What is stored, per training example of ``n`` tokens (its index in the tokenised dataset):

* ``features`` ``[n, K*H]``: the outputs of the tapped layers ``target_layer_ids``, concatenated (the drafter's
  context, :class:`~.feature_tap.FeatureTap`);
* ``final`` ``[n, H]``: the target's last (post-norm) hidden states, the KL teacher (only when the run has a KL term).

Layout of the directory (one writer per rank, each its own files; resumable)::

    manifest.json              what the features were made from (target, layer ids, data, dtype): checked by training
    rank{r}.features.bin       raw rows, the manifest's dtype, examples r, r + world, ... back to back
    rank{r}.final.bin
    rank{r}.index.json         [[example, first row, rows], ...]: what is complete (written after the rows, atomically)
    COMPLETE                   every rank finished

A run killed while writing resumes after the last example its index records (the rows after it are cut off).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...files import write_json_atomic

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
FORMAT = 1


class FeatureCacheError(ValueError):
    """A feature directory that cannot serve this run; the message names the directory and the flag to change."""


def target_fingerprint(model_path: str | os.PathLike) -> dict:
    """What identifies a target directory without reading all its weights: ``config.json``'s hash, every weight
    file's name and size, and a hash of each one's first and last MiB (different weights differ there)."""
    path = Path(model_path)
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    config = path / "config.json"
    return {"config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "weights_sha256": h.hexdigest(), "path": str(path)}


@dataclass
class FeatureManifest:
    """What a feature directory was made from. ``data_key``: the tokenised dataset's key (its files' contents, the
    tokenizer, max_length, the MASK id: :func:`dflash_ds.data.dataset_key`)."""

    target: dict
    layer_ids: list[int]
    hidden_size: int
    data_key: str
    max_length: int
    examples: int
    tokens: int
    dtype: str
    with_final: bool
    world_size: int
    format: int = FORMAT
    data_paths: list[str] = field(default_factory=list)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's stored rows (features, and the final hidden state when stored)."""
        width = self.hidden_size * (len(self.layer_ids) + (1 if self.with_final else 0))
        return width * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def total_bytes(self) -> int:
        return self.tokens * self.row_bytes

    def check_against(self, expected: "FeatureManifest", where: str) -> None:
        """FeatureCacheError naming what differs between these features and the run (``expected``)."""
        checks = [
            ("target", self.target.get("config_sha256") == expected.target.get("config_sha256")
             and self.target.get("weights_sha256") == expected.target.get("weights_sha256"),
             f"another target ({self.target.get('path')}, this run: {expected.target.get('path')}): --model-path"),
            ("layer ids", self.layer_ids == expected.layer_ids,
             f"target layers {self.layer_ids}, this run reads {expected.layer_ids}: --target-layer-ids / "
             "--draft-layers"),
            ("data", self.data_key == expected.data_key and self.max_length == expected.max_length,
             f"other data (files {self.data_paths}, max_length {self.max_length}; this run: {expected.data_paths}, "
             f"{expected.max_length}): --train-data / --max-length / the MASK id"),
            ("dtype", self.dtype == expected.dtype,
             f"features in {self.dtype}, this run trains in {expected.dtype}"),
            ("teacher", self.with_final or not expected.with_final,
             "no final hidden states (written for a run without a KL term); this run has --kl-weight > 0"),
        ]
        bad = [why for _, ok, why in checks if not ok]
        if bad:
            raise FeatureCacheError(f"--features {where}: made for " + "; ".join(bad)
                                    + ". Write them again for this run (dflash-ds features with its flags)")


def _rank_files(root: Path, rank: int) -> tuple[Path, Path, Path]:
    return root / f"rank{rank}.features.bin", root / f"rank{rank}.final.bin", root / f"rank{rank}.index.json"


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


class FeatureWriter:
    """Appends one rank's examples to its files; :meth:`done` lists the examples already written (resume)."""

    def __init__(self, root: Path, rank: int, manifest: FeatureManifest) -> None:
        self.root, self.manifest = Path(root), manifest
        self.feat_path, self.final_path, self.index_path = _rank_files(self.root, rank)
        self.index: list[list[int]] = json.loads(self.index_path.read_text()) if self.index_path.exists() else []
        rows = sum(n for _, _, n in self.index)
        width = manifest.hidden_size * torch.empty((), dtype=getattr(torch, manifest.dtype)).element_size()
        self.feat_bytes, self.final_bytes = width * len(manifest.layer_ids), width
        # cut off rows written after the last recorded example (a run killed between the rows and the index)
        self.feat = self._open(self.feat_path, rows * self.feat_bytes)
        self.final = self._open(self.final_path, rows * self.final_bytes) if manifest.with_final else None
        self.rows = rows

    @staticmethod
    def _open(path: Path, keep: int):
        f = open(path, "r+b" if path.exists() else "w+b")
        f.truncate(keep)
        f.seek(keep)
        return f

    def done(self) -> set[int]:
        return {example for example, _, _ in self.index}

    def append(self, example: int, features: torch.Tensor, final: torch.Tensor | None, flush: bool) -> None:
        """``features [n, K*H]`` (and ``final [n, H]``) of ``example``; ``flush`` makes it (and what came before)
        durable and recorded in the index."""
        n = features.shape[0]
        self.feat.write(_as_bytes(features))
        if self.final is not None:
            self.final.write(_as_bytes(final))
        self.index.append([int(example), self.rows, n])
        self.rows += n
        if flush:
            self.flush()

    def flush(self) -> None:
        for f in (self.feat, self.final):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        write_json_atomic(self.index_path, self.index)

    def close(self) -> None:
        self.flush()
        for f in (self.feat, self.final):
            if f is not None:
                f.close()


class FeatureStore:
    """Reads a complete feature directory (memory-mapped): :meth:`batch` gives a micro-batch's rows, right-padded
    as :func:`dflash_ds.data.collate_batch` pads its tokens."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).is_file():
            raise FeatureCacheError(f"--features {self.root}: no {MANIFEST} (write the features first: dflash-ds "
                                    "features with the training flags)")
        self.manifest = FeatureManifest(**json.loads((self.root / MANIFEST).read_text()))
        if not (self.root / COMPLETE).is_file():
            raise FeatureCacheError(f"--features {self.root}: incomplete (no {COMPLETE}); run dflash-ds features "
                                    "again with the same flags to finish it")
        m = self.manifest
        self.dtype = getattr(torch, m.dtype)
        self.where: dict[int, tuple[int, int, int]] = {}
        self.feat, self.final = [], []
        for rank in range(m.world_size):
            feat_path, final_path, index_path = _rank_files(self.root, rank)
            for example, first, n in json.loads(index_path.read_text()):
                self.where[example] = (rank, first, n)
            self.feat.append(np.memmap(feat_path, dtype=np.uint8, mode="r") if feat_path.stat().st_size else None)
            self.final.append(np.memmap(final_path, dtype=np.uint8, mode="r")
                              if m.with_final and final_path.stat().st_size else None)
        if len(self.where) != m.examples:
            raise FeatureCacheError(f"--features {self.root}: {len(self.where)} examples recorded, the manifest says "
                                    f"{m.examples}")

    def _rows(self, maps, rank: int, first: int, n: int, width: int) -> torch.Tensor:
        size = width * torch.empty((), dtype=self.dtype).element_size()
        raw = torch.from_numpy(np.array(maps[rank][first * size : (first + n) * size]))
        return raw.view(self.dtype).view(n, width)

    def batch(self, examples: Sequence[int], length: int, device, with_final: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features [b, length, K*H], final [b, length, H] or None)`` of ``examples`` (dataset indices), zero
        past each example's own length."""
        m = self.manifest
        K, H = len(m.layer_ids), m.hidden_size
        feats = torch.zeros(len(examples), length, K * H, dtype=self.dtype)
        final = torch.zeros(len(examples), length, H, dtype=self.dtype) if with_final else None
        for i, example in enumerate(examples):
            try:
                rank, first, n = self.where[int(example)]
            except KeyError:
                raise FeatureCacheError(f"--features {self.root}: no rows for training example {example}") from None
            if n > length:
                raise FeatureCacheError(f"--features {self.root}: example {example} has {n} rows, the batch {length}")
            feats[i, :n] = self._rows(self.feat, rank, first, n, K * H)
            if final is not None:
                final[i, :n] = self._rows(self.final, rank, first, n, H)
        return feats.to(device), (final.to(device) if final is not None else None)


def check_disk(root: Path, manifest: FeatureManifest) -> None:
    """Print the disk the features take; FeatureCacheError (before anything is written) when what is left to write
    (a resumed run: less the rows already there) will not fit."""
    written = sum(p.stat().st_size for p in Path(root).glob("rank*.bin"))
    need = manifest.total_bytes - written
    free = shutil.disk_usage(root).free
    print(f"dflash-ds features: {manifest.examples} examples, {manifest.tokens} tokens x {manifest.row_bytes} bytes "
          f"= {manifest.total_bytes / 2**30:.2f} GiB ({need / 2**30:.2f} GiB still to write, {free / 2**30:.1f} GiB "
          f"free at {root})", file=sys.stderr, flush=True)
    if need > free * 0.95:
        raise FeatureCacheError(f"--features {root}: {need / 2**30:.2f} GiB to write, only {free / 2**30:.2f} GiB "
                                "free there: choose another directory, or fewer examples / a shorter --max-length")


def open_for_writing(root: Path, manifest: FeatureManifest) -> None:
    """Start or resume a feature directory: a new one gets the manifest; an existing one must have been made for
    the same run (else FeatureCacheError: remove it or choose another)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST
    if path.is_file():
        theirs = FeatureManifest(**json.loads(path.read_text()))
        if asdict(theirs) != asdict(manifest):
            raise FeatureCacheError(f"--features {root} holds features of another run (its {MANIFEST} differs); "
                                    "remove it or choose another directory")
        return
    write_json_atomic(path, asdict(manifest))


__all__ = ["COMPLETE", "FeatureCacheError", "FeatureManifest", "FeatureStore", "FeatureWriter", "MANIFEST",
           "check_disk", "open_for_writing", "target_fingerprint"]
