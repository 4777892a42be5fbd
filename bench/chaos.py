"""The chaos campaign: a nemesis breaks a real cluster while clients stream into every node,
and a checker reads the history afterwards (Jepsen's shape: generator, nemesis, checker).

The cluster: `--macs` daemons (default 4) in network namespaces (tests/netns.py), cabled all
to all with veth pairs, the first cable shaped to 1 Gbit/s; the 8-layer test model
(float32, tbmesh.testbed.tiny). Every Mac's usable memory is a file (TBMESH_MEMORY_FILE) that
the nemesis can shrink. Clients (`--clients`, spread over the nodes) stream /v1/completions
all the time: greedy or seeded (temperature 0.8, top-p 0.9), a prompt and a max_tokens drawn
from small sets so that the references are few.

  campaign  `--faults` faults drawn with `--seed`, one or two at once (partitions alone):
              kill      kill -9 of a node (leader and entries included); the survivors
                        re-plan; then it starts again as itself
              restart   kill -9 and at once started again as itself
              stop      SIGSTOP for 0.3-4 s, then SIGCONT
              cable     a cable pulled (veth deleted) for 0.3-4 s, then plugged again
              partition the Macs cut in two (every cable between the halves down), healed
              flap      a cable down and up 3-10 times, 0.1-0.4 s each way
              memory    a node's usable memory shrunk (to nothing, or a third of the model)
                        for 1-4 s, then given back
            With `--hostile` the daemons hold a cluster secret, a stranger's Mac (no secret,
            no node of its own) is cabled to every Mac, and the nemesis also draws:
              relay     the stranger advertises a made-up node id over mDNS for 2-8 s and
                        relays every connection it gets to one member (an opaque pipe,
                        flipping a bit of a chunk now and then)
              stranger  the stranger dials a member 5-20 times at once: garbage, a Hello
                        without the secret, a protocol-4 Hello, a TLS handshake keyed from
                        another secret, half a handshake that stalls for 1-6 s
              stray     an mDNS record for a made-up id naming a member's addresses and
                        control port (no TCP from the stranger), withdrawn after 2-8 s
            Each must change nothing: no dial of the stranger's is accepted, no member lists
            its id, and the cluster converges as after any fault (it should never diverge).
            After each fault is healed the nemesis waits until the cluster converges (one
            leader, one committed plan over every node, every stage serving it) and notes
            the time, and each survivor's RSS before the fault and after.
  flap      one cable of the route flaps `--per-minute` times a minute for `--minutes`
            (down and up, random share of each period down): plans committed meanwhile
            (a storm is many), the time from the last flap to convergence.
  soak      `--clients` streams (default 64) for `--minutes` with no fault: every answer
            exact, RSS sampled every 5 s (flat: the last minute's median against the second's).

The checker (every mode): each request's text against single-process mlx-lm's for the same
prompt, max_tokens and sampling.
  wrong     a text that differs from the reference (goal 0)
  lost      a request whose entry node lived through it (SIGSTOP is living) that did not
            end with its text: an error, a hang (goal 0). An error is allowed only as
            "unavailable" after the cluster could not serve for longer than --resume-wait.
            Requests into a node that was killed end for that reason: they are counted
            apart ("entry died"), and must not end with a wrong text either.
  stalls    the longest wait for the next piece of each request (from its start for the
            first); a stall beyond STALL_BOUND_S is a finding. The bound is detection
            (suspect_after + dead_after = 1.0 s) + re-plan + load + re-prefill on this
            machine, plus the length of any SIGSTOP the stall overlaps (a stopped entry
            sends nothing until it runs again).
  crashes   a daemon that exited when it was not killed, and error-level lines in the logs.
A run that finds anything prints the seed; `--seed` replays the same faults on the same
targets in the same order (timings differ: the machine decides them).

    .venv/bin/python bench/chaos.py campaign --faults 200 --seed 1
    .venv/bin/python bench/chaos.py flap --minutes 5 --per-minute 100
    .venv/bin/python bench/chaos.py soak --clients 64 --minutes 10
    .venv/bin/python bench/chaos.py campaign --quick          # the CI version (tests/test_chaos.py)
    .venv/bin/python bench/chaos.py campaign --faults 200 --seed 1 --hostile   # and strangers
    .venv/bin/python bench/chaos.py campaign --faults 200 --seed 1 --groups 50:54   # a stretch of it

Results: bench/results/chaos.json (one key per mode); the whole history stays in the work
directory (`--keep`, or when a run finds something). Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from daemon import RESULTS, rounded, source_version, workdir  # noqa: E402
from daemons import DaemonProcess, serving_view, wait_for  # noqa: E402
from netns import Cable, Lab  # noqa: E402
from serving import read_stream  # noqa: E402
from strangers import DIAL_KINDS, Stranger, hostile_dial  # noqa: E402

from tbmesh.core.membership import Timing  # noqa: E402
from tbmesh.testbed.tiny import make_tiny_model  # noqa: E402

PROMPTS = ["The quick brown fox", "Thunderbolt cables link the Macs", "Hello",
           "Four Mac Studios on a desk, cabled together, run one model that none of them could hold"]
MAX_TOKENS = (8, 40, 120, 200)
SEEDS = (1, 2, 3)  # seeded requests draw from these: few references to compute
MEMORY = "4GB"  # each Mac's usable memory when not shrunk: every Mac can hold the model alone
SHAPED_RATE = "1gbit"
DETECTION_S = Timing().suspect_after + Timing().dead_after
STALL_BOUND_S = 10.0  # detection + re-plan + load + re-prefill here (2 shared cores)
CONVERGE_TIMEOUT_S = 90.0
STABLE_S = 2.0  # a converged state must last this long to count (> detection + settle)
# A survivor's RSS after converging, over its RSS before the fault: its KV caches may have
# grown meanwhile (the whole context of 4096 tokens x 8 layers is 32 MB here), nothing more.
MEMORY_GROWTH_BOUND = 64 << 20
SOAK_GROWTH_BOUND_MB = 16  # flat: a daemon's RSS in the last minute over its RSS in the second
KINDS = ("kill", "restart", "stop", "cable", "partition", "flap", "memory")
HOSTILE_KINDS = ("relay", "stranger", "stray")  # with --hostile
RELAY_FLIP = 0.1  # the chance that a relayed chunk past the first flights has a bit flipped


# ----- the cluster -----------------------------------------------------------------------


class Cluster:
    """Namespaced Macs cabled all to all, a daemon on each; every change goes through here.
    `secret`: the daemons hold one. `hostile`: a stranger's Mac, cabled to every Mac."""

    def __init__(self, lab: Lab, work: Path, macs: int, resume_wait: float, log_level: str = "info",
                 secret: bool = False, hostile: bool = False) -> None:
        self.lab = lab
        self.work = work
        self.model = model_dir(work)
        self.model_bytes = sum(f.stat().st_size for f in self.model.glob("*.safetensors"))
        name = f"chaos{uuid.uuid4().hex[:6]}"
        self.name = name
        self.macs = [lab.add_mac(chr(ord("a") + i)) for i in range(macs)]
        self.cables = {frozenset((x.name, y.name)): lab.cable(x, y) for x, y in combinations(self.macs, 2)}
        first = next(iter(self.cables.values()))
        first.shape(SHAPED_RATE)
        # The stranger's cables are no member's business: no fault pulls them, no plan uses them
        # (the stranger does not forward, and the Macs' routes are per cable).
        self.stranger: Stranger | None = None
        self.stranger_cables: dict[str, Cable] = {}
        if hostile:
            z = lab.add_mac("z")
            self.stranger_cables = {mac.name: lab.cable(z, mac) for mac in self.macs}
            self.stranger_mac = z
            self.stranger = Stranger(z.addrs, ns=z.netns)
        extra: list[str] = []
        if secret:
            secret_file = work / "secret"
            secret_file.write_text(uuid.uuid4().hex)
            extra = ["--secret-file", str(secret_file)]
        self.daemons: dict[str, DaemonProcess] = {}
        self.memory_files: dict[str, Path] = {}
        self.stopped: set[str] = set()
        self.expected_exits: set[int] = set()  # pids we killed
        for mac in self.macs:
            memory_file = work / f"{mac.name}.memory"
            memory_file.write_text(MEMORY)
            self.memory_files[mac.name] = memory_file
            self.daemons[mac.name] = DaemonProcess(
                mac.name, work / mac.name, ["--interface", "tb*", "--model", str(self.model), "--cluster", name,
                                            "--resume-wait", str(resume_wait), "--log-level", log_level, *extra],
                mac=mac, env={"TBMESH_MEMORY_FILE": str(memory_file)})
        for daemon in self.daemons.values():
            daemon.launch()
        for daemon in self.daemons.values():
            daemon.wait_started()
        self.ids = {name: daemon.node_id for name, daemon in self.daemons.items()}  # kept across restarts

    @property
    def names(self) -> list[str]:
        return [mac.name for mac in self.macs]

    def all(self) -> list[DaemonProcess]:
        return list(self.daemons.values())

    def converged(self, names: list[str] | None = None) -> dict | None:
        """The view once these daemons serve one committed plan that uses every one of them
        (each Mac here can hold the model, so the plan the cluster settles on has them all)."""
        daemons = [self.daemons[n] for n in names or self.names]
        try:
            view = serving_view(daemons)
            if view is None or {s["node"] for s in view["plan"]["stages"]} != {self.ids[n] for n in names or self.names}:
                return None
            return view
        except Exception:  # a daemon starting, stopped, or half-formed
            return None

    def wait_converged(self, names: list[str] | None = None, timeout: float = CONVERGE_TIMEOUT_S) -> float | None:
        """Seconds from now until the cluster reached the state it then kept for STABLE_S
        (one leader, one plan epoch, served), or None when it did not within the timeout.
        Right after a short fault the old plan may still look converged to every node before
        they noticed anything: only a state that lasts counts."""
        start = time.monotonic()
        held: tuple | None = None
        since = start
        while time.monotonic() - start < timeout + STABLE_S:
            view = self.converged(names)
            now = time.monotonic()
            state = None if view is None else (view["leader"], view["plan"]["epoch"])
            if state != held:
                held, since = state, now
            elif held is not None and now - since >= STABLE_S:
                return since - start
            time.sleep(0.05)
        return None

    def rss(self) -> dict[str, int]:
        sizes = {}
        for name, daemon in self.daemons.items():
            try:
                sizes[name] = psutil.Process(daemon.proc.pid).memory_info().rss
            except (psutil.Error, AttributeError):
                pass
        return sizes

    def kill(self, name: str) -> None:
        daemon = self.daemons[name]
        self.expected_exits.add(daemon.proc.pid)
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        self.stopped.discard(name)

    def start(self, name: str) -> None:
        self.daemons[name].start()

    def stop(self, name: str) -> None:
        os.kill(self.daemons[name].proc.pid, signal.SIGSTOP)
        self.stopped.add(name)

    def cont(self, name: str) -> None:
        os.kill(self.daemons[name].proc.pid, signal.SIGCONT)
        self.stopped.discard(name)

    def cable(self, pair: frozenset[str]) -> Cable:
        return self.cables[pair]

    def set_memory(self, name: str, size: str) -> None:
        path = self.memory_files[name]
        path.with_suffix(".tmp").write_text(size)
        path.with_suffix(".tmp").replace(path)  # never read half-written

    def crashed(self) -> list[str]:
        return [n for n, d in self.daemons.items()
                if d.proc.poll() is not None and d.proc.pid not in self.expected_exits]

    def strangers_listed(self) -> list[str]:
        """Node ids a member lists that are not members (a stranger taken for a node)."""
        members = set(self.ids.values())
        listed = []
        for name, daemon in self.daemons.items():
            try:
                ids = {n["id"] for n in daemon.status()["nodes"]}
            except Exception:  # down or restarting: it lists nothing
                continue
            listed += [f"{name} lists {node}" for node in sorted(ids - members)]
        return listed

    def error_lines(self) -> list[str]:
        lines = []
        for daemon in self.daemons.values():
            lines += [f"{daemon.name}: {line}" for line in daemon.log().splitlines()
                      if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")]
        return lines


def model_dir(work: Path) -> Path:
    cached = Path("/tmp/tbmesh-bench/chaos-model/tiny")
    if not (cached / "config.json").exists():
        make_tiny_model(cached, layers=8, hidden=128, vocab=512)
    return cached


# ----- the clients -----------------------------------------------------------------------


@dataclass
class Record:
    """One request, as its client saw it. Times are time.monotonic()."""

    client: int
    node: str
    prompt: str
    max_tokens: int
    sampling: dict[str, Any]
    start: float
    end: float | None = None
    text: str = ""
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None
    admitted: bool = True  # False: the entry's API could not be reached (it was down)


class Client(threading.Thread):
    """Streams one request after another into its node until told to stop."""

    def __init__(self, index: int, cluster: Cluster, node: str, seed: int, history: list[Record],
                 lock: threading.Lock, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"client{index}")
        self.index, self.cluster, self.node = index, cluster, node
        self.rng = random.Random(f"{seed}:client{index}")
        self.history, self.lock, self.stopping = history, lock, stop

    def run(self) -> None:
        while not self.stopping.is_set():
            greedy = self.rng.random() < 0.6
            sampling = {"temperature": 0} if greedy else {"temperature": 0.8, "top_p": 0.9,
                                                          "seed": self.rng.choice(SEEDS)}
            record = Record(self.index, self.node, self.rng.choice(PROMPTS), self.rng.choice(MAX_TOKENS),
                            sampling, time.monotonic())
            with self.lock:
                self.history.append(record)
            self.request(record)
            if not record.admitted:
                time.sleep(0.3)  # the entry is down: try again soon

    def request(self, record: Record) -> None:
        body = {"model": "tiny", "prompt": record.prompt, "max_tokens": record.max_tokens, "stream": True,
                **record.sampling}
        pieces: list[str] = []

        def on_piece(text: str) -> None:
            pieces.append(text)
            record.arrivals.append(time.monotonic())

        daemon = self.cluster.daemons[self.node]
        try:
            if daemon.api_url() is None:
                raise ConnectionRefusedError("no API yet")
        except (AssertionError, ConnectionError) as error:  # exited, or starting
            record.admitted, record.error, record.end = False, repr(error), time.monotonic()
            return
        try:
            _, error = read_stream(daemon, body, 600, on_piece)
            record.error = None if error is None else error.get("message", str(error))
        except ConnectionRefusedError as error:
            record.admitted, record.error = False, repr(error)
        except Exception as error:  # noqa: BLE001  (the checker reads it)
            record.error = repr(error)
        record.text = "".join(pieces)
        record.end = time.monotonic()


class Clients:
    def __init__(self, cluster: Cluster, count: int, seed: int) -> None:
        self.history: list[Record] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [Client(i, cluster, cluster.names[i % len(cluster.names)], seed, self.history,
                               self.lock, self.stopping) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 240) -> None:
        """No new requests; wait for those in flight (a hang is found by the checker)."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))


# ----- the nemesis -----------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    targets: list[str]  # node names, or cables as "a-b"
    params: dict[str, Any]
    start: float = 0.0
    healed: float = 0.0
    stopped_s: float = 0.0  # how long a node was SIGSTOPped, or a link flapped (flap mode): stalls may add it
    killed: list[str] = field(default_factory=list)
    down: list[tuple[str, float, float]] = field(default_factory=list)  # (node, from, to): API gone
    converged_without_s: float | None = None  # kill: the survivors' plan
    converge_s: float | None = None  # after healing: one plan over every node
    converged_at: float = 0.0
    rss_growth: int = 0  # the largest growth of a survivor's RSS across the fault
    breaches: list[str] = field(default_factory=list)  # hostile: what a stranger got (goal: nothing)


def draw_faults(rng: random.Random, names: list[str], count: int, quick: bool,
                hostile_weight: float = 0.0) -> list[list[Fault]]:
    """The schedule: groups of faults run at once. Quick: one of each kind, in order.
    `hostile_weight`: each hostile kind's weight against each of the others' 1 (0: none)."""
    pairs = [f"{x}-{y}" for x, y in combinations(names, 2)]
    groups: list[list[Fault]] = []
    every = KINDS + (HOSTILE_KINDS if hostile_weight else ())
    kinds = list(every) if quick else None

    def pick(among: tuple[str, ...]) -> str:
        if not hostile_weight:
            return rng.choice(among)  # as before the hostile kinds: old seeds replay the same faults
        return rng.choices(among, [hostile_weight if k in HOSTILE_KINDS else 1.0 for k in among])[0]

    total = 0
    while total < count:
        if kinds is not None:
            group_kinds = [kinds[len(groups) % len(kinds)]]
        else:
            first = pick(every)
            group_kinds = [first]
            if first != "partition" and rng.random() < 0.3 and count - total >= 2:
                group_kinds.append(pick(tuple(k for k in every if k != "partition")))
        used: set[str] = set()
        group = []
        for kind in group_kinds:
            fault = draw_fault(rng, kind, names, pairs, used)
            if fault is not None:
                group.append(fault)
                used.update(fault_nodes(fault))
        groups.append(group)
        total += len(group)
    return groups


def fault_nodes(fault: Fault) -> set[str]:
    return {part for target in fault.targets for part in target.split("-")}


def draw_fault(rng: random.Random, kind: str, names: list[str], pairs: list[str], used: set[str]) -> Fault | None:
    free = [n for n in names if n not in used]
    free_pairs = [p for p in pairs if not set(p.split("-")) & used]
    if kind in HOSTILE_KINDS:  # the member the stranger leads to, relays to, or dials
        if not free:
            return None
        if kind == "stranger":
            params = {"dials": [rng.choice(DIAL_KINDS) for _ in range(rng.randint(5, 20))],
                      "stall_s": round(rng.uniform(1.0, 6.0), 2)}
        else:
            params = {"seconds": round(rng.uniform(2.0, 8.0), 2)}
            if kind == "relay":
                params["seed"] = rng.randrange(1 << 31)  # its bit flips
        return Fault(kind, [rng.choice(free)], params)
    if kind in ("kill", "restart", "stop", "memory"):
        if not free:
            return None
        node = rng.choice(free)
        params: dict[str, Any] = {}
        if kind == "stop":
            params["seconds"] = round(rng.uniform(0.3, 4.0), 2)
        if kind == "memory":
            params["seconds"] = round(rng.uniform(1.0, 4.0), 2)
            params["to"] = rng.choice(["nothing", "third"])
        return Fault(kind, [node], params)
    if kind in ("cable", "flap"):
        if not free_pairs:
            return None
        pair = rng.choice(free_pairs)
        if kind == "cable":
            return Fault(kind, [pair], {"seconds": round(rng.uniform(0.3, 4.0), 2)})
        return Fault(kind, [pair], {"flaps": rng.randint(3, 10), "down": round(rng.uniform(0.1, 0.4), 2),
                                    "up": round(rng.uniform(0.1, 0.4), 2)})
    # partition: a random nonempty proper subset against the rest
    side = [n for n in names if rng.random() < 0.5]
    if not side or len(side) == len(names):
        side = [names[0]]
    return Fault("partition", side, {"seconds": round(rng.uniform(1.0, 5.0), 2)})


def inflict(cluster: Cluster, fault: Fault) -> None:
    """Run one fault to its heal (in its own thread when the group has several)."""
    fault.start = time.monotonic()
    kind, target = fault.kind, fault.targets[0]
    if kind == "kill":
        cluster.kill(target)
        fault.killed = [target]
        survivors = [n for n in cluster.names if n != target]
        fault.converged_without_s = cluster.wait_converged(survivors)
        back = time.monotonic()
        cluster.start(target)
        fault.down.append((target, fault.start, back))
    elif kind == "restart":
        cluster.kill(target)
        fault.killed = [target]
        cluster.start(target)
        fault.down.append((target, fault.start, time.monotonic()))
    elif kind == "stop":
        cluster.stop(target)
        time.sleep(fault.params["seconds"])
        cluster.cont(target)
        fault.stopped_s = time.monotonic() - fault.start
    elif kind == "cable":
        cable = cluster.cable(frozenset(target.split("-")))
        cable.unplug()
        time.sleep(fault.params["seconds"])
        cable.plug()
    elif kind == "flap":
        cable = cluster.cable(frozenset(target.split("-")))
        for _ in range(fault.params["flaps"]):
            cable.down()
            time.sleep(fault.params["down"])
            cable.up()
            time.sleep(fault.params["up"])
    elif kind == "memory":
        size = "1MB" if fault.params["to"] == "nothing" else str(cluster.model_bytes // 3)
        cluster.set_memory(target, size)
        time.sleep(fault.params["seconds"])
        cluster.set_memory(target, MEMORY)
    elif kind == "partition":
        side = set(fault.targets)
        cut = [c for pair, c in cluster.cables.items() if len(pair & side) == 1]
        for cable in cut:
            cable.down()
        time.sleep(fault.params["seconds"])
        for cable in cut:
            cable.up()
    elif kind in HOSTILE_KINDS:
        hostile(cluster, fault)
    fault.healed = time.monotonic()


def hostile(cluster: Cluster, fault: Fault) -> None:
    """A stranger at work on member `fault.targets[0]`, reached over the stranger's cable to it."""
    stranger, target = cluster.stranger, fault.targets[0]
    assert stranger is not None, "hostile faults need a Cluster(hostile=True)"
    member = cluster.macs[cluster.names.index(target)]
    address = cluster.stranger_cables[target].addr(member)  # where the stranger reaches it
    port = cluster.daemons[target].control_port
    if fault.kind == "stranger":
        async def all_at_once() -> list[str]:
            return await asyncio.gather(*(hostile_dial(kind, address, port, cluster.name, fault.params["stall_s"])
                                          for kind in fault.params["dials"]))

        outcomes = stranger.run(all_at_once(), timeout=fault.params["stall_s"] + 60)
        fault.params["outcomes"] = dict(Counter(o.split(":")[0] for o in outcomes))
        fault.breaches += [f"{target} accepted a stranger's dial: {o}" for o in outcomes if "ACCEPTED" in o]
        return
    node_id = f"x{uuid.uuid4().hex[:15]}"  # made up, in the members' cluster
    relay = None
    if fault.kind == "relay":  # every member that dials the made-up node is piped to `target`
        relay = stranger.relay((address, port), flip=RELAY_FLIP, seed=fault.params["seed"], listen="0.0.0.0")
        stranger.advertise(node_id, cluster.name, relay.port, cluster.stranger_mac.addrs)
    else:  # stray: the record names the member's own addresses and port
        stranger.advertise(node_id, cluster.name, port, member.addrs)
    time.sleep(fault.params["seconds"])
    fault.breaches += cluster.strangers_listed()
    stranger.withdraw(node_id)
    if relay is not None:
        stranger.stop_relay(relay)
        fault.params.update(connections=relay.connections, flipped=relay.flipped)


def run_group(cluster: Cluster, group: list[Fault]) -> None:
    before = cluster.rss()
    threads = [threading.Thread(target=inflict, args=(cluster, fault)) for fault in group]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    waited = cluster.wait_converged()
    after = cluster.rss()
    killed = {n for f in group for n in f.killed}
    growth = max((after[n] - before[n] for n in before if n in after and n not in killed), default=0)
    for fault in group:
        fault.converge_s = waited  # from the group's heal: faults at once converge as one
        fault.converged_at = time.monotonic()
        fault.rss_growth = growth


def campaign(cluster: Cluster, clients: Clients, groups: list[list[Fault]], seed: int) -> list[Fault]:
    rng = random.Random(f"{seed}:pauses")
    done: list[Fault] = []
    for i, group in enumerate(groups):
        desc = " + ".join(f"{f.kind} {','.join(f.targets)}" for f in group)
        run_group(cluster, group)
        done += group
        took = group[0].converge_s
        print(f"  [{i + 1}/{len(groups)}] at {group[0].start:.1f}: {desc}: converged "
              f"{'NOT within %.0f s' % CONVERGE_TIMEOUT_S if took is None else '%.2f s after the heal' % took}",
              flush=True)
        if took is None or cluster.crashed():
            print(f"  stopping the campaign here: {'crashed: ' + str(cluster.crashed()) if cluster.crashed() else ''}")
            break
        time.sleep(rng.uniform(0.5, 2.0))  # the clients stream undisturbed for a while
    return done


# ----- the checker -----------------------------------------------------------------------


class References:
    """Single-process mlx-lm's text for each (prompt, max_tokens, sampling), computed once."""

    def __init__(self, model: Path) -> None:
        from serving import mlx_reference

        from tbmesh.runtime.sampling import Sampling

        self.generate = mlx_reference(model)
        self.sampling = Sampling
        self.cache: dict[str, str] = {}

    def text(self, record: Record) -> str:
        key = json.dumps([record.prompt, record.max_tokens, record.sampling], sort_keys=True)
        if key not in self.cache:
            s = record.sampling
            sampling = self.sampling(s["temperature"], s.get("top_p", 1.0), s.get("seed"))
            self.cache[key] = self.generate(record.prompt, record.max_tokens, sampling)[0]
        return self.cache[key]


def check(history: list[Record], faults: list[Fault], references: References, resume_wait: float,
          stall_bound: float | None = STALL_BOUND_S) -> dict:
    """Sorts every request: exact, wrong, lost, entry died, not admitted; and the stalls
    (findings beyond `stall_bound`, none when it is None: a soak's queue is no stall)."""
    outcome: Counter[str] = Counter()
    findings: list[dict] = []
    stalls_by_kind: dict[str, list[float]] = defaultdict(list)
    down = [d for f in faults for d in f.down]
    for record in history:
        entry_died = any(node == record.node and start <= (record.end or 1e18) and to >= record.start
                         for node, start, to in down)
        if not record.admitted:
            outcome["tries while the entry was down"] += 1
            continue
        if record.end is None:
            outcome["lost"] += 1
            findings.append({"what": "hang: never ended", **summary_of(record)})
            continue
        expected = references.text(record)
        if record.error is None:
            if record.text == expected:
                outcome["exact"] += 1
            else:
                outcome["wrong"] += 1
                findings.append({"what": "wrong text", "expected": expected, **summary_of(record)})
                continue
        elif entry_died:
            if expected.startswith(record.text):
                outcome["entry died"] += 1
            else:
                outcome["wrong"] += 1
                findings.append({"what": "wrong text before the entry died", "expected": expected,
                                 **summary_of(record)})
            continue
        elif "unavailable" in record.error.lower() and waited_out(record, resume_wait):
            outcome["unavailable (allowed)"] += 1
            continue
        else:
            outcome["lost"] += 1
            findings.append({"what": "error though the entry lived", **summary_of(record)})
            continue
        stall, at = longest_stall(record)
        overlapping = [f for f in faults if f.start <= at[1] and (f.converged_at or 1e18) >= at[0]]
        kinds = sorted({f.kind for f in overlapping}) or ["none"]
        for kind in kinds:
            stalls_by_kind[kind].append(stall)
        allowed = None if stall_bound is None else stall_bound + sum(f.stopped_s for f in overlapping)
        if allowed is not None and stall > allowed:
            outcome["stalled"] += 1
            findings.append({"what": f"stall of {stall:.2f} s > {allowed:.2f} s", "faults": kinds,
                             **summary_of(record)})
    return {"requests": outcome, "findings": findings,
            "stall_s": {kind: percentiles(values) for kind, values in sorted(stalls_by_kind.items())}}


def waited_out(record: Record, resume_wait: float) -> bool:
    last = record.arrivals[-1] if record.arrivals else record.start
    return (record.end or 0) - last >= resume_wait * 0.9


def longest_stall(record: Record) -> tuple[float, tuple[float, float]]:
    """The longest wait for a piece (the first counted from the start), and when it was."""
    times = [record.start, *record.arrivals]
    if len(times) == 1:
        return 0.0, (record.start, record.start)
    gap, i = max((b - a, i) for i, (a, b) in enumerate(zip(times, times[1:])))
    return gap, (times[i], times[i + 1])


def summary_of(record: Record) -> dict:
    out = asdict(record)
    out.pop("arrivals")
    out["pieces"] = len(record.arrivals)
    return out


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {"n": len(values), "p50": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def fault_table(faults: list[Fault]) -> dict[str, dict]:
    table = {}
    for kind in KINDS + HOSTILE_KINDS:
        of_kind = [f for f in faults if f.kind == kind]
        if not of_kind:
            continue
        converged = [f.converge_s for f in of_kind if f.converge_s is not None]
        table[kind] = {"faults": len(of_kind), "not converged": len(of_kind) - len(converged),
                       "converge_s": percentiles(converged),
                       "rss_growth_mb_max": max(f.rss_growth for f in of_kind) / 2**20}
        without = [f.converged_without_s for f in of_kind if f.converged_without_s is not None]
        if kind == "kill":
            table[kind]["survivors_converge_s"] = percentiles(without)
        if kind == "relay":
            table[kind]["relayed_connections"] = sum(f.params.get("connections", 0) for f in of_kind)
            table[kind]["chunks_flipped"] = sum(f.params.get("flipped", 0) for f in of_kind)
        if kind == "stranger":
            table[kind]["dials"] = dict(sum((Counter(f.params.get("outcomes", {})) for f in of_kind), Counter()))
    return table


# ----- the modes -------------------------------------------------------------------------


def run_campaign(args: argparse.Namespace, lab: Lab, work: Path) -> dict:
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"campaign: seed {seed} (replay with --seed {seed})", flush=True)
    cluster = Cluster(lab, work, args.macs, args.resume_wait, args.log_level, args.secret, args.hostile)
    startup = cluster.wait_converged()
    groups = draw_faults(random.Random(seed), cluster.names, args.faults, args.quick,
                         args.hostile_weight if args.hostile else 0.0)
    if args.groups:  # replay a stretch of the seed's schedule
        first, _, last = args.groups.partition(":")
        groups = groups[int(first or 0):int(last) if last else None]
    clients = Clients(cluster, args.clients, seed)
    time.sleep(2.0)  # the clients warm up, the prefix caches fill
    began = time.monotonic()
    faults = campaign(cluster, clients, groups, seed)
    elapsed = time.monotonic() - began
    clients.stop()
    print("checking the history against mlx-lm ...", flush=True)
    verdict = check(clients.history, faults, References(cluster.model), args.resume_wait)
    if cluster.stranger is not None:
        cluster.stranger.close()
    result = {
        "seed": seed, "macs": args.macs, "clients": args.clients, "quick": args.quick,
        "secret": args.secret, "hostile": args.hostile,
        "hostile_breaches": [b for f in faults for b in f.breaches],
        "faults": len(faults), "groups": len(groups), "minutes": elapsed / 60,
        "startup_converge_s": startup, "by_fault": fault_table(faults),
        "converge_s": percentiles([f.converge_s for f in faults if f.converge_s is not None]),
        "not_converged": sum(f.converge_s is None for f in faults),
        "memory_not_back": [f"{f.kind} {','.join(f.targets)}: +{f.rss_growth / 2**20:.0f} MB" for f in faults
                            if f.rss_growth > MEMORY_GROWTH_BOUND],
        "load_average": os.getloadavg(),
        **verdict,
        "crashed": cluster.crashed(), "error_lines": cluster.error_lines()[:50],
    }
    result["ok"] = ok(result)
    write_history(work, seed, clients.history, faults)
    return result


def run_flap(args: argparse.Namespace, lab: Lab, work: Path) -> dict:
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    rng = random.Random(seed)
    cluster = Cluster(lab, work, args.macs, args.resume_wait, args.log_level, args.secret)
    view = wait_for(lambda: cluster.converged(), CONVERGE_TIMEOUT_S, "the cluster to converge")
    # a cable between two consecutive stages: its flaps break the route if anything does
    by_id = {node: name for name, node in cluster.ids.items()}
    stages = [by_id[s["node"]] for s in view["plan"]["stages"]]
    pair = frozenset(stages[:2]) if len(stages) > 1 else frozenset(cluster.names[:2])
    cable = cluster.cable(pair)
    clients = Clients(cluster, args.clients, seed)
    time.sleep(2.0)
    epoch_before = view["plan"]["epoch"]
    period = 60.0 / args.per_minute
    flaps = 0
    end = time.monotonic() + args.minutes * 60
    print(f"flapping {'-'.join(sorted(pair))} every {period:.2f} s for {args.minutes} min", flush=True)
    start = time.monotonic()
    while time.monotonic() < end:  # on a schedule: the `ip` commands take time too
        share = rng.uniform(0.2, 0.8)
        cable.down()
        time.sleep(max(0.0, start + (flaps + share) * period - time.monotonic()))
        cable.up()
        flaps += 1
        time.sleep(max(0.0, start + flaps * period - time.monotonic()))
    last_flap = time.monotonic()
    converge = cluster.wait_converged()
    plans = cluster.converged()["plan"]["epoch"] - epoch_before if converge is not None else None
    clients.stop()
    # a link of the route down half the time does not carry much: stalls may last the flapping
    flapping = Fault("flap", ["-".join(sorted(pair))], {}, start, last_flap, stopped_s=last_flap - start,
                     converged_at=last_flap + (converge or 0))
    verdict = check(clients.history, [flapping],
                    References(cluster.model), args.resume_wait)
    result = {"seed": seed, "secret": args.secret, "cable": "-".join(sorted(pair)), "per_minute": args.per_minute,
              "minutes": args.minutes, "flaps": flaps, "plans_committed": plans,
              "converge_after_last_flap_s": converge, **verdict, "crashed": cluster.crashed(),
              "error_lines": cluster.error_lines()[:50]}
    result["ok"] = ok(result) and converge is not None and converge <= 1.0
    write_history(work, seed, clients.history, [])
    return result


def run_soak(args: argparse.Namespace, lab: Lab, work: Path) -> dict:
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    cluster = Cluster(lab, work, args.macs, args.resume_wait, args.log_level, args.secret)
    cluster.wait_converged()
    clients = Clients(cluster, args.clients, seed)
    samples: list[tuple[float, dict[str, int]]] = []
    start = time.monotonic()
    while time.monotonic() - start < args.minutes * 60:
        samples.append((time.monotonic() - start, cluster.rss()))
        time.sleep(5.0)
    clients.stop()
    # 64 streams overload 2 cores: requests queue for KV room, so the longest wait is no stall
    verdict = check(clients.history, [], References(cluster.model), args.resume_wait, stall_bound=None)

    def median_rss(lo: float, hi: float) -> dict[str, float]:
        window = [s for t, s in samples if lo <= t < hi]
        return {n: statistics.median(s[n] for s in window if n in s) / 2**20 for n in cluster.names}

    minutes = args.minutes
    second = median_rss(60, 120) if minutes >= 2 else median_rss(0, 60 * minutes / 2)
    last = median_rss(60 * (minutes - 1), 60 * minutes) if minutes >= 2 else median_rss(60 * minutes / 2, 1e9)
    result = {"seed": seed, "secret": args.secret, "clients": args.clients, "minutes": minutes,
              "rss_mb_second_minute": second, "rss_mb_last_minute": last,
              "rss_growth_mb": {n: last[n] - second[n] for n in cluster.names},
              "completed": sum(r.end is not None and r.error is None for r in clients.history),
              "pieces_per_s": sum(len(r.arrivals) for r in clients.history) / (minutes * 60), **verdict, "crashed": cluster.crashed(),
              "error_lines": cluster.error_lines()[:50]}
    result["ok"] = ok(result) and all(growth < SOAK_GROWTH_BOUND_MB for growth in result["rss_growth_mb"].values())
    write_history(work, seed, clients.history, [])
    return result


def ok(result: dict) -> bool:
    requests = result["requests"]
    return (not result["findings"] and not result.get("memory_not_back") and requests.get("wrong", 0) == 0 and requests.get("lost", 0) == 0
            and not result.get("hostile_breaches")
            and not result["crashed"] and not result.get("not_converged") and not result["error_lines"])


def write_history(work: Path, seed: int, history: list[Record], faults: list[Fault]) -> None:
    path = work / f"history-{seed}.jsonl"
    with path.open("w") as out:
        for fault in faults:
            out.write(json.dumps({"fault": asdict(fault)}) + "\n")
        for record in history:
            out.write(json.dumps({"request": asdict(record)}) + "\n")


def report(mode: str, result: dict) -> None:
    print(f"\n== {mode} ==")
    if mode == "campaign":
        print(f"faults {result['faults']} in {result['minutes']:.1f} min, seed {result['seed']}")
        for kind, row in result["by_fault"].items():
            c = row["converge_s"]
            print(f"  {kind:<10} {row['faults']:>4} faults  converge p50 {c.get('p50', 0):.2f} s  "
                  f"p95 {c.get('p95', 0):.2f} s  max {c.get('max', 0):.2f} s  "
                  f"not converged {row['not converged']}  RSS growth max {row['rss_growth_mb_max']:.0f} MB")
    if mode == "flap":
        print(f"{result['flaps']} flaps in {result['minutes']} min; plans committed {result['plans_committed']}; "
              f"converged {result['converge_after_last_flap_s']} s after the last flap")
    if mode == "soak":
        print(f"{result['clients']} streams for {result['minutes']} min; completed {result['completed']}; "
              f"RSS growth (MB, last minute vs second): { {n: round(v, 1) for n, v in result['rss_growth_mb'].items()} }")
    print("requests:", dict(result["requests"]))
    for kind, p in result["stall_s"].items():
        if p.get("n"):
            print(f"  longest stall per request, faults {kind:<10} n {p['n']:>5}  p50 {p['p50']:.2f} s  "
                  f"p95 {p['p95']:.2f} s  max {p['max']:.2f} s")
    for finding in result["findings"][:10]:
        print("FINDING:", json.dumps(finding)[:600])
    for breach in result.get("hostile_breaches", [])[:10]:
        print("BREACH:", breach)
    if result["crashed"]:
        print("CRASHED:", result["crashed"])
    for line in result["error_lines"][:10]:
        print("ERROR LINE:", line[:300])
    print("OK" if result["ok"] else f"FOUND SOMETHING (seed {result.get('seed')})")


def write_result(mode: str, result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    variant = "_hostile" if result.get("hostile") else "_secret" if result.get("secret") else ""
    key = mode + variant + ("_quick" if result.get("quick") else "")
    try:
        everything = json.loads(path.read_text())
    except (OSError, ValueError):
        everything = {}
    everything[key] = rounded({"when": datetime.now().isoformat(timespec="seconds"), "source": source_version(),
                               "python": platform.python_version(), "cpus": os.cpu_count(), **result})
    path.write_text(json.dumps(everything, indent=2, default=dict) + "\n")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["campaign", "flap", "soak"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--faults", type=int, default=200)
    parser.add_argument("--macs", type=int, default=4)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--per-minute", type=float, default=100)
    parser.add_argument("--resume-wait", type=float, default=30.0)
    parser.add_argument("--log-level", default="info", help="the daemons' (their logs stay with a failed run)")
    parser.add_argument("--quick", action="store_true", help="one fault of each kind, 3 Macs (CI)")
    parser.add_argument("--secret", action="store_true", help="the daemons hold a cluster secret (TLS)")
    parser.add_argument("--hostile", action="store_true",
                        help="a stranger's Mac too, and its faults: relay, stranger, stray (implies --secret)")
    parser.add_argument("--hostile-weight", type=float, default=1.0,
                        help="each hostile kind's chance of being drawn against each other kind's (1: even)")
    parser.add_argument("--groups", metavar="A:B",
                        help="run only groups A to B (0-based, B excluded) of the seed's schedule: replays a finding")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, history)")
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json",
                        help="the results file (each mode replaces its own key)")
    args = parser.parse_args(argv)
    args.secret = args.secret or args.hostile
    if args.quick:
        args.macs, args.faults = 3, len(KINDS) + (len(HOSTILE_KINDS) if args.hostile else 0)
        args.clients = args.clients or 3
    args.clients = args.clients or {"campaign": 8, "flap": 8, "soak": 64}[args.mode]
    args.minutes = args.minutes or {"campaign": 0, "flap": 5, "soak": 10}[args.mode]
    run = {"campaign": run_campaign, "flap": run_flap, "soak": run_soak}[args.mode]
    with workdir(args.keep) as work, Lab() as lab:
        result = run(args, lab, work)
        report(args.mode, result)
        write_result(args.mode, result, args.out)
        if not result["ok"]:
            kept = Path(f"/tmp/tbmesh-chaos-{result.get('seed')}")
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(work, kept)
            print(f"history and logs kept in {kept}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
