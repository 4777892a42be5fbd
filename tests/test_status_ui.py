"""`tbmesh status`: the frame drawn from status dicts, and the real command against real daemons,
in tmux for the live screen."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import DaemonProcess, agreed, start_all, state_of, tiny_model_dir, wait_for
from rich.console import Console

from tbmesh.cli.status_view import render
from tbmesh.core.jsonform import from_json
from tbmesh.core.status import Status

GB = 10**9

# ----- status dicts, in the shape of GET /status (read back as `tbmesh status` does) ---------

IDS = {"studio-a": "a1f0c3d2e4b5a6c7", "studio-b": "b2e1d4c3f5a6b7c8", "studio-c": "c3d2e5f4a6b7c8d9",
       "studio-d": "d4c3f6e5b7c8d9e0"}
RANGES = {"studio-a": (0, 16), "studio-b": (16, 31), "studio-c": (31, 46), "studio-d": (46, 61)}
KIMI_EVENTS = [
    ("leader", "studio-a leads term 7"), ("joined", "studio-b"), ("joined", "studio-c"),
    ("joined", "studio-d"), ("plan", "epoch 3 term 7: studio-a 0-21, studio-b 21-41, studio-c 41-61"),
    ("plan", "epoch 4 term 7: studio-a 0-16, studio-b 16-31, studio-c 31-46, studio-d 46-61"),
    ("suspect", "studio-d"), ("alive", "studio-d"), ("joined", "studio-e"), ("dead", "studio-e")]


def kimi_status(now: float = 1000.0) -> dict:
    """studio-a's status: four Mac Studios serving Kimi-K2-Thinking, 61 layers of 9.6 GB."""
    nodes = []
    for name, node_id in IDS.items():
        start, end = RANGES[name]
        nodes.append({"id": node_id, "name": name, "chip": "Apple M3 Ultra", "state": "alive",
                      "memory_total": 512 * GB, "memory_usable": 464 * GB, "flops": 28.4e12,
                      "role": "leader" if name == "studio-a" else "follower",
                      "shard": {"start": start, "end": end, "epoch": 4, "bytes": int((end - start) * 9.6 * GB),
                                "progress": 1.0, "loaded": True}})
    names = list(IDS)
    return {
        "node": {"id": IDS["studio-a"], "name": "studio-a", "incarnation": 3, "port": 7470,
                 "interfaces": ["bridge0"], "addresses": ["169.254.3.1"]},
        "cluster": "lab", "now": now, "leader": IDS["studio-a"], "term": 7, "model": "Kimi-K2-Thinking",
        "nodes": nodes,
        "links": [{"a": IDS[x], "b": IDS[y], "bandwidth_bps": 78.5e9, "rtt_s": 0.000085}
                  for x, y in zip(names, names[1:])],
        "plan": {"term": 7, "epoch": 4, "model": "Kimi-K2-Thinking", "left_out": [],
                 "stages": [{"node": IDS[n], "start": RANGES[n][0], "end": RANGES[n][1],
                             "bytes": int((RANGES[n][1] - RANGES[n][0]) * 9.6 * GB)} for n in names]},
        "no_fit": None,
        "runtime": {"requests": 2, "stage_requests": 2, "weight_bytes": 153 * GB, "active_memory": 160 * GB,
                    "tokens_per_s": 14.2, "tokens": 18234, "decoding": 7, "queued": 1, "kv_tokens": 5210,
                    "kv_room": 32768, "prefix_tokens": 3100, "prefix_bytes": int(2.5 * GB),
                    "prefix_hits": 9, "prefix_lookups": 12},
        "events": [{"at": now - 600 + 30 * i, "kind": kind, "node": None, "detail": detail}
                   for i, (kind, detail) in enumerate(KIMI_EVENTS)],
    }


