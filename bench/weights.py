"""Weights over the cables: fetch throughput against what the link and the disk can do.

A synthetic checkpoint of random tensors (the bytes matter, not the model: ~1.5 GB in three
model-0000k-of-00003.safetensors files, layers of a few big, medium and small tensors, an
embedding and a head) is served by one node (tbmesh.weights.bulk.serve on handshaken bulk
connections, from the original files: synthesized headers, then os.sendfile) and fetched by
another into an empty store (tbmesh.weights.bulk.fetch: verified, content-addressed blobs).

  loopback   both nodes in this namespace, unshaped. Baselines of the same run and bytes:
             `cp` of the weight files, and a bare os.sendfile socket copy (one TCP connection,
             sendfile on one end, recv_into + write to a file on the other).
  1gbit,     two namespaces joined by a veth cable shaped with tc tbf (tests/netns.py, as the
  5gbit      tests), MTU 1500. Baseline: tbmesh's own link probe (tbmesh/net/probe.py) on that
             cable in the same run, the bandwidth the daemon hands the fetcher; and the local
             ceiling of a verified copy on the cable: a bare sendfile copy + sha256. The 1 Gbit/s
             cable fetches the first ~0.5 GB only. Meanwhile a second TCP connection on the
             cable runs small request/response pairs every 10 ms (the control connection's
             heartbeats and tokens): its round trips are reported.

  join       a Mac with no weights joins a serving Mac: two daemons in namespaces, the second
             started with only the model's name, its cable (1 Gbit/s) plugged at t=0; from its
             log, the time to discovery (joined), plan (prepare), fetch (fetched), load
             (loaded) and serving (the plan that gives it layers committed). A 100 MB test model.
  kimi       no bytes: disk per Mac for the Kimi-K2-Thinking preset on four 512 GB Studios
             (384 GB usable each), from the planner and tbmesh.core.replicas, against every
             Mac holding the whole model (what exo and mlx-lm's distributed tools expect).

Each figure is the median of --rounds rounds; every round fetches into a fresh store, which
is deleted after it (as are the copies), and everything lives in one temporary directory
that is removed at the end.

    sudo .venv/bin/python bench/weights.py [--rounds 3] [--modes loopback,1gbit,5gbit]
                                           [--out bench/results/weights.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the lab harness lives with the tests

import netns
from netns import Loop

from tbmesh.net import peers
from provenance import provenance  # noqa: E402
from tbmesh.net.probe import plain, probe_receive, probe_send
from tbmesh.weights import bulk
from tbmesh.weights.manifest import Manifest, build_manifest
from tbmesh.weights.store import Local, Store

MiB = 1 << 20
LAYERS = 27
FILES = 3
CLIENT = peers.Me("client", 1, "client", "bench", "machine-client")
SERVER = peers.Me("server", 1, "server", "bench", "machine-server")


# --- the synthetic checkpoint ---------------------------------------------------------------------


def layer_tensors(layer: int) -> dict[str, int]:
    """name -> bytes of one layer: two big, three medium, four small (norms, biases)."""
    prefix = f"model.layers.{layer}."
    return {prefix + "mlp.experts.gate_up.weight": 36 * MiB, prefix + "mlp.experts.down.weight": 18 * MiB,
            prefix + "self_attn.q_proj.weight": 2 * MiB, prefix + "self_attn.k_proj.weight": MiB // 2,
            prefix + "self_attn.o_proj.weight": 2 * MiB, prefix + "input_layernorm.weight": 8192,
            prefix + "post_attention_layernorm.weight": 8192, prefix + "self_attn.q_norm.weight": 256,
            prefix + "mlp.gate.bias": 1024}


def write_checkpoint(root: Path, seed: int = 0) -> int:
    """Random tensors in FILES safetensors files; returns their total bytes."""
    rng = np.random.default_rng(seed)
    names = {"model.embed_tokens.weight": 48 * MiB, "model.norm.weight": 8192, "lm_head.weight": 48 * MiB}
    for layer in range(LAYERS):
        names |= layer_tensors(layer)
    items = list(names.items())
    per_file = math.ceil(len(items) / FILES)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "synthetic", "num_hidden_layers": LAYERS}))
    total = 0
    for k in range(FILES):
        chunk = items[k * per_file:(k + 1) * per_file]
        header, offset = {}, 0
        for name, size in chunk:
            header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        path = root / f"model-{k + 1:05d}-of-{FILES:05d}.safetensors"
        with path.open("wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for _, size in chunk:
                f.write(rng.bytes(size))
        total += path.stat().st_size
    return total


# --- an event loop in a thread (in a namespace), and a bulk server on it ---------------------------


class Server:
    def __init__(self, loop: Loop, local: Local, host: str, me: peers.Me = SERVER) -> None:
        self.stop = threading.Event()
        self.loop, self.host = loop, host

        async def accept(reader, writer):
            try:
                channel = await peers.answer(reader, writer, me)
            except peers.Refused:
                return
            bulk.serve_channel(channel, local, self.stop)

        self.server = loop.run(asyncio.start_server(accept, host, 0))
        self.port = self.server.sockets[0].getsockname()[1]

    def peer(self, client_loop: Loop, bandwidth: float = 0.0, client: peers.Me = CLIENT) -> bulk.Peer:
        return bulk.Peer("server", "server", bulk.connector(client_loop.loop, self.host, self.port, client), bandwidth)

    def close(self) -> None:
        self.stop.set()

        async def close():
            self.server.close()

        self.loop.run(close())


# --- measurements ----------------------------------------------------------------------------------


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """CPU time (user + system) of this process's threads, or of its finished children: what
    a transfer costs, whatever else the machine runs at the time."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def fetch_round(server: Server, client_loop: Loop, wanted, work: Path, bandwidth: float = 0.0,
                client: peers.Me = CLIENT) -> dict:
    store = Store(work / "fetched")
    try:
        started, cpu = time.perf_counter(), cpu_seconds()
        report = bulk.fetch(wanted, [server.peer(client_loop, bandwidth, client)], store)
        seconds = time.perf_counter() - started
        assert report.objects == len({e.digest for e in wanted}), report
        return {"bytes": report.bytes, "seconds": seconds, "cpu_s": cpu_seconds() - cpu, "retries": report.retries}
    finally:
        shutil.rmtree(work / "fetched", ignore_errors=True)


