"""Real tbmesh daemons: join latency, failure detection, false positives under load, idle cost.

Sub-benchmarks (each prints a table and writes bench/results/daemon-<name>.json):

  join             network-namespace lab: Macs a-b-c chained by cables, Mac d running alone.
                   Plug a cable c-d; time from the cable's creation until every daemon lists d
                   alive (status polled every 20 ms). Repeated (unplug, wait until d is dead
                   everywhere, plug again). Baseline in the same rep: the time until a plain
                   TCP connect from c to d's control port succeeds (the physical floor).
  failure          the chain a-b-c-d: time from `kill -9` of d, and from pulling the cable c-d
                   (veth deleted), until a, b and c all list d dead (polled every 10 ms).
                   Baseline in the same run: tbmesh.testbed.sim's prediction for the same timing,
                   topology and kind of failure (real / simulated).
  false-positives  3 daemons on loopback: an unloaded phase, then a phase with both cores
                   saturated by 2 processes doing float32 matmuls with MLX. Counts suspect/dead
                   events (status event logs and daemon logs; target 0) and compares the
                   heartbeat RTT (links' rtt_s) and the /status latency, loaded / unloaded.
  idle             one daemon with one peer on loopback: CPU % (cpu_times delta / wall) and
                   RSS; baseline: a bare `python -c "import mlx.core, tbmesh.node.daemon; sleep"`
                   measured over the same window.

Medians everywhere. Needs root and iproute2 for join and failure (network namespaces).
Daemons run with --no-probe (no bandwidth probe: it is not what is measured here). Times
come from polling /status (as a user would see them) and, as a cross-check free of polling
delay, from the daemons' own event stamps (loop.time() is CLOCK_MONOTONIC, the clock this
script reads; under uvloop it counts whole milliseconds, which also makes the heartbeat RTT
that links publish a coarse figure on loopback).

    python bench/daemon.py join [--reps 5]
    python bench/daemon.py failure [--reps 5]
    python bench/daemon.py false-positives [--seconds 300] [--baseline-seconds 60]
    python bench/daemon.py idle [--seconds 60]
    python bench/daemon.py all
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from daemons import DaemonProcess, start_all, tiny_model_dir, wait_for  # noqa: E402
from netns import Cable, Lab, Mac  # noqa: E402

from tbmesh.core.cluster import CoreConfig  # noqa: E402
from tbmesh.core.membership import Timing  # noqa: E402
from tbmesh.testbed.sim import Simulator  # noqa: E402
from tbmesh.weights.modeldir import describe_model_dir  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ tbmesh: (.*)$")
Status = dict[str, Any]

# ----- helpers: statuses, polling, processes --------------------------------------------


class StatusClient:
    """GET /status of one daemon over a kept-alive connection (made inside its Mac, if any).

    Polling every 10-20 ms must cost the daemons little: one connection, not one per poll,
    and no thread per socket (entering a namespace takes one)."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.conn: http.client.HTTPConnection | None = None
        self.last_latency = 0.0

    def get(self) -> Status | None:
        """The daemon's status, or None when it does not answer (down, restarting)."""
        try:
            conn = self.conn or self._connect()
            started = time.monotonic()
            conn.request("GET", "/status")
            body = conn.getresponse().read()
            self.last_latency = time.monotonic() - started
            return json.loads(body)
        except (OSError, ValueError, http.client.HTTPException, AssertionError, AttributeError):
            self.close()
            return None

    def _connect(self) -> http.client.HTTPConnection:
        host, port = self.daemon.api_url().split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=2)
        if self.daemon.mac is not None:
            sock = self.daemon.mac.socket()
            sock.settimeout(2)
            sock.connect((host, int(port)))
            conn.sock = sock
        else:
            conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = conn
        return conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def state_in(status: Status | None, node_id: str) -> str | None:
    if status is None:
        return None
    return next((n["state"] for n in status["nodes"] if n["id"] == node_id), None)


def alive_set(status: Status) -> set[str]:
    return {n["id"] for n in status["nodes"] if n["state"] == "alive"}


def views_agree(statuses: Sequence[Status | None]) -> bool:
    """Every daemon sees all of them alive, one leader, one plan made for all of them
    (the same test as tests/daemons.py's `agreed`, on statuses already fetched)."""
    if any(s is None for s in statuses):
        return False
    ids = {s["node"]["id"] for s in statuses}
    if any(alive_set(s) != ids for s in statuses):
        return False
    leaders = {s["leader"] for s in statuses}
    plans = {json.dumps(s["plan"], sort_keys=True) for s in statuses}
    plan = statuses[0]["plan"]
    if len(leaders) != 1 or None in leaders or len(plans) != 1 or plan is None:
        return False
    return {st["node"] for st in plan["stages"]} | set(plan["left_out"]) == ids


