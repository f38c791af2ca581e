"""``dflash-ds regenerate --server URL``: answers from an OpenAI-compatible server equal in-process regeneration token
for token; transient errors are retried, a request that keeps failing is written to OUT.errors.jsonl and retried by
the next run, and a server that dies keeps every answer already written.

The server here is a loopback stand-in that answers ``/v1/completions`` with the same greedy decoder on the same
model (what ``vllm serve`` does, tested for real in tests/test_serving.py), so these tests check the client: token
ids in and out, concurrency, retries, failures, resume.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import write_conversations, write_tiny_target
from dflash_ds import regenerate
from dflash_ds.serving.openai_client import CompletionServer, ServerError


class FakeServer:
    """``/v1/models`` and ``/v1/completions`` (prompt as token ids, ``return_token_ids``) on 127.0.0.1, greedy by
    :func:`dflash_ds.regenerate.greedy_stream` on ``model``. ``transient``: that many 503s before answering;
    ``refuse``: prompts (as tuples) answered with 400 every time; ``calls``: completion requests seen."""

    def __init__(self, model) -> None:
        self.model, self.transient, self.refuse, self.calls = model, 0, set(), 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.calls += 1
                    if fake.transient:
                        fake.transient -= 1
                        return self._send(503, {"error": "warming up"})
                if tuple(body["prompt"]) in fake.refuse:
                    return self._send(400, {"error": "prompt too long"})
                with fake.lock:  # one decode at a time, as one model
                    (_, ids), = regenerate.greedy_stream(fake.model, [body["prompt"]], body["max_tokens"],
                                                         body["stop_token_ids"], batch_size=1)
                self._send(200, {"choices": [{"token_ids": ids, "text": ""}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("regen_server")
    write_tiny_target(d / "model")
    write_conversations(d / "data.jsonl", n=10)
    in_process = d / "in_process.jsonl"
    regenerate.regenerate_file(str(d / "model"), str(d / "data.jsonl"), str(in_process), max_new_tokens=12)
    return d


@pytest.fixture
def server(assets):
    from transformers import AutoModelForCausalLM

    fake = FakeServer(AutoModelForCausalLM.from_pretrained(assets / "model", dtype=torch.float32).eval())
    yield fake
    fake.stop()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_server_answers_equal_in_process_regeneration(assets, server, tmp_path):
    server.transient = 3  # a server still warming up: retried with back-off
    out = tmp_path / "served.jsonl"
    stats = regenerate.regenerate_file(str(assets / "model"), str(assets / "data.jsonl"), str(out), max_new_tokens=12,
                                       server=CompletionServer(server.url, backoff=0.01), concurrency=4)
    assert stats.failed == 0 and stats.answers == len(_records(out)) and server.calls >= 10 + 3
    assert _records(out) == _records(assets / "in_process.jsonl")  # token for token (answer_ids), in input order
    assert not Path(f"{out}.errors.jsonl").exists()


def test_failed_requests_are_recorded_and_retried_by_the_next_run(assets, server, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "model")
    conversations = [json.loads(line)["conversations"] for line in (assets / "data.jsonl").read_text().splitlines()]
    first_prompt = regenerate.prompt_messages(conversations[0])
    text = regenerate.render_chat(tok, first_prompt, add_generation_prompt=True)
    server.refuse = {tuple(tok(text, add_special_tokens=False)["input_ids"])}
    out = tmp_path / "served.jsonl"
    argv = ["--model-path", str(assets / "model"), "--in", str(assets / "data.jsonl"), "--out", str(out),
            "--max-new-tokens", "12", "--server", server.url, "--concurrency", "3", "--retries", "1"]
    assert regenerate.main(argv) == 1
    assert "1 FAILED" in capsys.readouterr().err and not out.exists()  # an incomplete output is not written
    errors = _records(Path(f"{out}.errors.jsonl"))
    assert [e["source_index"] for e in errors] == [0] and "HTTP 400" in errors[0]["error"]
    shard = regenerate.shard_path(out, 0)
    assert len(shard.read_text().splitlines()) == 1 + 9  # the other nine answers are kept

    server.refuse, calls = set(), server.calls
    assert regenerate.main(argv) == 0
    assert server.calls - calls == 1  # only the failed one was asked again
    assert _records(out) == _records(assets / "in_process.jsonl")


def test_a_dead_server_keeps_what_was_written(assets, server, tmp_path):
    out = tmp_path / "served.jsonl"
    client = CompletionServer(server.url, retries=1, backoff=0.01)
    answered = []
    real = client.complete

    def complete_then_die(*args, **kwargs):  # the server goes away after its fourth answer
        ids = real(*args, **kwargs)
        answered.append(1)
        if len(answered) == 4:
            server.stop()
        return ids

    client.complete = complete_then_die
    stats = regenerate.regenerate_file(str(assets / "model"), str(assets / "data.jsonl"), str(out),
                                       max_new_tokens=12, server=client, concurrency=1)
    assert stats.answers == 4 and stats.failed == 6 and not out.exists()
    with pytest.raises(ServerError):
        CompletionServer(server.url, retries=0).served_model()
    kept = _records(regenerate.shard_path(out, 0))[1:]
    assert len(kept) == 4
    in_process = {i: r for i, r in enumerate(_records(assets / "in_process.jsonl"))}
    for rec in kept:  # the answers written before the server died are whole and right
        assert {k: v for k, v in rec.items() if k != "source_index"} == in_process[rec["source_index"]]