def cp_round(files: list[Path], work: Path) -> dict:
    dest = work / "cp"
    dest.mkdir()
    try:
        started, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
        subprocess.run(["cp", *map(str, files), str(dest)], check=True)
        seconds = time.perf_counter() - started
        return {"bytes": sum(f.stat().st_size for f in files), "seconds": seconds,
                "cpu_s": cpu_seconds(resource.RUSAGE_CHILDREN) - cpu}
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def sendfile_round(files: list[Path], work: Path, make_pair, verify: bool = False) -> dict:
    """A bare socket copy: sendfile on one end, recv_into + write to one file on the other
    (`verify`: and sha256 of what arrived, in the receiving thread: the least a verified copy does)."""
    sender, receiver = make_pair()
    total = sum(f.stat().st_size for f in files)
    out = work / "sendfile.out"

    def send() -> None:
        for f in files:
            with f.open("rb") as src:
                offset, size = 0, f.stat().st_size
                while offset < size:
                    offset += os.sendfile(sender.fileno(), src.fileno(), offset, size - offset)
        sender.close()

    try:
        buffer = memoryview(bytearray(MiB))
        digest = hashlib.sha256()
        started, cpu = time.perf_counter(), cpu_seconds()
        thread = threading.Thread(target=send)
        thread.start()
        got = 0
        with out.open("wb", buffering=0) as f:
            while n := receiver.recv_into(buffer):
                f.write(buffer[:n])
                if verify:
                    digest.update(buffer[:n])
                got += n
        seconds = time.perf_counter() - started
        thread.join()
        assert got == total
        return {"bytes": total, "seconds": seconds, "cpu_s": cpu_seconds() - cpu}
    finally:
        receiver.close()
        out.unlink(missing_ok=True)


