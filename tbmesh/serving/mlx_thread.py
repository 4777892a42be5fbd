"""The one thread that runs MLX for the serving engine, in order, so that the event loop
(and the heartbeats) never wait for it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import Any

Done = Callable[[Any, BaseException | None], None]


class MlxThread:
    """Runs jobs in order. A long job (a load) runs the short jobs queued meanwhile at its
    own pace (`run_queued`), never another long one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._jobs: collections.deque[tuple[bool, Callable[[], Any], Done]] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: Done, long: bool = False) -> None:
        """Run fn() in the thread, then done(result, error) on the event loop."""
        with self._ready:
            self._jobs.append((long, fn, done))
            self._ready.notify()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()

    def run_queued(self) -> None:
        """From inside a long job: run the short jobs queued so far."""
        while True:
            with self._ready:
                job = next((j for j in self._jobs if not j[0]), None)
                if job is None:
                    return
                self._jobs.remove(job)
            self._call(job)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
            self._call(job)

    def _call(self, job: tuple[bool, Callable[[], Any], Done]) -> None:
        _, fn, done = job
        try:
            result, error = fn(), None
        except BaseException as failure:  # noqa: BLE001  (the event loop side reads it)
            result, error = None, failure
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self.loop.call_soon_threadsafe(done, result, error)
