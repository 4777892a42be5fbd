"""Shared by the tests that generate through real daemons: the model, the single-process
mlx-lm reference, a cluster of daemons on loopback, and HTTP clients (plain and streaming)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from daemons import DaemonProcess, agreed, start_all, wait_for
from mlx_lm import load
from mlx_lm.generate import generate_step

from tbmesh.runtime.sampling import Sampling, make_sampler
from tbmesh.testbed.tiny import make_tiny_model

PROMPTS = ["The quick brown fox", "Thunderbolt cables link the Macs", "Hello"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=8, hidden=128, vocab=512)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Single-process mlx-lm on the same directory: the tokens every run must reproduce."""
    return mlx_reference(model_dir)


def mlx_reference(model_dir: Path):
    """generate(prompt, max_tokens, sampling) -> (text, tokens) of single-process mlx-lm."""
    model, tokenizer = load(str(model_dir))

    def generate(prompt: str | list[int], max_tokens: int, sampling: Sampling = Sampling()) -> tuple[str, int]:
        """The text and the number of tokens mlx-lm answers to a prompt (text, or token ids)."""
        import mlx.core as mx

        detokenizer = tokenizer.detokenizer  # the streaming one, as the API's (and mlx_lm.generate's)
        detokenizer.reset()
        count = 0
        ids = mx.array(prompt) if isinstance(prompt, list) else mx_prompt(tokenizer, prompt)
        for token, _ in generate_step(ids, model, max_tokens=max_tokens, sampler=make_sampler(sampling)):
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            count += 1
        detokenizer.finalize()
        return detokenizer.text, count

    generate.tokenizer = tokenizer
    return generate


def mx_prompt(tokenizer, prompt: str):
    import mlx.core as mx

    return mx.array(tokenizer.encode(prompt))


@pytest.fixture
def cluster(tmp_path, model_dir):
    cluster_name = f"i{uuid.uuid4().hex[:8]}"
    started: list[DaemonProcess] = []

    def make(name: str, memory: str, extra: tuple[str, ...] = ()) -> DaemonProcess:
        daemon = DaemonProcess(name, tmp_path / name, ["--interface", "lo", "--memory", memory,
                                                       "--model", str(model_dir), "--cluster", cluster_name,
                                                       "--no-probe", *extra])
        started.append(daemon)
        return daemon

    def start(n: int, memory: str = "4GB", extra: tuple[str, ...] = ()) -> list[DaemonProcess]:
        """`n` daemons (with `extra` flags) of one cluster, started at once."""
        return start_all([make(f"n{i}", memory, extra) for i in range(n)])

    def join(name: str, memory: str = "4GB") -> DaemonProcess:
        """One more daemon in the same cluster."""
        return make(name, memory).start()

    start.join = join
    yield start
    for daemon in started:
        daemon.kill()


def serving(daemons: list[DaemonProcess], stages: int) -> dict:
    """Wait for one plan of `stages` stages with every shard loaded."""

    def ready():
        view = agreed(daemons)
        if view is None or len(view["plan"]["stages"]) != stages:
            return None
        loaded = [n["shard"] for n in view["nodes"] if n["shard"]]
        return view if len(loaded) == stages and all(s["loaded"] for s in loaded) else None

    return wait_for(ready, 30, f"{stages} loaded stages")


def post(daemon: DaemonProcess, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    host, port = daemon.api_url().split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def complete(daemon: DaemonProcess, prompt: str, max_tokens: int, **sampling) -> tuple[str, int]:
    status, body = post(daemon, "/v1/completions", {"model": "tiny", "prompt": prompt,
                                                     "max_tokens": max_tokens, **sampling})
    assert status == 200, body
    return body["choices"][0]["text"], body["usage"]["completion_tokens"]


def read_stream(daemon: DaemonProcess, body: dict, timeout: float,
                on_piece: Callable[[str], None]) -> tuple[str | None, dict | None]:
    """POST a streamed /v1/completions; each text piece to on_piece as it arrives.

    Returns (finish_reason, error): the API's error object for a refusal or an error event,
    and {"message": "the stream ended without [DONE]"} when the connection ended early.
    Connection errors are raised.
    """
    connection = daemon.connection(timeout)
    finish_reason, error, done = None, None, False
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return None, json.loads(response.read())["error"]
        for line in response:
            if line.strip() == b"data: [DONE]":
                done = True
            if not line.startswith(b"data: ") or done:
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event.get("choices", []):
                if choice["text"]:
                    on_piece(choice["text"])
                finish_reason = choice.get("finish_reason") or finish_reason
    finally:
        connection.close()
    if not done and error is None:
        error = {"message": "the stream ended without [DONE]"}
    return finish_reason, error


class Stream(threading.Thread):
    """A streamed completion read in the background: the text pieces as they arrive."""

    def __init__(self, daemon: DaemonProcess, prompt: str, max_tokens: int, timeout: float = 120,
                 **sampling) -> None:
        super().__init__(daemon=True)
        self.daemon = daemon
        self.body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                     **sampling}
        self.timeout = timeout
        self.pieces: list[str] = []
        self.arrivals: list[float] = []
        self.error: dict | None = None
        self.finish_reason: str | None = None
        self.start()

    def run(self) -> None:
        try:
            self.finish_reason, self.error = read_stream(self.daemon, self.body, self.timeout, self._piece)
        except Exception as error:  # noqa: BLE001  (the test reads it)
            self.error = {"message": repr(error)}

    def _piece(self, text: str) -> None:
        self.pieces.append(text)
        self.arrivals.append(time.monotonic())

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def wait_pieces(self, n: int, timeout: float = 60) -> None:
        wait_for(lambda: len(self.pieces) >= n or not self.is_alive(), timeout, f"{n} pieces")
        assert len(self.pieces) >= n, (self.error, self.text)

    def result(self, timeout: float = 120) -> str:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        assert self.error is None, self.error
        return self.text

    def longest_pause(self) -> float:
        """The longest gap between two pieces (a re-plan shows up here)."""
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]
        return max(gaps, default=0.0)