def files_of(model: Path, size: int) -> list[Path]:
    """The first weight files holding at least `size` bytes (the bytes a shaped fetch takes)."""
    taken: list[Path] = []
    for f in sorted(model.glob("model-*.safetensors")):
        if sum(t.stat().st_size for t in taken) >= size:
            break
        taken.append(f)
    return taken


def rate(rounds: list[dict]) -> float:
    """Median bytes/s of the rounds."""
    return statistics.median(r["bytes"] / r["seconds"] for r in rounds)


def cpu_per_gb(rounds: list[dict]) -> float:
    """Median CPU seconds per GB moved (both ends of the transfer: they run in this process)."""
    return round(statistics.median(r["cpu_s"] / r["bytes"] * 1e9 for r in rounds), 3)


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(listener.getsockname())
    receiver, _ = listener.accept()
    listener.close()
    return sender, receiver


def loopback(model: Path, manifest: Manifest, rounds: int, work: Path) -> dict:
    files = sorted(model.glob("model-*.safetensors"))
    wanted = list(manifest.needed(0, LAYERS, LAYERS))
    server_loop, client_loop = Loop(), Loop()
    server = Server(server_loop, Local(manifest, model, Store(work / "server-store")), "127.0.0.1")
    results: dict[str, list[dict]] = {"fetch": [], "cp": [], "sendfile": [], "sendfile_sha256": []}
    try:
        for _ in range(rounds):  # interleaved, so the machine's moods fall on all alike
            results["cp"].append(cp_round(files, work))
            results["sendfile"].append(sendfile_round(files, work, loopback_pair))
            results["sendfile_sha256"].append(sendfile_round(files, work, loopback_pair, verify=True))
            results["fetch"].append(fetch_round(server, client_loop, wanted, work))
    finally:
        server.close()
        server_loop.close()
        client_loop.close()
    fetch_rate = rate(results["fetch"])
    return {
        "mode": "loopback", "bytes": results["fetch"][0]["bytes"],
        "fetch_gbyte_s": round(fetch_rate / 1e9, 3), "cp_gbyte_s": round(rate(results["cp"]) / 1e9, 3),
        "sendfile_gbyte_s": round(rate(results["sendfile"]) / 1e9, 3),
        "sendfile_sha256_gbyte_s": round(rate(results["sendfile_sha256"]) / 1e9, 3),
        "fetch_over_cp": round(fetch_rate / rate(results["cp"]), 3),
        "fetch_over_sendfile": round(fetch_rate / rate(results["sendfile"]), 3),
        "fetch_over_sendfile_sha256": round(fetch_rate / rate(results["sendfile_sha256"]), 3),
        "cpu_s_per_gb": {name: cpu_per_gb(rounds) for name, rounds in results.items()},
        "rounds": results,
    }


async def _probe(a: netns.Mac, b: netns.Mac, addr: str) -> float:
    (reader, writer), (server_reader, server_writer) = await netns.open_streams(a, b, addr)
    receiving = asyncio.create_task(probe_receive(plain(server_reader, server_writer)))
    result = await probe_send(plain(reader, writer))
    await receiving
    writer.close()
    server_writer.close()
    return result.bytes_per_s


def first_objects(manifest: Manifest, limit: int) -> tuple[list, int]:
    """The checkpoint's first objects, in layer order, until `limit` bytes; and their bytes."""
    wanted, size = [], 0
    for entry in manifest.needed(0, LAYERS, LAYERS):
        if size >= limit:
            break
        wanted.append(entry)
        size += entry.object_size
    return wanted, size