def preparing(status: dict) -> dict:
    """The same cluster while studio-d's leaving is being re-planned over the other three."""
    status["preparing"] = {
        "term": 7, "epoch": 5,
        "stages": [{"node": IDS["studio-a"], "start": 0, "end": 20, "bytes": 20 * 96 * GB // 10},
                   {"node": IDS["studio-b"], "start": 20, "end": 40, "bytes": 20 * 96 * GB // 10},
                   {"node": IDS["studio-c"], "start": 40, "end": 61, "bytes": 21 * 96 * GB // 10}],
        "progress": {IDS["studio-a"]: 1.0, IDS["studio-b"]: 0.42, IDS["studio-c"]: 0.0}}
    return status


def not_fitting() -> dict:
    status = kimi_status()
    status.update(plan=None, runtime={"requests": 0}, no_fit=(
        "needs 657.9 GB; usable 400.0 GB on 2 nodes (a 200.0, b 200.0); short by 258.0 GB: add a Mac "
        "with at least 260.9 GB usable, or use a smaller quantization, or a shorter context"))
    for node in status["nodes"]:
        node["shard"] = None
    return status


def frame(status: dict, width: int, height: int | None = None, error: str | None = None) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(render(from_json(Status, status), width, height, error))
    return console.export_text()


def styled_frame(status: dict, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), force_terminal=True, color_system="standard")
    console.print(render(from_json(Status, status), width))
    return console.export_text(styles=True)


def assert_fits(text: str, width: int) -> None:
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, f"lines wider than {width}: {too_long}"


# ----- the frame ------------------------------------------------------------------------

def with_disks(status: dict) -> dict:
    """The same cluster where studio-d started with no weights and fetches its layers from
    studio-a and studio-b, and layers 46-60 are on one disk only."""
    for node in status["nodes"]:
        start, end = RANGES[node["name"]]
        node["disk"] = {"layers": [[start, end]], "ends": True, "bytes": int((end - start) * 9.6 * GB),
                        "manifest": "ab" * 32, "fetching": None}
    status["nodes"][-1]["disk"].update(bytes=int(4.8 * GB), layers=[], fetching={
        "done": int(4.8 * GB), "total": int(144 * GB), "bytes_per_s": 5.1e9, "from": ["studio-a", "studio-b"]})
    status["replicas"] = [2] * 46 + [1] * 15
    return status


@pytest.mark.parametrize("width", [80, 200])
def test_disks_fetches_and_single_copies_are_shown(width):
    text = frame(with_disks(kimi_status()), width)
    assert_fits(text, width)
    assert "studio-d fetching 4.8 GB of 144.0 GB at 40.8 Gbit/s from studio-a, studio-b" in text
    assert "one copy on disk:  46-60" in text
    if width > 80:  # a narrow screen leaves the disk column out before it cuts a name
        assert "disk" in text and "4.8 GB ↓3% 40.8 Gbit/s" in text
    assert "studio-d" in text


@pytest.mark.parametrize("width", [80, 200])
def test_a_mac_holding_another_model_under_the_name_is_named_with_why(width):
    status = kimi_status()
    why = "studio-d holds another model under the name Kimi-K2: manifest 0123456789ab… vs abababababab…, the cluster's"
    status["nodes"][-1]["other_model"] = why
    text = frame(status, width)
    assert_fits(text, width)
    joined = " ".join(" ".join(line.strip("│ ") for line in text.splitlines()).split())
    assert "another model: " + why in joined


@pytest.mark.parametrize("width", [80, 200])
def test_frame_shows_nodes_leader_links_plan_runtime_and_events(width):
    text = frame(kimi_status(), width)
    assert_fits(text, width)
    assert "leader studio-a" in text and "term 7" in text and "model Kimi-K2-Thinking" in text
    assert re.search(r"★ studio-a +.*leader +alive", text)
    for name in ("studio-b", "studio-c", "studio-d"):  # at 80 columns only the leader's role is named
        assert re.search(rf"  {name} .*{'follower +' if width == 200 else ''}alive", text)
    assert "28.4 TFLOP/s" in text and "153.6/464.0 GB" in text  # used = the shard's bytes
    assert "0-15 loaded" in text and "46-60 loaded" in text
    assert "studio-a ↔ studio-b" in text and "78.5 Gbit/s" in text and "85 µs" in text
    assert "epoch 4" in text and "61 layers on 4 nodes" in text
    # the plan bar: one segment per stage, each as wide as its share of the layers
    labels = next(line for line in text.splitlines() if "studio-a 0-15" in line)
    columns = [labels.index(f"{name} {a}-{b - 1}") for name, (a, b) in RANGES.items()]
    assert columns == sorted(columns)
    bar = width - 4
    assert abs((columns[1] - columns[0]) / bar - 16 / 61) < 0.03
    assert "requests in flight 2" in text and "14.2 tokens/s" in text and "18,234 tokens" in text
    assert "decoding 7 queued 1" in text and "KV 5,210 of 32,768 tokens" in text
    assert "prefix cache 3,100 tokens 2.5 GB" in text and "hits 75% of 12" in text
    assert "5m ago  dead     studio-e" in text
    assert text.index("dead     studio-e") < text.index("joined   studio-e")  # newest first


def grouped(status: dict) -> dict:
    """The same four Studios as one tensor group of studio-a and studio-b (layers 0-40) and a
    pipeline stage on studio-c, studio-d left out (the planner's parallel="auto")."""
    status["plan"]["stages"] = [
        {"node": IDS["studio-a"], "start": 0, "end": 41, "bytes": int(41 * 9.6 * GB),
         "group": [IDS["studio-a"], IDS["studio-b"]]},
        {"node": IDS["studio-c"], "start": 41, "end": 61, "bytes": int(20 * 9.6 * GB)}]
    status["plan"]["left_out"] = [IDS["studio-d"]]
    return status


@pytest.mark.parametrize("width", [80, 200])
def test_a_tensor_group_is_its_members_on_one_segment_of_the_plan_bar(width):
    text = frame(grouped(kimi_status()), width)
    assert_fits(text, width)
    assert "61 layers on 3 nodes" in text
    labels = next(line for line in text.splitlines() if "studio-a+studio-b 0-40" in line)
    assert labels.index("studio-a+studio-b 0-40") < labels.index("studio-c 41-60")
    assert re.search(r"left out: +studio-d", text)


@pytest.mark.parametrize("width", [80, 200])
def test_a_link_whose_ends_both_run_rdma_says_so(width):
    status = grouped(kimi_status())
    status["links"][0]["rdma"] = True
    text = frame(status, width)
    assert_fits(text, width)
    assert "studio-a ↔ studio-b RDMA" in text and "studio-b ↔ studio-c RDMA" not in text


def test_wide_screens_put_panels_side_by_side_and_narrow_ones_drop_columns():
    wide, narrow = frame(kimi_status(), 200), frame(kimi_status(), 80)
    assert any("studio-a" in line and "studio-a ↔ studio-b" in line for line in wide.splitlines())
    assert not any("★ studio-a" in line and "↔" in line for line in narrow.splitlines())
    assert "Apple M3 Ultra" in wide and "Apple M3 Ultra" not in narrow


@pytest.mark.parametrize("width", [80, 200])
def test_a_plan_being_prepared_shows_each_nodes_load_progress(width):
    status = preparing(kimi_status())
    status["nodes"][1]["shard"].update(start=20, end=40, epoch=5, progress=0.42, loaded=False)
    text = frame(status, width)
    assert_fits(text, width)
    assert re.search(r"studio-b .* 20-39 42%", text)  # its row in the nodes table
    assert "preparing epoch 5" in text
    for label in ("studio-a 0-19 100%", "studio-b 20-39 42%", "studio-c 40-60 0%"):
        assert label in text
    lines = text.splitlines()
    bar = lines[next(i for i, line in enumerate(lines) if "preparing epoch 5" in line) + 1]
    assert bar.count("░") > (width - 4) // 3  # to load: all of studio-c's part, half of studio-b's
    assert "preparing" not in frame(kimi_status(), width)


@pytest.mark.parametrize("width", [80, 200])
def test_a_model_that_does_not_fit_says_why_in_red(width):
    status = not_fitting()
    text = frame(status, width)
    assert_fits(text, width)
    joined = " ".join(line.strip("│ ") for line in text.splitlines())
    assert "does not fit: " + status["no_fit"] in " ".join(joined.split())
    assert re.search(r"\x1b\[[0-9;]*31m[^\x1b]*needs 657\.9 GB", styled_frame(status, width))


def test_without_a_plan_it_says_what_it_waits_for():
    status = kimi_status()
    status.update(plan=None)
    assert "waiting for the leader's plan" in frame(status, 80)
    status.update(leader=None)
    assert "waiting for a leader" in frame(status, 80)
    status.update(model=None)
    assert "no model" in frame(status, 80)


def test_fewer_events_on_a_small_terminal():
    def shown(text: str) -> int:
        return sum(" ago " in line for line in text.splitlines())

    assert shown(frame(kimi_status(), 80)) == 8  # no height (--once, a pipe): the last 8
    small = frame(kimi_status(), 80, 28)
    assert len(small.splitlines()) < 28 and 0 < shown(small) < 8
    assert "dead     studio-e" in small  # the newest are the ones kept


def test_daemon_not_answering_is_shown_above_the_last_status():
    text = frame(kimi_status(), 80, error="daemon not answering at http://127.0.0.1:7471; retrying")
    assert text.splitlines()[0].startswith("daemon not answering")
    assert "★ studio-a" in text


BROKEN = [
    {},
    {"node": None, "nodes": None, "links": None, "plan": None, "runtime": None, "events": None, "now": None},
    {"nodes": [{}], "links": [{}], "events": [{}], "plan": {"stages": [{}]}, "runtime": {},
     "preparing": {"stages": [{}], "progress": None}},
    {"nodes": [{"shard": {"start": None, "end": 3}}], "plan": {"stages": [{"start": None, "end": None}]},
     "events": [{"at": None}], "links": [{"a": "x", "bandwidth_bps": None, "rtt_s": None}]},
    {**kimi_status(), "model": None, "plan": None, "runtime": None, "no_fit": None},  # membership only
    {k: v for k, v in preparing(kimi_status()).items() if k not in ("now", "links", "term", "cluster")},
]


@pytest.mark.parametrize("status", BROKEN)
@pytest.mark.parametrize("width", [40, 80, 200])
def test_missing_or_none_keys_never_raise_nor_overflow(status, width):
    assert_fits(frame(status, width, 30), width)


def test_long_names_and_many_nodes_stay_within_80_columns():
    status = kimi_status()
    status["nodes"] = [{**status["nodes"][i % 4], "id": f"n{i}", "name": f"johns-macbook-pro-{i}-of-many"}
                       for i in range(12)]
    status["plan"]["stages"] = [{"node": f"n{i}", "start": 5 * i, "end": 5 * i + 5, "bytes": 1}
                                for i in range(12)]
    text = frame(status, 80)
    assert_fits(text, 80)
    assert "johns-macbook-pro-11-of-many 55-59" in text  # too narrow a segment: the legend has it


# ----- the command, against real daemons --------------------------------------------------

NAMES = ("studio-a", "studio-b", "mini")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[list[DaemonProcess]]:
    """Three daemons on `lo` serving a tiny model; the first one's API is the one watched."""
    root = tmp_path_factory.mktemp("status")
    model = tiny_model_dir(root / "model")
    name = f"s{uuid.uuid4().hex[:8]}"
    daemons = [DaemonProcess(node, root / node, ["--interface", "lo", "--memory", memory, "--model", str(model),
                                                 "--cluster", name])
               for node, memory in zip(NAMES, ("4GB", "6GB", "3GB"))]
    try:
        start_all(daemons)

        def serving() -> dict | None:
            view = agreed(daemons)
            shards = [n["shard"] for n in view["nodes"]] if view else []
            return view if len(view["plan"]["stages"]) == 3 and all(s and s["loaded"] for s in shards) else None

        wait_for(serving, 40, "three loaded stages")
        yield daemons
    finally:
        for daemon in daemons:
            daemon.kill()


def plan_labels(status: dict) -> list[str]:
    """The plan's "name first-last" labels, as the screen shows them."""
    names = {n["id"]: n["name"] for n in status["nodes"]}
    return [f"{names[s['node']]} {s['start']}-{s['end'] - 1}" for s in status["plan"]["stages"]]


def tbmesh(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "tbmesh", *args], capture_output=True, text=True,
                          timeout=30, env=env)


# os.environ, given explicitly: the process environment may hold a COLUMNS=80 and LINES=24 that
# os.environ does not show (GNU readline exports them when it loads), and rich would believe
# them over the pane's real size. And no $TMUX: this server is not nested in the user's.
TMUX_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}


class Tmux:
    """A tmux server of our own (-L): the tests never touch the user's sessions."""

    def __init__(self) -> None:
        self.socket = f"tbmesh-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:  # -f /dev/null: not the user's ~/.tmux.conf
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], check=True,
                              capture_output=True, text=True, timeout=10, env=TMUX_ENV).stdout

    def start(self, command: list[str], width: int, height: int) -> None:
        """Run `command` in a pane of this size; then bash prints its exit status and keeps the
        pane open (tmux may lose a dead pane's last output and leave its process unreaped)."""
        script = f'{shlex.join(command)}; echo "exited with status $?"; sleep 600'
        self("new-session", "-d", "-s", "status", "-x", str(width), "-y", str(height), "bash", "-c", script)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-J", "-t", "status")  # -J: a wrapped line stays one line

    def wait_screen(self, predicate, what: str, timeout: float = 15) -> str:
        try:
            return wait_for(lambda: (lambda text: text if predicate(text) else None)(self.screen()),
                            timeout, what, step=0.2)
        except AssertionError as error:
            raise AssertionError(f"{error}\nscreen:\n{self.screen()}") from None

    def display(self, fmt: str) -> str:
        return self("display-message", "-p", "-t", "status", fmt).strip()

    def kill(self) -> None:
        try:
            path = self.display("#{socket_path}")
        except subprocess.CalledProcessError:
            return  # no server was started
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)
        Path(path).unlink(missing_ok=True)  # a killed server may leave its socket file behind


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    server = Tmux()
    yield server
    server.kill()


