"""`tbmesh demo`: a whole cluster on this machine, no Macs needed.

It teaches a small model once (cached: `tbmesh model tiny --teach default`), starts N daemons
on loopback (each a real `tbmesh daemon` process: discovery, election, planning, MLX shards,
the pipeline), shows the cluster, asks the question the model was taught and streams its
answer through the N-stage pipeline, stops one stage mid-answer (kill -9) and shows the
cluster re-forming while the answer goes on, then stops everything it started. The answer is
the taught paragraph, word for word: one that broke off or went wrong would show.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from tbmesh.cli.app import one_line
from tbmesh.cli.client import ApiProblem, fetch_status, open_api, stream_answer
from tbmesh.core.status import Status

NODES = 3  # daemons (Macs) the demo runs: a three-stage pipeline, two stages after one is stopped
KILL_AFTER = 0.3  # of the taught answer's text, stop a stage
MAX_TOKENS = 400  # the taught answer is about 90


class DemoError(Exception):
    """One line: why the demo cannot go on."""


def model_dir(cache: Path, say: Callable[[str], None]) -> Path:
    """The demo's model, taught on first use (nothing is downloaded).

    Its directory is named after what it is made from, so a newer tbmesh teaches a new one.
    """
    from tbmesh.testbed.teach import CONVERSATIONS
    from tbmesh.testbed.tiny import CHAT_TEMPLATE, TAUGHT_SIZES, WEIGHTS_FILE, make_tiny_model

    made_from = json.dumps([CONVERSATIONS, TAUGHT_SIZES, CHAT_TEMPLATE], sort_keys=True)
    path = cache / f"demo-taught-{hashlib.sha256(made_from.encode()).hexdigest()[:8]}"
    if not (path / WEIGHTS_FILE).exists():  # written last: a teaching cut short is taught again
        say(f"teaching the demo model, once (seconds): {path}")
        make_tiny_model(path, teach=CONVERSATIONS, force=True)
    return path


@dataclass
class Node:
    name: str
    state_dir: Path
    proc: subprocess.Popen
    api: str = ""

    def status(self) -> Status:
        return fetch_status(self.api, timeout=2.0)


@dataclass
class Answer:
    """The streamed answer, read in a background thread."""

    text: str = ""
    tokens: int = 0
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Demo:
    def __init__(self, nodes: int, model: Path, workdir: Path, say: Callable[[str], None]) -> None:
        from tbmesh.testbed.teach import DEMO_ANSWER, DEMO_QUESTION

        self.count, self.model, self.workdir = nodes, model, workdir
        self.say = say
        self.cluster = f"demo-{uuid.uuid4().hex[:6]}"
        self.nodes: list[Node] = []
        self.answer = Answer()
        self.question, self.taught = DEMO_QUESTION, DEMO_ANSWER  # the answer to expect, word for word
        self.stopped: Node | None = None

    # ----- the cluster -----------------------------------------------------------------

    def start(self) -> None:
        self.say(f"model: {self.model} (llama, 6 layers, taught a few answers)")
        for i in range(self.count):
            state = self.workdir / f"mac-{i + 1}"
            state.mkdir(parents=True)
            log = open(state / "daemon.log", "wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "tbmesh", "daemon", "--interface", "lo", "--port", "0",
                 "--api-port", "0", "--state-dir", str(state), "--name", f"mac-{i + 1}",
                 "--cluster", self.cluster, "--model", str(self.model), "--memory", "4GB", "--no-probe"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            self.nodes.append(Node(f"mac-{i + 1}", state, proc))
        self.say(f"started {self.count} daemons on loopback, cluster {self.cluster!r}")
        for node in self.nodes:
            node.api = self._wait(lambda n=node: self._api_of(n), 60, f"{node.name} to start")

    def _api_of(self, node: Node) -> str | None:
        if node.proc.poll() is not None:
            log = (node.state_dir / "daemon.log").read_text(errors="replace").strip().splitlines()
            raise DemoError(f"{node.name} exited: {log[-1] if log else node.proc.returncode}")
        try:
            return json.loads((node.state_dir / "api.json").read_text())["url"]
        except (OSError, ValueError, KeyError):
            return None

    def serving(self, nodes: list[Node], timeout: float = 60) -> Status:
        """Wait for a committed plan over `nodes` whose every stage serves it."""
        def ready() -> Status | None:
            view = nodes[0].status()
            plan = view.plan
            if plan is None or view.preparing or len(plan.stages) != len(nodes):
                return None
            serving = {n.id for n in view.nodes if n.shard and n.state == "alive" and n.shard.serving == plan.epoch}
            return view if set(plan.nodes) <= serving else None

        return self._wait(ready, timeout, f"a plan over {len(nodes)} nodes")

    @staticmethod
    def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (value := condition()) is not None:
                    return value
            except ConnectionError:
                pass
            time.sleep(0.1)
        raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")

    def stop_a_stage(self, view: Status) -> Node:
        """kill -9 a stage other than the entry (node 0), a middle one if there is one."""
        stages = [_name(view, node) for node in view.plan.nodes] if view.plan else []
        middle = stages[1:-1] or stages
        victim = min((n for n in self.nodes[1:] if n.name in stages),
                     key=lambda n: (n.name not in middle, n.name))
        victim.proc.kill()
        victim.proc.wait(10)
        self.stopped = victim
        return victim

    def close(self) -> None:
        """Stop every daemon we started (SIGTERM: a goodbye; then SIGKILL)."""
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)

    # ----- the answer ------------------------------------------------------------------

    def ask(self) -> None:
        threading.Thread(target=self._stream, daemon=True).start()

    def _stream(self) -> None:
        body = {"model": self.model.name, "stream": True, "temperature": 0, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user", "content": self.question}]}

        def write(text: str) -> None:
            self.answer.text += text
            self.answer.tokens += 1
            self.answer.arrivals.append(time.monotonic())

        try:
            with open_api(self.nodes[0].api, "/v1/chat/completions", body, timeout=120) as response:
                stream_answer(response, write)
        except (ApiProblem, OSError, ValueError) as error:
            self.answer.error = str(error)
        finally:
            self.answer.done.set()


def command(
    nodes: int = typer.Option(NODES, "--nodes", help="How many daemons (Macs) to run on this machine."),
    ui: Optional[bool] = typer.Option(None, "--ui/--no-ui", help="Show the live status screen.", show_default="when stdout is a terminal"),
) -> None:  # fmt: skip
    """A whole cluster on this machine: start NODES daemons on loopback with a small taught
    model, stream its answer through their pipeline, stop one of them mid-answer and watch the
    cluster re-form and the answer go on; everything started is stopped at the end."""
    if ui is None:
        ui = sys.stdout.isatty()
    try:
        code = run(nodes=nodes, ui=ui)
    except DemoError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    raise typer.Exit(code)


def run(nodes: int = NODES, ui: bool = True, cache: Path | None = None) -> int:
    """The whole demo; returns the exit code."""
    if nodes < 2:
        raise DemoError("--nodes must be 2 or more (one of them is stopped mid-answer)")
    console = Console(highlight=False)
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tbmesh"
    log: list[str] = []

    def say(line: str) -> None:
        log.append(line)
        if not ui:
            console.print(f"[bold]demo:[/] {line}")

    model = model_dir(cache, lambda line: console.print(f"[bold]demo:[/] {line}"))  # before the live screen
    with tempfile.TemporaryDirectory(prefix="tbmesh-demo-") as tmp:
        demo = Demo(nodes, model, Path(tmp), say)
        try:
            if ui:
                with Live(console=console, refresh_per_second=4, transient=False) as live:
                    _scenario(demo, say, lambda: live.update(_frame(demo, log, console.width)))
            else:
                _scenario(demo, say, lambda: None)
                console.print(f"\n[bold]answer[/] ({demo.answer.tokens} pieces):\n{demo.answer.text}\n")
        finally:
            demo.close()
    return 0


def _scenario(demo: Demo, say: Callable[[str], None], draw: Callable[[], None]) -> None:
    demo.start()
    view = demo.serving(demo.nodes)
    say(f"the cluster formed: leader {_name(view, view.leader)}, plan epoch {_epoch(view)}: {_stages(view)}")
    draw()
    say(f"asking {demo.nodes[0].name}: {demo.question!r} (temperature 0)")
    demo.ask()
    while len(demo.answer.text) < len(demo.taught) * KILL_AFTER and not demo.answer.done.is_set():
        draw()
        time.sleep(0.25)
    if demo.answer.done.is_set():
        raise DemoError(f"the answer ended early: {demo.answer.error or 'end of sequence'}")
    before = demo.answer.tokens
    victim = demo.stop_a_stage(view)
    stopped_at = time.monotonic()
    say(f"kill -9 {victim.name} after {before} pieces of the answer")
    survivors = [n for n in demo.nodes if n is not victim]
    while not demo.answer.done.is_set():
        draw()
        time.sleep(0.25)
    if demo.answer.error:
        raise DemoError(f"the answer broke off: {demo.answer.error}")
    after = [t for t in demo.answer.arrivals if t > stopped_at]
    # the longest wait for a piece after the kill (pieces in flight may arrive first)
    pause = max((b - a for a, b in zip([stopped_at, *after], after)), default=float("nan"))
    view = demo.serving(survivors)
    say(f"the cluster re-formed without {victim.name}: plan epoch {_epoch(view)}: {_stages(view)}")
    say(f"the answer went on: {before} pieces before the kill, {len(after)} after; "
        f"it paused {pause:.2f} s")
    resumed = [e for e in survivors[0].status().events if e.kind == "resumed"]
    if not resumed:
        raise DemoError("the answer was not resumed on the new plan")
    say(f"event: resumed {resumed[-1].detail}")
    if demo.answer.text != demo.taught:
        raise DemoError(f"the answer is not the taught one: {demo.answer.text!r}")
    say("the answer is the taught one, word for word")
    draw()


def _frame(demo: Demo, log: list[str], width: int) -> Group:
    from tbmesh.cli import status_view

    alive = [n for n in demo.nodes if n is not demo.stopped and n.api]
    try:
        screen = status_view.render(alive[0].status(), width) if alive else Text("starting…")
    except ConnectionError as error:
        screen = Text(str(error), style="red")
    tail = demo.answer.text[-6 * max(width - 4, 20):]
    return Group(screen, Panel(Text(tail or "…"), title=f"answer ({demo.answer.tokens} pieces)"),
                 Text("\n".join(log[-6:]), style="bold"))


def _epoch(view: Status) -> int | None:
    return view.plan.epoch if view.plan else None


def _stages(view: Status) -> str:
    return ", ".join(f"{_name(view, s.node)} layers {s.start}-{s.end - 1}" for s in view.plan.stages) if view.plan else ""


def _name(view: Status, node_id: str | None) -> str:
    return next((n.name for n in view.nodes if n.id == node_id), str(node_id))