def shaped(model: Path, manifest: Manifest, rate_name: str, rounds: int, work: Path, limit: int) -> dict:
    wanted, size = first_objects(manifest, limit)
    with netns.Lab() as lab:
        a, b = lab.add_mac("a"), lab.add_mac("b")
        cable = lab.cable(a, b, rate=rate_name)
        addr = cable.addr(b)
        server_loop, client_loop = Loop(b.netns), Loop(a.netns)
        server = Server(server_loop, Local(manifest, model, Store(work / "server-store")), addr)
        probes, fetches, idle, busy, copies = [], [], [], [], []

        def cable_pair() -> tuple[socket.socket, socket.socket]:  # b sends, a receives, as the fetch
            return netns.connected_pair(b, a, cable.addr(a))

        try:
            for _ in range(rounds):
                probes.append(asyncio.run(_probe(a, b, addr)))
                copies.append(sendfile_round(files_of(model, size), work, cable_pair, verify=True))
            stop = threading.Event()
            pinger = threading.Thread(target=netns.control_pings, args=(a, b, addr, stop, idle))
            pinger.start()
            time.sleep(1.0)
            stop.set()
            pinger.join()
            for i in range(rounds):
                stop = threading.Event()
                pinger = threading.Thread(target=netns.control_pings, args=(a, b, addr, stop, busy))
                if i == 0:
                    pinger.start()
                fetches.append(fetch_round(server, client_loop, wanted, work, bandwidth=statistics.median(probes)))
                stop.set()
                if i == 0:
                    pinger.join()
        finally:
            server.close()
            server_loop.close()
            client_loop.close()
    probe_rate, fetch_rate, copy_rate = statistics.median(probes), rate(fetches), rate(copies)
    busy_ms = sorted(d * 1e3 for d in busy)
    return {
        "mode": rate_name, "bytes": fetches[0]["bytes"],
        "probe_gbit_s": round(probe_rate * 8 / 1e9, 4), "fetch_gbit_s": round(fetch_rate * 8 / 1e9, 4),
        "fetch_over_probe": round(fetch_rate / probe_rate, 3),
        # the local ceiling of a verified copy on this cable: a bare sendfile copy + sha256
        "sendfile_sha256_gbit_s": round(copy_rate * 8 / 1e9, 4),
        "fetch_over_sendfile_sha256": round(fetch_rate / copy_rate, 3),
        "probes_gbit_s": [round(p * 8 / 1e9, 4) for p in probes],
        "control_rtt_ms": {"idle_median": round(statistics.median(idle) * 1e3, 3),
                           "fetching_median": round(statistics.median(busy_ms), 3),
                           "fetching_p99": round(busy_ms[int(0.99 * (len(busy_ms) - 1))], 3),
                           "fetching_max": round(busy_ms[-1], 3), "pairs": len(busy_ms)},
        "rounds": fetches,
    }


def kimi_disks() -> dict:
    """Disk per Mac for Kimi-K2-Thinking on four Studios: the planner's shards, and the copies
    tbmesh.core.replicas adds for 2 copies of each layer (disks with room to spare)."""
    from tbmesh.core.messages import ENDS, FIRST, LAST, DiskState
    from tbmesh.core.planner import plan_layers
    from tbmesh.core.presets import preset_spec
    from tbmesh.core.replicas import keep_on_disk
    from tbmesh.core.types import LinkInfo, NodeInfo

    model = preset_spec("kimi-k2-thinking")
    usable = 384 * 10**9
    nodes = [NodeInfo(f"studio{i}", f"studio{i}", memory_total=512 * 10**9, memory_usable=usable) for i in range(1, 5)]
    links = [LinkInfo(a.id, b.id, 80e9 / 8, 50e-6) for i, a in enumerate(nodes) for b in nodes[i + 1:]]
    placement = plan_layers(model, nodes, links, context=8192)
    assert placement.fits, placement.reason
    plan = placement.stamp(1, 1, model.name)
    shard = {s.node: s.bytes for s in plan.stages}
    # the first Mac pulled the whole model from the hub; the others start with nothing
    disks = {n.id: DiskState(model.name, spec=model, free=2 * 10**12) for n in nodes[1:]}
    disks[nodes[0].id] = DiskState(model.name, spec=model, layers=((0, model.num_layers),), ends=ENDS)
    copies = {k.node: k for k in keep_on_disk(model, disks, plan.stages, replicas=2)}

    def copy_bytes(node: str) -> int:
        keep = copies.get(node)
        if keep is None:
            return 0
        return sum(sum(model.layer_bytes[a:b]) for a, b in keep.layers) + \
            (model.embed_bytes if FIRST in keep.ends else 0) + (model.head_bytes if LAST in keep.ends else 0)

    on_disk = {n.id: model.weight_bytes if n.id == nodes[0].id else shard[n.id] + copy_bytes(n.id) for n in nodes}
    return {"mode": "kimi", "model": model.name, "model_gb": model.weight_bytes / 1e9,
            "full_copies_gb": 4 * model.weight_bytes / 1e9,
            "shard_gb": {n: round(b / 1e9, 1) for n, b in shard.items()},
            "with_copies_gb": {n: round(b / 1e9, 1) for n, b in on_disk.items()},
            "total_with_copies_gb": sum(on_disk.values()) / 1e9,
            "stages": [[s.node, s.start, s.end] for s in plan.stages]}


