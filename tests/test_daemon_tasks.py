"""The daemon's rules for what runs beside it, in-process: a failed loop is started again, a
failed vital task stops the daemon loudly, refusals are logged once a minute per address,
and the descriptor limit is raised at start."""

from __future__ import annotations

import asyncio
import logging
import resource

import pytest

from tbmesh.node import tasks as tasks_module
from tbmesh.node.daemon import Daemon, DaemonConfig, raise_open_files_limit
from tbmesh.node.tasks import OncePer, supervise


def test_a_loop_that_fails_is_logged_and_started_again_with_back_off(caplog):
    calls: list[float] = []

    async def flaky() -> None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= 3:
            raise OSError(24, "Too many open files")  # what killed the disk task for good

    caplog.set_level(logging.ERROR, logger="tbmesh")
    asyncio.run(supervise("the copies task", flaky, backoff=(0.05, 0.2)))
    assert len(calls) == 4  # three failures, then a run that ended of itself
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert 0.04 < gaps[0] < 0.15 and gaps[1] >= 0.19 and gaps[2] >= 0.19  # the last step repeats
    failures = [r for r in caplog.records if "the copies task failed" in r.getMessage()]
    assert len(failures) == 3 and all(r.exc_info and "Too many open files" in str(r.exc_info[1]) for r in failures)
    assert "(3 in a row): starting it again in 0.2 s" in failures[-1].getMessage()


def test_cancelling_a_supervised_loop_stops_it():
    async def main() -> None:
        started = asyncio.Event()

        async def forever() -> None:
            started.set()
            await asyncio.sleep(3600)

        task = asyncio.ensure_future(supervise("the ticker", forever))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_vital_task_that_fails_stops_the_daemon_loudly(caplog, tmp_path):
    async def main() -> Daemon:
        node = Daemon(DaemonConfig(state_dir=tmp_path))

        async def renew() -> None:
            raise RuntimeError("discovery would not start again")

        node.tasks.spawn(renew(), vital="renewing the node id")
        await asyncio.wait_for(node.stopped.wait(), 5)
        return node

    caplog.set_level(logging.ERROR, logger="tbmesh")
    node = asyncio.run(main())
    assert node.failure == "renewing the node id failed: discovery would not start again"
    assert any(r.levelno == logging.CRITICAL and node.failure in r.getMessage() for r in caplog.records)


def test_a_task_of_one_connection_that_fails_is_logged_and_the_daemon_goes_on(caplog, tmp_path):
    async def main() -> Daemon:
        node = Daemon(DaemonConfig(state_dir=tmp_path))

        async def read() -> None:
            raise ValueError("a bug in a reader")

        await asyncio.gather(node.tasks.spawn(read()), return_exceptions=True)
        await asyncio.sleep(0)
        return node

    caplog.set_level(logging.ERROR, logger="tbmesh")
    node = asyncio.run(main())
    assert node.failure is None and not node.stopped.is_set()
    assert any(r.exc_info and "a bug in a reader" in str(r.exc_info[1]) for r in caplog.records)


def test_refusals_from_one_address_are_one_warning_a_minute(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(tasks_module.time, "monotonic", lambda: clock[0])
    log = logging.getLogger("tbmesh.test")
    caplog.set_level(logging.DEBUG, logger="tbmesh.test")
    quiet = OncePer(every=60)
    for i in range(500):
        quiet.log(log, logging.WARNING, "10.0.0.9", "refused a connection from %s: %s", "10.0.0.9", f"try {i}")
        clock[0] += 0.01
    quiet.log(log, logging.WARNING, "10.0.0.7", "refused a connection from %s: %s", "10.0.0.7", "another")
    clock[0] += 60
    quiet.log(log, logging.WARNING, "10.0.0.9", "refused a connection from %s: %s", "10.0.0.9", "later")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["refused a connection from 10.0.0.9: try 0",
                        "refused a connection from 10.0.0.7: another",
                        "refused a connection from 10.0.0.9: later (and 499 more from 10.0.0.9 in the last 65 s)"]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 499 and debug[-1].getMessage() == "refused a connection from 10.0.0.9: try 499"


def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one():
    import mlx_lm.utils  # noqa: F401  (sets its own limits when first imported: before ours)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"a hard limit of {hard} leaves nothing to raise")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what launchd gives a daemon
        assert raise_open_files_limit() == (256, hard if hard != resource.RLIM_INFINITY else 10240)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 256
        assert raise_open_files_limit()[0] == raise_open_files_limit()[1]  # raised already: left as it is
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
