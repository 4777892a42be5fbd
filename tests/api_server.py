"""A real aiohttp server with the daemon's API (tbmesh.http.server.make_app, served by tbmesh.http.server.Listener
as the daemon serves it), on 127.0.0.1 in a thread of its own, and a LocalBackend whose
availability and failures tests can steer."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import aclosing
from typing import Any

from tbmesh.core.generation import Backend, Sampling, Unavailable
from tbmesh.core.jsonform import from_json
from tbmesh.core.status import LinkStatus, Status
from tbmesh.http.common import Limits, ModelNames
from tbmesh.http.server import LOOPBACK_NAMES, Listener, make_app
from tbmesh.runtime.local import LocalBackend


def empty_status() -> Status:
    return from_json(Status, {})


async def no_links() -> tuple[LinkStatus, ...]:
    return ()


class ApiServer:
    """Serves one backend as the daemon does (a Listener: no handler cancellation). No
    daemon: GET /status answers `status()`, POST /probe `probe()`; `hosts`: the names it
    answers to (tbmesh.http.server.allowed_hosts)."""

    def __init__(self, backend: Backend, limits: Limits = Limits(), handler_cancellation: bool = False,
                 status: Callable[[], Status] = empty_status,
                 probe: Callable[[], Awaitable[tuple[LinkStatus, ...]]] = no_links,
                 hosts: Collection[str] = LOOPBACK_NAMES, names: ModelNames = ModelNames()) -> None:  # fmt: skip
        self.backend = backend
        self.names = names
        self.limits = limits
        self.hosts = hosts
        self.status = status
        self.probe = probe
        self.handler_cancellation = handler_cancellation  # True in aiohttp's own test server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    def __enter__(self) -> ApiServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _start(self) -> None:
        app = make_app(self.status, self.probe, self.backend, self.limits, hosts=self.hosts, names=self.names)
        self.listener = Listener(app, self.limits, handler_cancellation=self.handler_cancellation)
        await self.listener.start()
        self.port = await self.listener.listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.port}"

    # --- a client, with the standard library ---

    def post(self, path: str, body: Any, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def stream(self, path: str, body: dict[str, Any]) -> list[Any]:
        """The server-sent events of a streamed answer: parsed JSON objects, then "[DONE]"."""
        request = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            raw = response.read().decode()
        assert raw.endswith("\n\n")
        events = []
        for block in raw[:-2].split("\n\n"):
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        return events


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class SteeredBackend(LocalBackend):
    """A LocalBackend that tests can make unavailable, or fail after some tokens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reset()

    def reset(self) -> None:
        self.reason: Unavailable | None = None  # what unavailable() answers
        self.room: int | None = None  # what context() answers
        self.fail_after: int | None = None  # raise after yielding this many tokens
        self.failure: Callable[[], Exception] = lambda: RuntimeError("stage 1 went away")

    def unavailable(self, model: str) -> Unavailable | None:
        return self.reason

    def context(self, model: str) -> int | None:
        return self.room

    async def generate(self, model: str, prompt: list[int], max_tokens: int, sampling: Sampling) -> AsyncIterator[int]:
        async with aclosing(super().generate(model, prompt, max_tokens, sampling)) as tokens:
            count = 0
            async for token in tokens:
                if count == self.fail_after:
                    raise self.failure()
                yield token
                count += 1
