"""`tbmesh chat` in a subprocess against a real API server with LocalBackend on a tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlx_lm
import pytest
from api_server import ApiServer, SteeredBackend

from tbmesh.core.generation import Unavailable
from tbmesh.testbed.tiny import make_tiny_model

MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / MODEL, layers=2, hidden=128)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ApiServer]:
    backend = SteeredBackend(model_dir)
    with ApiServer(backend) as server:
        yield server
    backend.close()


@pytest.fixture
def steered(server: ApiServer) -> Iterator[SteeredBackend]:
    backend = server.backend
    assert isinstance(backend, SteeredBackend)
    yield backend
    backend.reset()


def tbmesh(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "tbmesh", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=60)  # fmt: skip


def expected(model_dir: Path, messages: list[dict[str, str]], max_tokens: int) -> str:
    model, tokenizer = mlx_lm.load(str(model_dir))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)


def test_chat_streams_the_answer(server: ApiServer, model_dir: Path) -> None:
    result = tbmesh("chat", "Hello café", "--api", server.url, "--temperature", "0", "--max-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected(model_dir, [{"role": "user", "content": "Hello café"}], 10) + "\n"
    assert result.stderr == ""


def test_chat_system_model_and_seed(server: ApiServer, model_dir: Path) -> None:
    args = ("chat", "Hi", "--api", server.url, "--model", MODEL, "--system", "Be brief.", "--max-tokens", "8")
    greedy = tbmesh(*args, "--temperature", "0")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert greedy.stdout == expected(model_dir, messages, 8) + "\n"
    seeded = tbmesh(*args, "--seed", "5", "--temperature", "1")
    assert seeded.returncode == 0 and seeded.stdout == tbmesh(*args, "--seed", "5", "--temperature", "1").stdout


def test_no_daemon_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tbmesh("chat", "Hi", "--api", f"http://127.0.0.1:{port}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: no tbmesh daemon answers at http://127.0.0.1:{port} (")
    assert result.stderr.count("\n") == 1


def test_api_errors_are_one_line(server: ApiServer, steered: SteeredBackend) -> None:
    result = tbmesh("chat", "Hi", "--api", server.url, "--model", "gpt-4")
    assert result.returncode == 1
    assert result.stderr == "error: the model 'gpt-4' does not exist here; this node serves: tiny\n"
    result = tbmesh("chat", "Hi", "--api", server.url, "--max-tokens", "0")
    assert result.returncode == 1 and result.stderr == "error: 'max_tokens' must be 1 to 32768, not 0\n"
    steered.reason = Unavailable("no plan yet: waiting for a leader")
    result = tbmesh("chat", "Hi", "--api", server.url)
    assert result.returncode == 1 and result.stderr == "error: no plan yet: waiting for a leader\n"


def test_an_error_mid_answer_ends_the_line_and_exits_1(server: ApiServer, steered: SteeredBackend) -> None:
    steered.fail_after = 4
    result = tbmesh("chat", "Hello café", "--api", server.url, "--temperature", "0", "--max-tokens", "10")
    assert result.returncode == 1
    assert result.stdout.endswith("\n") and len(result.stdout) > 1
    assert result.stderr.startswith("error: generation failed: RuntimeError: stage 1 went away")
    assert result.stderr.count("\n") == 1
