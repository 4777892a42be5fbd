"""What runs beside the daemon: loops started again when they fail, one-shot tasks, and a
log that refused strangers cannot fill.

The rule: a loop that fails (the core's timer aside, which is no task: the disk's, the
copies', a dial loop, ...) is logged with its traceback and started again after a back-off
(`supervise`); a one-shot task the node cannot do without stops the daemon with one error
line (`Tasks.spawn(vital=...)`); a connection's task that fails costs that connection, logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger("tbmesh")

RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)  # s before each restart of a failed loop in a row; the last repeats
HEALTHY_AFTER = 60.0  # s a restarted loop runs before its failures count from the start again
REFUSED_LOG_EVERY = 60.0  # s: one WARNING per remote address for connections refused, then a count
STOP_WAIT_S = 5.0  # at stop, how long the cancelled tasks get to end their own way


async def supervise(name: str, run: Callable[[], Awaitable[None]], backoff: Sequence[float] = RESTART_BACKOFF,
                    healthy_after: float = HEALTHY_AFTER) -> None:
    """Run the loop `run()` until it returns: each exception is logged with its traceback and
    the loop started again after a back-off (`backoff`'s next step, its last repeating; back
    to the first after a run of `healthy_after` s). Never raises but CancelledError."""
    failures = 0
    while True:
        began = time.monotonic()
        try:
            await run()
            return
        except Exception:  # CancelledError is not one: cancelling stops the loop
            if time.monotonic() - began >= healthy_after:
                failures = 0
            delay = backoff[min(failures, len(backoff) - 1)]
            failures += 1
            log.exception("%s failed (%d in a row): starting it again in %g s", name, failures, delay)
            await asyncio.sleep(delay)


class Tasks:
    """The daemon's tasks, all cancelled at stop. `failed(why)` is called when a vital one
    fails: the node cannot go on without it."""

    def __init__(self, failed: Callable[[str], None]) -> None:
        self._failed = failed
        self._running: set[asyncio.Task] = set()

    def spawn(self, coro: Awaitable[None], vital: str | None = None) -> asyncio.Task:
        """A one-shot task. One that fails is logged with its traceback; a `vital` one (its
        name) stops the daemon."""
        task = asyncio.ensure_future(coro)
        self._running.add(task)
        task.add_done_callback(lambda done: self._done(done, vital))
        return task

    def keep(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """A loop for the daemon's life, started again whenever it fails (`supervise`)."""
        return self.spawn(supervise(name, run), vital=name)  # supervise raises only if it has a bug

    def cancel(self) -> list[asyncio.Task]:
        """Cancel every task; returns them, to wait for."""
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        return tasks

    def _done(self, task: asyncio.Task, vital: str | None) -> None:
        self._running.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("%s failed: %r", vital or "a task", error, exc_info=error)
        if vital is not None:
            self._failed(f"{vital} failed: {' '.join(str(error).split())[:200] or type(error).__name__}")


class OncePer:
    """At most one log line per key (a remote address) each `every` s at its level, the next
    saying how many were held back meanwhile (those go to the debug log): refused strangers
    cannot fill the log."""

    MAX_KEYS = 4096  # past this, keys not heard from for `every` s are forgotten

    def __init__(self, every: float = REFUSED_LOG_EVERY) -> None:
        self.every = every
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (when last logged, held back since)

    def log(self, logger: logging.Logger, level: int, key: str, message: str, *args: Any) -> bool:
        """Log `message % args` unless `key` was logged less than `every` s ago; whether it was."""
        now = time.monotonic()
        last, held = self._seen.get(key, (-self.every, 0))
        if now - last < self.every:
            self._seen[key] = (last, held + 1)
            logger.debug(message, *args)
            return False
        if len(self._seen) >= self.MAX_KEYS:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.every}
        self._seen[key] = (now, 0)
        text = message % args if args else message
        logger.log(level, "%s%s", text, f" (and {held} more from {key} in the last {now - last:.0f} s)" if held else "")
        return True