def live_command(daemon: DaemonProcess) -> list[str]:
    return [sys.executable, "-m", "tbmesh", "status", "--api", daemon.api_url()]


@pytest.mark.parametrize("width", [80, 200])
def test_the_live_screen_in_a_terminal_shows_the_cluster(cluster, tmux, width):
    status = cluster[0].status()
    leader = {n["id"]: n["name"] for n in status["nodes"]}[status["leader"]]
    tmux.start(live_command(cluster[0]), width, 40)
    text = tmux.wait_screen(lambda t: all(label in t for label in plan_labels(status)), "the plan on screen")
    assert_fits(text, width)
    assert f"leader {leader}" in text and f"★ {leader}" in text
    assert all(name in text for name in NAMES)
    assert f"epoch {status['plan']['epoch']}" in text
    assert tmux.display("#{alternate_on}") == "1"  # a full-screen live view, not one printed frame
    if width == 200:  # nodes and links side by side
        assert any("★" in line and "↔" in line for line in text.splitlines()), text


def test_once_prints_one_frame_and_json_prints_the_status(cluster):
    status = cluster[0].status()
    once = tbmesh("status", "--once", "--api", cluster[0].api_url())
    assert once.returncode == 0 and once.stderr == ""
    assert all(label in once.stdout for label in plan_labels(status))
    assert "\x1b[" not in once.stdout  # not a terminal: no colour codes
    assert_fits(once.stdout, 80)
    wide = tbmesh("status", "--once", "--api", cluster[0].api_url(), columns=200)
    assert_fits(wide.stdout, 200)
    assert any("★" in line and "↔" in line for line in wide.stdout.splitlines())
    as_json = tbmesh("status", "--json", "--api", cluster[0].api_url())
    assert as_json.returncode == 0
    data = json.loads(as_json.stdout)
    assert {n["name"] for n in data["nodes"]} == set(NAMES)
    assert data["plan"]["stages"] == status["plan"]["stages"]