def join(rounds: int, work: Path) -> dict:
    """A Mac with no weights plugged into a serving one: cable plugged -> serving, in phases."""
    from daemons import DaemonProcess, serving_view, wait_for

    from tbmesh.testbed.tiny import make_tiny_model

    model = make_tiny_model(work / "join-model" / "tiny", layers=8, hidden=512, vocab=2048, intermediate=2048)
    phases = []
    fetched = 0
    for r in range(rounds):
        with netns.Lab() as lab:
            a, b = lab.add_mac("a"), lab.add_mac("b")
            cable = lab.cable(a, b)
            cable.shape("1gbit")
            cable.unplug()
            cluster = f"join{r}{os.getpid()}"
            args = ["--interface", "tb*", "--memory", "4GB", "--cluster", cluster, "--replicas", "1"]
            holder = DaemonProcess("a", work / f"join{r}" / "a", [*args, "--model", str(model)], mac=a)
            empty = DaemonProcess("b", work / f"join{r}" / "b", [*args, "--model", "tiny"], mac=b)
            try:
                holder.start()
                wait_for(lambda h=holder: serving_view([h]), 60, "a to serve alone")
                empty.start()
                plugged = time.time()
                cable.plug()
                wait_for(lambda h=holder, e=empty: serving_view([h, e]), 120, "a plan over both that both serve")
                log = empty.log()
            finally:
                holder.kill()
                empty.kill()
        marks = {"discovery": "INFO tbmesh: joined", "plan": "prepare epoch", "fetch": "fetched layers",
                 "load": "loaded layers", "serving": "plan epoch"}
        seen = {}
        for line in log.splitlines():
            for phase, mark in marks.items():
                if mark in line and phase not in seen and (phase != "serving" or "b " in line.split(mark)[1]):
                    seen[phase] = _log_time(line) - plugged
        fetched = int(re.search(r"fetching ([0-9.]+) MB", log).group(1).split(".")[0]) if "fetching" in log else 0
        phases.append(seen)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in seen.items()), flush=True)
    keys = list(phases[0])
    return {"mode": "join", "model_mb": sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6,
            "fetched_mb": fetched, "cable": "1gbit",
            "median_s": {k: statistics.median(p[k] for p in phases if k in p) for k in keys},
            "rounds": phases}


