#!/usr/bin/env python
"""Self-distillation throughput: in-process regeneration against the same prompts answered by a vLLM server
(``dflash-ds regenerate --server``), side by side in one run, and whether the answers are the same tokens.

Starts vLLM's OpenAI server (its own venv, ``python -m dflash_ds.serving.vllm_env``) on 127.0.0.1 with the target in
fp32, waits for it, regenerates ``--limit`` conversations through it (``--concurrency`` requests in flight), then the
same conversations in process (``--batch-size`` rows, continuous batching), and writes tokens/s of each, their ratio
and the count of identical answers (JSON, ``--out``).

    python bench/serve_regenerate.py --model-path SMOLLM2_DIR --in conversations.jsonl --limit 64 \\
        --max-new-tokens 128 --out bench/results/serve_regenerate_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_ds import regenerate  # noqa: E402
from dflash_ds.serving.openai_client import CompletionServer  # noqa: E402
from dflash_ds.serving.vllm_env import ensure_vllm_env  # noqa: E402


def start_server(python: Path, model: str, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host",
                             "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                             "--gpu-memory-utilization", "0.3", "--max-model-len", "1024"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(2)
    proc.terminate()
    raise RuntimeError("vLLM server did not come up in 300 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--in", dest="in_path", required=True)
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="serve_regen_"))
    proc, url = start_server(ensure_vllm_env(), args.model_path, tmp / "vllm.log")
    try:
        served = regenerate.regenerate_file(args.model_path, args.in_path, str(tmp / "served.jsonl"),
                                            args.max_new_tokens, limit=args.limit,
                                            server=CompletionServer(url), concurrency=args.concurrency)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    local = regenerate.regenerate_file(args.model_path, args.in_path, str(tmp / "local.jsonl"), args.max_new_tokens,
                                       args.batch_size, limit=args.limit)
    a = (tmp / "served.jsonl").read_text().splitlines()
    b = (tmp / "local.jsonl").read_text().splitlines()
    same = sum(x == y for x, y in zip(a, b))
    report = {"model": Path(args.model_path).name, "answers": len(b), "identical_answers": same,
              "in_process": {"tokens_per_s": local.tokens_per_s, "seconds": local.seconds,
                             "batch_size": args.batch_size, "summary": local.summary()},
              "vllm_server": {"tokens_per_s": served.tokens_per_s, "seconds": served.seconds,
                              "concurrency": args.concurrency, "summary": served.summary()},
              "server_over_in_process": served.tokens_per_s / local.tokens_per_s if local.tokens_per_s else None,
              "max_new_tokens": args.max_new_tokens}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