def poll_marks(clients: Sequence[StatusClient], marks: dict[str, Callable[[list], bool]],
               interval: float, timeout: float) -> dict[str, float | None]:
    """Poll every daemon each `interval` s until every mark's condition has held once.

    Returns, per mark, the monotonic time at which the poll round that first satisfied it
    finished (None if it never did within `timeout`)."""
    found: dict[str, float | None] = dict.fromkeys(marks)
    deadline = time.monotonic() + timeout
    next_round = time.monotonic()
    while time.monotonic() < deadline and None in found.values():
        statuses = [c.get() for c in clients]
        now = time.monotonic()
        for name, condition in marks.items():
            if found[name] is None and condition(statuses):
                found[name] = now
        next_round += interval
        time.sleep(max(0.0, next_round - time.monotonic()))
    return found


def first_event_at(statuses: Sequence[Status | None], kind: str, node: str, since: float) -> float | None:
    """When the last of the daemons recorded its first `kind` event about `node` after
    `since`, by the daemons' own clocks (loop.time() is CLOCK_MONOTONIC, shared by all
    processes; uvloop's counts whole milliseconds, so up to 1 ms early). None if one has none."""
    times = []
    for status in statuses:
        ats = [e["at"] for e in (status or {}).get("events", [])
               if e["kind"] == kind and e["node"] == node and e["at"] >= since - 0.01]
        if not ats:
            return None
        times.append(min(ats))
    return max(times)


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def fmt(value: float | None, unit: str = "s", digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"daemon-{name}.json"
    meta = {"benchmark": name, "when": datetime.now().isoformat(timespec="seconds"),
            "source": source_version(), "command": shlex.join([".venv/bin/python", "bench/daemon.py", *sys.argv[1:]]),
            "python": platform.python_version(),
            "cpus": os.cpu_count(), "timing": Timing().__dict__}
    path.write_text(json.dumps(rounded({**meta, **result}), indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def source_version() -> dict[str, Any]:
    """The commit measured, and the package files that differ from it (others may be
    editing the tree). TBMESH_COMMIT names the commit of an exported (non-git) copy."""
    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or os.environ.get("TBMESH_COMMIT", "")
    dirty = git("status", "--porcelain", "--", "tbmesh").splitlines()
    return {"commit": commit or None, "uncommitted": dirty}


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    """A scratch directory for state dirs and logs; kept when asked or when a run fails."""
    path = Path(tempfile.mkdtemp(prefix="tbmesh-bench-"))
    ok = False
    try:
        yield path
        ok = True
    finally:
        if keep or not ok:
            print(f"logs and state kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


class Daemons:
    """Makes daemons of one private cluster (--no-probe, a tiny model) and kills them all."""

    def __init__(self, work: Path, log_level: str = "debug") -> None:
        self.work = work
        self.cluster = f"bench{uuid.uuid4().hex[:8]}"
        self.model = tiny_model_dir(work / "model")
        self.log_level = log_level
        self.all: list[DaemonProcess] = []

    def make(self, name: str, interface: str, mac: Mac | None = None) -> DaemonProcess:
        args = ["--interface", interface, "--memory", "4GB", "--model", str(self.model),
                "--cluster", self.cluster, "--no-probe", "--log-level", self.log_level]
        daemon = DaemonProcess(name, self.work / name, args, mac=mac)
        self.all.append(daemon)
        return daemon

    def kill_all(self) -> None:
        for daemon in self.all:
            try:
                daemon.kill()
            except Exception as error:  # keep killing the others
                print(f"killing {daemon.name}: {error}", file=sys.stderr)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started in its own session (and its group), and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def kill9(daemon: DaemonProcess) -> float:
    """SIGKILL the daemon; returns the monotonic time just before the signal."""
    assert daemon.proc is not None
    at = time.monotonic()
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(5)
    return at


def cable_chain(lab: Lab, macs: Sequence[Mac]) -> list[Cable]:
    return [lab.cable(x, y) for x, y in zip(macs, macs[1:])]


# ----- join ------------------------------------------------------------------------------


def connect_floor(mac: Mac, addr: str, port: int, timeout: float = 5.0) -> float | None:
    """From inside Mac `mac`, a plain TCP connect to addr:port, retried every 2 ms until it
    succeeds; returns the monotonic time it did.

    Called once the cable is configured: a packet sent to the far end before its address
    exists leaves an unresolved ARP entry that holds every later packet until the next ARP
    retry (measured here: a probe started before the plug first connected after ~1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = mac.socket()
        sock.settimeout(0.05)
        try:
            sock.connect((addr, port))
            return time.monotonic()
        except OSError:
            time.sleep(0.002)
        finally:
            sock.close()
    return None


def join_once(lab: Lab, c: Mac, d: Mac, daemons: list[DaemonProcess],
              clients: list[StatusClient], d_id: str, timeout: float) -> tuple[dict, Cable]:
    """Plug c-d and time: the TCP floor, d alive everywhere, all alive everywhere, one plan."""
    port = daemons[3].control_port
    wall0, t0 = time.time(), time.monotonic()
    cable = lab.cable(c, d)
    cabled = time.monotonic()
    floor = connect_floor(c, cable.addr(d), port)
    ids = [x.node_id for x in daemons]
    marks = poll_marks(clients, {
        "d_alive": lambda ss: all(state_in(s, d_id) == "alive" for s in ss),
        "all_alive": lambda ss: all(s is not None and alive_set(s) == set(ids) for s in ss),
        "plan": views_agree,
    }, interval=0.02, timeout=timeout)
    statuses = [cl.get() for cl in clients[:3]]
    joined_event = first_event_at(statuses, "joined", d_id, t0)
    noticed = [log_time_of(x, "interfaces changed: tb", wall0) for x in (daemons[2], daemons[3])]
    rep = {"cable_setup_s": cabled - t0,
           "noticed_s": None if None in noticed else max(noticed) - wall0,
           "floor_s": None if floor is None else floor - t0,
           "joined_event_s": None if joined_event is None else joined_event - t0}
    rep.update({f"{k}_s": None if v is None else v - t0 for k, v in marks.items()})
    if marks["plan"] is None:  # say what the daemons disagreed on
        rep["views_at_timeout"] = [view_summary(cl.get()) for cl in clients]
    return rep, cable


def view_summary(status: Status | None) -> dict | None:
    """Who a daemon follows, in which term, and the plan it runs."""
    if status is None:
        return None
    names = {n["id"]: n["name"] for n in status["nodes"]}
    plan = status["plan"]
    return {"node": status["node"]["name"], "leader": names.get(status["leader"]),
            "term": status["term"], "alive": sorted(names[i] for i in alive_set(status)),
            "plan": None if plan is None else {
                "term": plan["term"], "epoch": plan["epoch"],
                "stages": [f"{names.get(st['node'])} {st['start']}-{st['end']}" for st in plan["stages"]]}}


def log_time_of(daemon: DaemonProcess, text: str, since_wall: float) -> float | None:
    """Wall time of the first log line containing `text` at or after `since_wall`
    (log stamps have millisecond resolution)."""
    for line in daemon.log().splitlines():
        m = LOG_TIME.match(line)
        if m and text in m.group(2):
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since_wall - 0.001:
                return at
    return None


def unplug_once(cable: Cable, clients: list[StatusClient], d_id: str, c_id: str) -> dict:
    """Pull the cable; time until a, b, c list d dead and d lists c dead."""
    t0 = time.monotonic()
    cable.unplug()
    marks = poll_marks(clients, {
        "d_dead": lambda ss: all(state_in(s, d_id) == "dead" for s in ss[:3]),
        "d_alone": lambda ss: state_in(ss[3], c_id) == "dead",
    }, interval=0.02, timeout=15)
    return {f"{k}_s": None if v is None else v - t0 for k, v in marks.items()}


def bench_join(args: argparse.Namespace) -> dict:
    with workdir(args.keep) as work, Lab() as lab:
        made = Daemons(work)
        try:
            a, b, c, d = (lab.add_mac(n) for n in "abcd")
            cable_chain(lab, [a, b, c])
            daemons = start_all([made.make(m.name, "tb*", m) for m in (a, b, c, d)])
            clients = [StatusClient(x) for x in daemons]
            wait_for(lambda: views_agree([cl.get() for cl in clients[:3]]), 60, "a-b-c")
            d_id, c_id = daemons[3].node_id, daemons[2].node_id
            time.sleep(args.pause)
            reps, unplugs = [], []
            for i in range(args.reps):
                rep, cable = join_once(lab, c, d, daemons, clients, d_id, timeout=20)
                reps.append(rep)
                print_join_rep(i, rep)
                for view in rep.get("views_at_timeout", []):
                    print(f"    no single plan after 20 s: {view}")
                unplugs.append(unplug_once(cable, clients, d_id, c_id))
                time.sleep(args.pause)
            return report_join(reps, unplugs, args)
        finally:
            made.kill_all()


def print_join_rep(i: int, rep: dict) -> None:
    print(f"  rep {i + 1}: floor {fmt(rep['floor_s'])}  d alive everywhere {fmt(rep['d_alive_s'])}"
          f"  (daemons' own 'joined' events {fmt(rep['joined_event_s'])})  all alive "
          f"{fmt(rep['all_alive_s'])}  one plan {fmt(rep['plan_s'])}")


def report_join(reps: list[dict], unplugs: list[dict], args: argparse.Namespace) -> dict:
    keys = ["cable_setup_s", "floor_s", "noticed_s", "d_alive_s", "joined_event_s", "all_alive_s", "plan_s"]
    med = {k: median([r[k] for r in reps]) for k in keys}
    floor = med["floor_s"]
    print(f"\njoin: 3 Macs chained + Mac d plugged to c; medians of {len(reps)} plugs "
          f"(status polled every 20 ms)")
    print(f"{'mark':34s} {'median':>9s} {'/ floor':>8s}")
    labels = {"cable_setup_s": "cable created (ip commands)", "floor_s": "TCP connect c->d (floor)",
              "noticed_s": "c and d log the new interface",
              "d_alive_s": "d alive in every daemon", "joined_event_s": "  same, daemons' event clocks",
              "all_alive_s": "everyone alive in every daemon", "plan_s": "one plan with d everywhere"}
    for k in keys:
        print(f"{labels[k]:34s} {fmt(med[k]):>9s} {fmt(ratio(med[k], floor), 'x', 1):>8s}")
    dead = median([u["d_dead_s"] for u in unplugs])
    print(f"(unplugging between reps: d dead in a, b, c after {fmt(dead)} median)")
    print(f"target: d alive everywhere < 2 s -> {'met' if (med['d_alive_s'] or 99) < 2 else 'MISSED'}")
    result = {"reps": reps, "unplugs": unplugs, "medians": med,
              "join_over_floor": ratio(med["d_alive_s"], floor),
              "unplug_dead_median_s": dead, "target_s": 2.0,
              "setup": "netns lab; a-b-c chained by veth cables, d alone; daemons --interface 'tb*' "
                       "--no-probe; t0 = just before the veth pair is created; floor = plain TCP "
                       "connect from c to d's control port"}
    write_result("join", result)
    return result


# ----- failure ---------------------------------------------------------------------------


def crash_reps(daemons: list[DaemonProcess], clients: list[StatusClient],
               reps: int) -> list[dict]:
    """kill -9 d, time until a, b, c list it dead; restart d and wait for it to rejoin."""
    d_id, out = daemons[3].node_id, []
    for i in range(reps):
        t0 = kill9(daemons[3])
        rep = time_dead(clients[:3], d_id, t0)
        out.append(rep)
        print(f"  kill -9 rep {i + 1}: dead everywhere {fmt(rep['dead_s'])} (suspect "
              f"{fmt(rep['suspect_s'])}; daemons' dead events {fmt(rep['dead_event_s'])})")
        daemons[3].start()
        rep["rejoin"] = wait_rejoined(clients, time.monotonic())
        time.sleep(1.0)
    return out


def pull_reps(lab: Lab, daemons: list[DaemonProcess], clients: list[StatusClient],
              cable: Cable, reps: int) -> list[dict]:
    """Pull the cable c-d, time until a, b, c list d dead; plug a new one, wait for d."""
    c, d = cable.a, cable.b
    d_id, out = daemons[3].node_id, []
    for i in range(reps):
        t0 = time.monotonic()
        cable.unplug()
        rep = time_dead(clients[:3], d_id, t0)
        out.append(rep)
        print(f"  cable pull rep {i + 1}: dead everywhere {fmt(rep['dead_s'])} (suspect "
              f"{fmt(rep['suspect_s'])}; daemons' dead events {fmt(rep['dead_event_s'])})")
        plugged = time.monotonic()
        cable = lab.cable(c, d)
        rep["rejoin"] = wait_rejoined(clients, plugged)
        time.sleep(1.0)
    return out


def wait_rejoined(clients: list[StatusClient], t0: float, plan_timeout: float = 10.0) -> dict:
    """Wait until every daemon sees all of them alive (needed for the next rep), then up
    to `plan_timeout` s more for one plan; when that never comes, keep what each ran."""
    wait_for(lambda: all(s is not None and len(alive_set(s)) == len(clients)
                         for s in [cl.get() for cl in clients]), 60, "d alive everywhere again")
    alive = time.monotonic() - t0
    marks = poll_marks(clients, {"plan": views_agree}, interval=0.05, timeout=plan_timeout)
    out: dict[str, Any] = {"alive_s": alive, "plan_s": None if marks["plan"] is None else marks["plan"] - t0}
    if marks["plan"] is None:
        out["views"] = [view_summary(cl.get()) for cl in clients]
        print(f"    no single plan {plan_timeout:.0f} s after d came back:")
        for view in out["views"]:
            print(f"      {view}")
    return out


def time_dead(clients: list[StatusClient], node: str, t0: float) -> dict:
    marks = poll_marks(clients, {
        "suspect": lambda ss: all(state_in(s, node) in ("suspect", "dead") for s in ss),
        "dead": lambda ss: all(state_in(s, node) == "dead" for s in ss),
    }, interval=0.01, timeout=15)
    event = first_event_at([cl.get() for cl in clients], "dead", node, t0)
    rep = {f"{k}_s": None if v is None else v - t0 for k, v in marks.items()}
    rep["dead_event_s"] = None if event is None else event - t0
    return rep


def simulate(kind: str, seeds: int, model_dir: Path) -> list[float]:
    """tbmesh.testbed.sim on the same chain a-b-c-d and timing: d crashes (kill -9: its connection
    resets) or the cable c-d is pulled (silence); virtual seconds until a, b, c list d dead."""
    config = CoreConfig(Timing(), describe_model_dir(model_dir), 4096)
    out = []
    for seed in range(seeds):
        sim = Simulator(seed=seed, config=config, keep_events=False)
        for name in "abcd":
            sim.add_node(name)
        for x, y in ("ab", "bc", "cd"):
            sim.cable(x, y)
        assert sim.run_until_true(lambda: sim.converged() and sim.plans_agree(), 60, 0.05) is not None
        sim.run_for(1.0 + (seed % 10) * 0.017)  # vary the failure's phase against the heartbeats
        t0 = sim.now
        if kind == "kill":
            sim.crash("d", reset=True)
        else:
            sim.unplug("c", "d")
        survivors = [sim.nodes[n] for n in "abc"]
        at = sim.run_until_true(lambda: all("d" not in n.members() for n in survivors), 30, 0.001)
        assert at is not None, "the simulator never declared d dead"
        out.append(at - t0)
    return out


def bench_failure(args: argparse.Namespace) -> dict:
    with workdir(args.keep) as work, Lab() as lab:
        made = Daemons(work)
        try:
            macs = [lab.add_mac(n) for n in "abcd"]
            cables = cable_chain(lab, macs)
            daemons = start_all([made.make(m.name, "tb*", m) for m in macs])
            clients = [StatusClient(x) for x in daemons]
            wait_for(lambda: views_agree([cl.get() for cl in clients]), 60, "a-b-c-d")
            time.sleep(1.0)
            kills = crash_reps(daemons, clients, args.reps)
            pulls = pull_reps(lab, daemons, clients, cables[2], args.reps)
            sims = {k: simulate(k, args.seeds, made.model) for k in ("kill", "pull")}
            return report_failure(kills, pulls, sims)
        finally:
            made.kill_all()


def report_failure(kills: list[dict], pulls: list[dict], sims: dict[str, list[float]]) -> dict:
    rows = {}
    print(f"\nfailure: chain a-b-c-d, d fails; medians of {len(kills)} reps (polled every 10 ms)")
    print(f"{'failure':12s} {'suspect':>8s} {'dead':>8s} {'dead(ev)':>9s} {'simulated':>10s} "
          f"{'real/sim':>9s} {'target':>7s}")
    for kind, reps in (("kill", kills), ("pull", pulls)):
        row = {k: median([r[k] for r in reps]) for k in ("suspect_s", "dead_s", "dead_event_s")}
        row["simulated_s"] = median(sims[kind])
        row["real_over_simulated"] = ratio(row["dead_s"], row["simulated_s"])
        row["event_over_simulated"] = ratio(row["dead_event_s"], row["simulated_s"])
        row["rejoins_without_one_plan"] = sum(1 for r in reps if r["rejoin"]["plan_s"] is None)
        row["reps"], row["simulated_runs_s"] = reps, sims[kind]
        rows[kind] = row
        label = "kill -9" if kind == "kill" else "cable pull"
        met = "met" if (row["dead_s"] or 99) < 1.5 else "MISSED"
        print(f"{label:12s} {fmt(row['suspect_s']):>8s} {fmt(row['dead_s']):>8s} "
              f"{fmt(row['dead_event_s']):>9s} {fmt(row['simulated_s']):>10s} "
              f"{fmt(row['real_over_simulated'], 'x', 2):>9s} {met:>7s}")
    print("dead(ev): the daemons' own 'dead' event times (no polling delay); target < 1.5 s")
    stuck = {k: r["rejoins_without_one_plan"] for k, r in rows.items()}
    print(f"rejoins after which the daemons never agreed on one plan (10 s): {stuck}")
    result = {"rows": rows, "target_s": 1.5,
              "setup": "netns lab; chain a-b-c-d over veth cables; daemons --interface 'tb*' "
                       "--no-probe; times until all of a, b, c list d dead; simulated: tbmesh.testbed.sim, "
                       "same chain and Timing, crash(reset=True) or unplug, one run per seed "
                       "(the simulator ticks every heartbeat/2 = 0.1 s, the daemon every 0.05 s)"}
    write_result("failure", result)
    return result


# ----- false positives under load ------------------------------------------------------

LOAD_CODE = """
import mlx.core as mx
a = mx.random.normal((512, 512), dtype=mx.float32)
while True:
    mx.eval(a @ a)
"""

LOG_FALSE_POSITIVE = re.compile(r"^(suspect|dead) |^connection to .* closed")


def start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", LOAD_CODE], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)]


class PhaseSampler:
    """Every second: each daemon's status (events kept, duplicates dropped), every link's
    rtt_s, the /status latency, and the CPU use of the load processes and the machine."""

    def __init__(self, clients: list[StatusClient]) -> None:
        self.clients = clients
        self.events: dict[tuple, dict] = {}

    def run(self, seconds: float, load: list[subprocess.Popen]) -> dict:
        procs = [psutil.Process(p.pid) for p in load]
        load_cpu0 = sum(cpu_seconds(p) for p in procs)
        psutil.cpu_percent()  # starts the machine-wide counter
        rtts, latencies, started = [], [], time.monotonic()
        first_events = len(self.events)
        while time.monotonic() - started < seconds:
            time.sleep(1.0)
            for i, client in enumerate(self.clients):
                status = client.get()
                if status is None:
                    continue
                latencies.append(client.last_latency)
                self.keep_events(i, status)
                rtts += [link["rtt_s"] for link in status["links"] if link["rtt_s"] > 0]
        wall = time.monotonic() - started
        return {"seconds": wall, "rtt_samples_s": rtts, "status_latency_s": latencies,
                "machine_cpu_percent": psutil.cpu_percent(),
                "load_cpu_percent": 100 * (sum(cpu_seconds(p) for p in procs) - load_cpu0) / wall,
                "new_events": list(self.events.values())[first_events:]}

    def keep_events(self, daemon: int, status: Status) -> None:
        for event in status["events"]:
            key = (daemon, event["at"], event["kind"], event["node"])
            self.events.setdefault(key, {"daemon": status["node"]["name"], **event})


def cpu_seconds(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
        return times.user + times.system + times.children_user + times.children_system
    except psutil.NoSuchProcess:
        return 0.0


def log_false_positives(daemons: list[DaemonProcess], since: float, until: float) -> list[str]:
    """Daemon log lines (wall-clock stamped) between two wall times that say a peer was
    suspected, declared dead, or its connection closed."""
    found = []
    for daemon in daemons:
        for line in daemon.log().splitlines():
            m = LOG_TIME.match(line)
            if not m:
                continue
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if since <= at <= until and LOG_FALSE_POSITIVE.search(m.group(2)):
                found.append(f"{daemon.name}: {line}")
    return found


def summarize_phase(name: str, sample: dict, log_lines: list[str]) -> dict:
    bad = [e for e in sample["new_events"] if e["kind"] in ("suspect", "dead")]
    return {"phase": name, "seconds": sample["seconds"], "false_positive_events": len(bad),
            "false_positive_log_lines": len(log_lines), "events": bad, "log_lines": log_lines,
            "rtt_median_s": median(sample["rtt_samples_s"]),
            "rtt_max_s": max(sample["rtt_samples_s"], default=None),
            "status_latency_median_s": median(sample["status_latency_s"]),
            "machine_cpu_percent": sample["machine_cpu_percent"],
            "load_cpu_percent": sample["load_cpu_percent"],
            "rtt_samples": len(sample["rtt_samples_s"])}


def run_phase(name: str, sampler: PhaseSampler, daemons: list[DaemonProcess],
              seconds: float, load_processes: int) -> dict:
    print(f"  {name}: {seconds:.0f} s{' with ' + str(load_processes) + ' MLX load processes' if load_processes else ''}")
    wall0 = time.time()
    load = start_load(load_processes)
    try:
        sample = sampler.run(seconds, load)
    finally:
        for proc in load:
            stop_process(proc)
    time.sleep(1.5)  # a suspicion raised at the very end still reaches the logs
    return summarize_phase(name, sample, log_false_positives(daemons, wall0, time.time()))


def bench_false_positives(args: argparse.Namespace) -> dict:
    with workdir(args.keep) as work:
        made = Daemons(work)
        try:
            daemons = start_all([made.make(n, "lo") for n in "abc"])
            clients = [StatusClient(x) for x in daemons]
            wait_for(lambda: views_agree([cl.get() for cl in clients]), 60, "a, b, c on loopback")
            time.sleep(3.0)
            sampler = PhaseSampler(clients)
            for i, client in enumerate(clients):  # what happened while forming is not counted
                sampler.keep_events(i, client.get() or {"events": [], "node": {"name": "?"}})
            unloaded = run_phase("unloaded", sampler, daemons, args.baseline_seconds, 0)
            loaded = run_phase("loaded", sampler, daemons, args.seconds, args.load_processes)
            still = views_agree([cl.get() for cl in clients])
            return report_false_positives(unloaded, loaded, still, args)
        finally:
            made.kill_all()


def report_false_positives(unloaded: dict, loaded: dict, still: bool, args: argparse.Namespace) -> dict:
    print(f"\nfalse positives: 3 daemons on loopback; loaded = {args.load_processes} processes "
          f"of float32 512x512 matmuls (MLX, CPU)")
    print(f"{'phase':9s} {'seconds':>7s} {'machine cpu':>11s} {'suspect/dead ev':>15s} "
          f"{'log lines':>9s} {'rtt median':>11s} {'rtt max':>9s} {'/status':>9s}")
    for p in (unloaded, loaded):
        print(f"{p['phase']:9s} {p['seconds']:7.0f} {p['machine_cpu_percent']:10.0f}% "
              f"{p['false_positive_events']:15d} {p['false_positive_log_lines']:9d} "
              f"{fmt(p['rtt_median_s'] and p['rtt_median_s'] * 1e3, ' ms', 2):>11s} "
              f"{fmt(p['rtt_max_s'] and p['rtt_max_s'] * 1e3, ' ms', 1):>9s} "
              f"{fmt(p['status_latency_median_s'] and p['status_latency_median_s'] * 1e3, ' ms', 1):>9s}")
    rtt_ratio = ratio(loaded["rtt_median_s"], unloaded["rtt_median_s"])
    api_ratio = ratio(loaded["status_latency_median_s"], unloaded["status_latency_median_s"])
    print(f"loaded / unloaded: heartbeat rtt {fmt(rtt_ratio, 'x', 2)}, /status latency "
          f"{fmt(api_ratio, 'x', 2)}; one cluster at the end: {still}")
    for line in loaded["log_lines"] + unloaded["log_lines"]:
        print(f"  {line}")
    result = {"unloaded": unloaded, "loaded": loaded, "rtt_loaded_over_unloaded": rtt_ratio,
              "status_latency_loaded_over_unloaded": api_ratio, "one_cluster_at_end": still,
              "target_false_positives": 0,
              "setup": "3 daemons --interface lo --no-probe; status sampled every second; rtt_s "
                       "is what the links publish (republished only when it moves by more than "
                       "50%) and is computed from uvloop's loop.time(), which counts whole "
                       "milliseconds, so it is coarse; load: python processes each looping "
                       "mx.eval(a @ a) on a float32 512x512 array"}
    write_result("false-positives", result)
    return result


# ----- idle cost -------------------------------------------------------------------------

BARE_CODE = "import time, mlx.core, tbmesh.node.daemon; time.sleep({seconds})"


def usage(pid: int) -> tuple[float, int]:
    """(CPU seconds so far, RSS bytes) of a process."""
    proc = psutil.Process(pid)
    times = proc.cpu_times()
    return times.user + times.system, proc.memory_info().rss


def measure_idle(pids: dict[str, int], seconds: float) -> dict[str, dict]:
    """CPU % over the window and RSS (max of samples every 5 s) of each process."""
    start = {name: usage(pid)[0] for name, pid in pids.items()}
    rss = {name: usage(pid)[1] for name, pid in pids.items()}
    t0 = time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 0:
        time.sleep(min(5.0, left))
        for name, pid in pids.items():
            rss[name] = max(rss[name], usage(pid)[1])
    wall = time.monotonic() - t0
    out = {}
    for name, pid in pids.items():
        cpu = usage(pid)[0] - start[name]
        out[name] = {"cpu_s": cpu, "cpu_percent": 100 * cpu / wall, "rss_mb": rss[name] / 2**20}
    return out


def bench_idle(args: argparse.Namespace) -> dict:
    with workdir(args.keep) as work:
        made = Daemons(work, log_level="info")  # as a launchd service runs it
        bare = subprocess.Popen([sys.executable, "-c", BARE_CODE.format(seconds=args.seconds + 600)],
                                start_new_session=True, cwd=ROOT)
        try:
            daemons = start_all([made.make(n, "lo") for n in ("a", "b")])
            clients = [StatusClient(x) for x in daemons]
            wait_for(lambda: views_agree([cl.get() for cl in clients]), 60, "a and b")
            for client in clients:
                client.close()  # nothing touches the daemons during the window
            time.sleep(args.settle)
            pids = {"daemon a": daemons[0].proc.pid, "daemon b (its peer)": daemons[1].proc.pid,
                    "bare python": bare.pid}
            measured = measure_idle(pids, args.seconds)
            statuses = [cl.get() for cl in clients]
            return report_idle(measured, statuses, args)
        finally:
            stop_process(bare)
            made.kill_all()


def report_idle(measured: dict[str, dict], statuses: list[Status | None], args: argparse.Namespace) -> dict:
    base = measured["bare python"]
    print(f"\nidle: one daemon with one peer on loopback, {args.seconds:.0f} s "
          f"(baseline: bare `import mlx.core, tbmesh.node.daemon; sleep`)")
    print(f"{'process':22s} {'cpu':>8s} {'cpu s':>7s} {'rss':>9s} {'rss / bare':>10s} {'cpu - bare':>10s}")
    for name, m in measured.items():
        print(f"{name:22s} {m['cpu_percent']:7.2f}% {m['cpu_s']:7.2f} {m['rss_mb']:6.1f} MB "
              f"{m['rss_mb'] / base['rss_mb']:9.2f}x {m['cpu_percent'] - base['cpu_percent']:9.2f}%")
    daemon = measured["daemon a"]
    cpu_ratio = ratio(daemon["cpu_s"], base["cpu_s"])
    print(f"cpu / bare: {fmt(cpu_ratio, 'x', 1) if base['cpu_s'] >= 0.01 else 'n/a (the bare process used no CPU)'}"
          f"; target < 1% -> {'met' if daemon['cpu_percent'] < 1 else 'MISSED'}")
    bad = [e for s in statuses if s for e in s["events"] if e["kind"] in ("suspect", "dead")]
    print(f"suspect/dead events during the run: {len(bad)}")
    result = {"processes": measured, "rss_over_bare": daemon["rss_mb"] / base["rss_mb"],
              "cpu_over_bare": cpu_ratio,
              "cpu_percent_above_bare": daemon["cpu_percent"] - base["cpu_percent"],
              "suspect_dead_events": bad, "target_cpu_percent": 1.0,
              "setup": f"2 daemons --interface lo --no-probe --log-level info; window {args.seconds} s "
                       f"after {args.settle} s of settling; no API requests during the window"}
    write_result("idle", result)
    return result


# ----- main ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["join", "failure", "false-positives", "idle", "all"])
    parser.add_argument("--reps", type=int, default=5, help="join, failure: repetitions")
    parser.add_argument("--pause", type=float, default=1.0, help="join: seconds between an unplug and the next plug")
    parser.add_argument("--seeds", type=int, default=11, help="failure: simulator runs")
    parser.add_argument("--seconds", type=float, default=None,
                        help="false-positives: loaded phase (default 300); idle: window (default 60)")
    parser.add_argument("--baseline-seconds", type=float, default=60, help="false-positives: unloaded phase")
    parser.add_argument("--load-processes", type=int, default=2, help="false-positives: MLX load processes")
    parser.add_argument("--settle", type=float, default=5.0, help="idle: seconds before the window")
    parser.add_argument("--keep", action="store_true", help="keep the daemons' logs and state dirs")
    args = parser.parse_args()
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every finally block kills what it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs: list[tuple[str, Callable[[argparse.Namespace], dict], float]] = [
        ("join", bench_join, 0), ("failure", bench_failure, 0),
        ("idle", bench_idle, 60), ("false-positives", bench_false_positives, 300)]
    for name, run, default_seconds in runs:
        if args.which in (name, "all"):
            print(f"== {name}")
            run(argparse.Namespace(**{**vars(args), "seconds": args.seconds or default_seconds}))


if __name__ == "__main__":
    main()
