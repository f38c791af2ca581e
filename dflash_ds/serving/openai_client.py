"""Greedy completions from an OpenAI-compatible server (``vllm serve``, SGLang), for self-distillation through a
serving engine (``dflash-ds regenerate --server URL``).

Prompts go as token ids (rendered and tokenised here, exactly as in-process regeneration does) and answers come back
as token ids (``return_token_ids``, vLLM >= 0.10.2), so an answer is the engine's own tokens, not its text tokenised
again. Requests run concurrently; a connection error, a timeout, 429 or a 5xx is retried with exponential back-off
(a restarting server), any other error is the request's failure. Only the standard library is used.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Collection, Iterator, Sequence

RETRIED_HTTP = (429, 500, 502, 503, 504)


class ServerError(RuntimeError):
    """A request that failed for good (after its retries, or with an error retrying cannot fix)."""


@dataclass
class CompletionServer:
    """``url``: the server's base (``http://127.0.0.1:8000``); ``model``: the served model's name (default: the
    server's first, ``/v1/models``)."""

    url: str
    model: str | None = None
    timeout: float = 600.0
    retries: int = 6
    backoff: float = 0.5

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]

    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in RETRIED_HTTP or attempt == self.retries:
                    detail = exc.read().decode(errors="replace")[:500]
                    raise ServerError(f"{self.url}{path}: HTTP {exc.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
                if attempt == self.retries:
                    raise ServerError(f"{self.url}{path}: {exc} (after {self.retries} retries)") from None
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def served_model(self) -> str:
        if self.model is None:
            models = self._request("/v1/models").get("data") or []
            if not models:
                raise ServerError(f"{self.url}/v1/models: the server lists no model")
            self.model = models[0]["id"]
        return self.model

    def complete(self, prompt_ids: Sequence[int], max_tokens: int, stop_ids: Collection[int]) -> list[int]:
        """The greedy continuation's token ids (at most ``max_tokens``, ending at the first stop id if one came)."""
        body = {"model": self.served_model(), "prompt": list(prompt_ids), "max_tokens": max_tokens,
                "temperature": 0.0, "stop_token_ids": sorted(stop_ids), "skip_special_tokens": False,
                "return_token_ids": True}
        choice = self._request("/v1/completions", body)["choices"][0]
        ids = choice.get("token_ids")
        if ids is None:
            raise ServerError(f"{self.url}: the server returned no token ids (return_token_ids needs vLLM >= 0.10.2)")
        return list(ids)


def server_stream(server: CompletionServer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  eos_ids: Collection[int], concurrency: int = 8) -> Iterator[tuple[int, list[int] | Exception]]:
    """``(k, ids)`` for prompt ``k`` as each answer arrives (``concurrency`` requests in flight), or ``(k, error)``
    for one that failed for good: the caller records it and goes on."""
    server.served_model()  # once, before the threads start
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(server.complete, p, max_new_tokens, eos_ids): k for k, p in enumerate(prompts)}
        for future in as_completed(futures):
            k = futures[future]
            try:
                yield k, future.result()
            except ServerError as exc:
                yield k, exc


__all__ = ["CompletionServer", "ServerError", "server_stream"]