def _log_time(line: str) -> float:
    """The wall-clock time of a daemon's log line ("2026-12-03 05:19:13,181 INFO ...")."""
    stamp = " ".join(line.split(" ", 2)[:2])
    return time.mktime(time.strptime(stamp.split(",")[0], "%Y-%m-%d %H:%M:%S")) + int(stamp.split(",")[1]) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="loopback,1gbit,5gbit,join,kimi")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "weights.json"))
    args = parser.parse_args()
    modes = args.modes.split(",")
    if any(m != "loopback" for m in modes) and (reason := netns.unavailable_reason()):
        sys.exit(f"bench/weights.py: {reason}")
    work = Path(tempfile.mkdtemp(prefix="tbmesh-bench-weights-"))
    rows = []
    try:
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work shares them)")
        total, hashing, manifest = 0, 0.0, None
        if any(m in ("loopback", "1gbit", "5gbit") for m in modes):
            model = work / "model"
            total = write_checkpoint(model)
            started = time.perf_counter()
            manifest = build_manifest(model)
            hashing = time.perf_counter() - started
            print(f"checkpoint: {total / 1e9:.2f} GB in {FILES} files, {len(manifest.tensors)} tensors; "
                  f"manifest built (every tensor hashed) in {hashing:.2f} s = {total / hashing / 1e9:.2f} GB/s")
        for mode in modes:
            if mode == "kimi":
                row = kimi_disks()
                print(f"kimi      full model {row['model_gb']:.0f} GB on each of 4 Macs = {row['full_copies_gb']:.0f} GB; "
                      f"tbmesh: shards {row['shard_gb']} GB, with 2 copies of each layer {row['with_copies_gb']} GB "
                      f"(total {row['total_with_copies_gb']:.0f} GB)", flush=True)
                rows.append(row)
                continue
            if mode == "join":
                row = join(args.rounds, work)
                print(f"join      {row['fetched_mb']:.0f} MB fetched: " + ", ".join(
                    f"{k} {v:.2f} s" for k, v in row["median_s"].items()), flush=True)
                rows.append(row)
                continue
            if mode == "loopback":
                row = loopback(model, manifest, args.rounds, work)
                print(f"loopback  {row['bytes'] / 1e9:.2f} GB: fetch {row['fetch_gbyte_s']:.3f} GB/s, cp "
                      f"{row['cp_gbyte_s']:.3f} GB/s, sendfile copy {row['sendfile_gbyte_s']:.3f} GB/s, with "
                      f"sha256 {row['sendfile_sha256_gbyte_s']:.3f} GB/s; fetch/cp {row['fetch_over_cp']:.3f}, "
                      f"fetch/sendfile {row['fetch_over_sendfile']:.3f}, fetch/(sendfile+sha256) "
                      f"{row['fetch_over_sendfile_sha256']:.3f}; CPU s/GB {row['cpu_s_per_gb']}", flush=True)
            else:
                limit = 500 * MiB if mode == "1gbit" else 1 << 40
                row = shaped(model, manifest, mode, args.rounds, work, limit)
                rtt = row["control_rtt_ms"]
                print(f"{mode:>8s}  {row['bytes'] / 1e9:.2f} GB: fetch {row['fetch_gbit_s']:.3f} Gbit/s, probe "
                      f"{row['probe_gbit_s']:.3f} Gbit/s; fetch/probe {row['fetch_over_probe']:.3f}; a bare "
                      f"sendfile copy + sha256 on the cable {row['sendfile_sha256_gbit_s']:.3f} Gbit/s, fetch/that "
                      f"{row['fetch_over_sendfile_sha256']:.3f}; control "
                      f"round trips idle {rtt['idle_median']:.2f} ms, while fetching median "
                      f"{rtt['fetching_median']:.2f} p99 {rtt['fetching_p99']:.2f} max {rtt['fetching_max']:.2f} ms",
                      flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **provenance(),
        "method": "median of N rounds; loopback against cp and a bare sendfile socket copy of the same bytes, "
                  "shaped cables against tbmesh's link probe on the same cable, all in the same run",
        "checkpoint_bytes": total, "tensors": len(manifest.tensors) if manifest else 0,
        "manifest_build_s": round(hashing, 3),
        "chunk": bulk.CHUNK, "pipeline_bytes": bulk.PIPELINE_BYTES, "recv_buffer": bulk.RECV_BUFFER,
        "cpus": os.cpu_count(), "load_average_after": os.getloadavg(), "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
