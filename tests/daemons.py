"""Real tbmesh daemons in subprocesses, for integration tests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tbmesh.testbed.tiny import make_tiny_model


def tiny_model_dir(root: Path) -> Path:
    """A real (random) 8-layer llama with its tokenizer, in mlx-lm's format."""
    if (root / "config.json").exists():
        return root
    return make_tiny_model(root, layers=8, hidden=64, vocab=320)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as error:  # a daemon not up yet, a half-formed cluster
            last_error = error
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class DaemonProcess:
    """One `tbmesh daemon` in a subprocess, optionally inside a network namespace."""

    def __init__(self, name: str, state_dir: Path, args: Sequence[str] = (),
                 mac: Any = None, log_dir: Path | None = None, env: dict[str, str] | None = None,
                 api_key: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.api_key = api_key  # the daemon's --api-key, sent with each request
        self.env = env or {}  # added to ours
        self.state_dir = state_dir
        self.args = list(args)
        if mac is not None and not {"--secret", "--secret-file"} & set(self.args):
            self.args.append("--insecure")  # its cables are veth pairs, not Thunderbolt
        self.mac = mac  # a netns.Mac to run in (its API is reached through its namespace)
        self.prefix = ["ip", "netns", "exec", mac.netns] if mac is not None else []
        self.log_path = (log_dir or state_dir) / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        self.launch()
        return self.wait_started()

    def launch(self) -> DaemonProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "api.json").unlink(missing_ok=True)
        cmd = self.prefix + [sys.executable, "-m", "tbmesh", "daemon", "--name", self.name,
                             "--state-dir", str(self.state_dir), "--port", "0", "--api-port", "0",
                             "--log-level", "debug", *self.args]
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def wait_started(self) -> DaemonProcess:
        wait_for(lambda: self.api_url() and self.status(), 30, f"{self.name} to start"
                 if self.proc.poll() is None else f"{self.name} (exited: {self.log()[-2000:]})")
        return self

    def api_url(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return json.loads((self.state_dir / "api.json").read_text())["url"]
        except (OSError, ValueError, KeyError):
            return None

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/status"))

    def get(self, path: str) -> bytes:
        return self.request("GET", path)

    def connection(self, timeout: float = 5) -> http.client.HTTPConnection:
        """An HTTP connection to the daemon's API (from inside its Mac when it has one)."""
        host, port = self.api_url().split("//")[1].split(":")
        if self.mac is None:
            return http.client.HTTPConnection(host, int(port), timeout=timeout)
        return _NamespacedHTTP(self.mac, host, int(port), timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 5) -> bytes:
        connection = self.connection(timeout)
        try:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            if body is not None:
                headers["Content-Type"] = "application/json"  # the API reads only bodies said to be JSON
            connection.request(method, path, body, headers)
            return connection.getresponse().read()
        finally:
            connection.close()

    @property
    def node_id(self) -> str:
        return self.status()["node"]["id"]

    @property
    def control_port(self) -> int:
        return json.loads((self.state_dir / "api.json").read_text())["port"]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def terminate(self, timeout: float = 10) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _NamespacedHTTP(http.client.HTTPConnection):
    """HTTP over a socket made inside a Mac's namespace (its loopback is not ours)."""

    def __init__(self, mac: Any, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.mac = mac

    def connect(self) -> None:
        self.sock = self.mac.socket()
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))


def serving_alone(name: str, state_dir: Path, model_dir: Path, args: Sequence[str] = ()) -> DaemonProcess:
    """One daemon on loopback, a cluster of its own, started and serving `model_dir` (its one
    stage loaded); kill() it when done."""
    daemon = DaemonProcess(name, state_dir, ["--interface", "lo", "--memory", "4GB", "--model", str(model_dir),
                                             "--cluster", f"alone{uuid.uuid4().hex[:8]}", "--no-probe", *args])
    try:
        daemon.start()
        wait_for(lambda: all(n["shard"] and n["shard"]["loaded"] for n in daemon.status()["nodes"])
                 and daemon.status()["plan"], 30, f"{name} to serve")  # fmt: skip
    except BaseException:
        daemon.kill()
        raise
    return daemon


def start_all(daemons: Sequence[DaemonProcess]) -> list[DaemonProcess]:
    """Launch several daemons at once (each spends seconds importing MLX), then wait."""
    for daemon in daemons:
        daemon.launch()
    return [daemon.wait_started() for daemon in daemons]


def alive_ids(status: dict[str, Any]) -> set[str]:
    return {n["id"] for n in status["nodes"] if n["state"] == "alive"}


def state_of(status: dict, node_id: str) -> str | None:
    return next((n["state"] for n in status["nodes"] if n["id"] == node_id), None)


def agreed(daemons: list[DaemonProcess]) -> dict | None:
    """The common view when every daemon sees all of them alive, one leader and one plan."""
    statuses = [d.status() for d in daemons]
    ids = {s["node"]["id"] for s in statuses}
    if any(alive_ids(s) != ids for s in statuses):
        return None
    leaders = {s["leader"] for s in statuses}
    plans = {json.dumps(s["plan"], sort_keys=True) for s in statuses}
    if len(leaders) != 1 or None in leaders or len(plans) != 1 or statuses[0]["plan"] is None:
        return None
    plan = statuses[0]["plan"]
    if plan_members(plan) | set(plan["left_out"]) != ids:
        return None  # a plan made before the last node joined; the next one will have it
    return statuses[0]


def serving_view(daemons: list[DaemonProcess]) -> dict | None:
    """The common view when the daemons agree (see agreed), nothing is being prepared, and
    every stage of the plan serves it; else None."""
    view = agreed(daemons)
    if view is None or view["preparing"] is not None:
        return None
    epoch = view["plan"]["epoch"]
    serving_nodes = {n["id"] for n in view["nodes"] if n["shard"] and n["shard"]["serving"] == epoch}
    return view if plan_members(view["plan"]) <= serving_nodes else None


def plan_members(plan: dict) -> set[str]:
    """Every node holding layers in a plan of /status: each stage's node, and a group's members."""
    return {m for s in plan["stages"] for m in s.get("group", [s["node"]])}