def test_without_a_terminal_status_prints_one_frame_instead_of_hanging(cluster):
    piped = tbmesh("status", "--api", cluster[0].api_url())  # stdout is a pipe; timeout=30 if it hung
    assert piped.returncode == 0
    assert all(name in piped.stdout for name in NAMES)
    assert piped.stdout.count("╭─ nodes") == 1


def test_no_daemon_is_one_line_on_stderr_and_exit_1():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the test runs: nobody answers there
    for args in ((), ("--once",), ("--json",)):
        result = tbmesh("status", "--api", f"http://127.0.0.1:{port}", *args)
        assert result.returncode == 1
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert f"no tbmesh daemon answers at http://127.0.0.1:{port}" in result.stderr
        assert "start one with `tbmesh daemon`" in result.stderr


# This one kills daemons of the shared cluster: it must stay the last test of the file.
def test_the_live_screen_follows_a_dying_node_and_a_silent_daemon_and_leaves_on_ctrl_c(cluster, tmux):
    watched, mini = cluster[0], cluster[2]
    mini_id = mini.node_id
    tmux.start(live_command(watched), 80, 40)
    tmux.wait_screen(lambda t: re.search(r"mini +\S* *alive", t), "mini alive")
    mini.kill()
    wait_for(lambda: state_of(watched.status(), mini_id) == "dead", 10, "mini declared dead")
    text = tmux.wait_screen(lambda t: re.search(r"mini +\S* *dead", t), "mini dead on screen")
    assert re.search(r"\d+s ago +dead +mini", text)  # and the event, with its age

    watched.kill()  # the daemon the screen polls stops answering: the screen says so and stays
    text = tmux.wait_screen(lambda t: "daemon not answering" in t, "the daemon not answering")
    assert "mini" in text and "exited with status" not in text

    tmux("send-keys", "-t", "status", "C-c")
    text = tmux.wait_screen(lambda t: "exited with status" in t, "status to exit on Ctrl-C")
    assert "exited with status 0" in text and "Traceback" not in text
