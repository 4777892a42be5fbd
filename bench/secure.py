"""What a cluster secret costs: every connection TLS 1.3 keyed from it, against plain TCP.

Each figure is measured with the secret off and on in the same run, rounds interleaved (off,
on, off, on, ...), so that the load of this shared machine drifts over both alike.

  control   a round trip of a Heartbeat between two peers.Channel connections on loopback
            (dial + answer, the daemon's own code): one side sends, the other answers at once;
            and the same for an 8 KiB tensor frame (a 1x1x2048 float32 hidden state)
  decode    tokens/s of one greedy streamed answer through 3 `tbmesh daemon` stages on
            loopback (bench/inference.py's Cluster and stream), both clusters up at once;
            their answers are checked equal
  bulk      (root) a fetch of ~0.5 GB of weight objects across a veth cable shaped to
            1 Gbit/s with tc tbf (bench/weights.py's checkpoint, server and fetch), against
            tbmesh's own link probe on the cable (plain) in the same run

    [sudo] .venv/bin/python bench/secure.py [--rounds 5] [--modes control,decode,bulk]
                                            [--out bench/results/secure.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the lab harness and the daemon helpers live with the tests
sys.path.insert(0, str(ROOT / "bench"))

from provenance import provenance  # noqa: E402
from tbmesh.core.messages import Heartbeat  # noqa: E402
from tbmesh.net import peers, wire  # noqa: E402

SECRET = b"bench secret"
MODES = ("control", "decode", "bulk")


def me(node: str, secret: bytes | None) -> peers.Me:
    return peers.Me(node, 1, node, "bench", f"machine-{node}", secret)


# --- control ---------------------------------------------------------------------------------------


async def _pair(secret: bytes | None) -> tuple[peers.Channel, peers.Channel, asyncio.Server]:
    answered: asyncio.Queue = asyncio.Queue()

    async def on_accept(reader, writer):
        await answered.put(await peers.answer(reader, writer, me("b", secret)))

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    dialled = await peers.dial("127.0.0.1", server.sockets[0].getsockname()[1], me("a", secret))
    return dialled, await answered.get(), server


async def _round_trips(secret: bytes | None, message: Any, count: int) -> list[float]:
    dialled, answered, server = await _pair(secret)

    async def echo():
        async for received in answered.messages():
            answered.send(received)

    echoing = asyncio.create_task(echo())
    incoming = dialled.messages()
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            dialled.send(message)
            await incoming.__anext__()
            times.append(time.perf_counter() - started)
    finally:
        dialled.close()
        answered.close()
        echoing.cancel()
        server.close()
    return times


def control(rounds: int, count: int = 2000) -> dict:
    import numpy as np

    messages = {"heartbeat": Heartbeat("a", 1, 1, 1.0, 1.0, 0.0, 0),
                "tensor_8KiB": wire.tensor_from_array(np.zeros((1, 1, 2048), np.float32), "r", 1)}
    result: dict[str, Any] = {}
    for name, message in messages.items():
        runs: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(rounds):
            for side, secret in (("off", None), ("on", SECRET)):
                times = asyncio.run(_round_trips(secret, message, count))
                runs[side].append(statistics.median(times[count // 10:]))  # past a warm-up
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        result[name] = {"rtt_us_off": round(off * 1e6, 1), "rtt_us_on": round(on * 1e6, 1),
                        "on_over_off": round(on / off, 3),
                        "rounds_us": {k: [round(v * 1e6, 1) for v in vs] for k, vs in runs.items()}}
    return result


# --- decode ----------------------------------------------------------------------------------------


def decode(rounds: int, work: Path, tokens: int = 64) -> dict:
    from inference import Cluster, model_dir, stream

    path = model_dir(12, 256, 512)
    clusters = {"off": Cluster(3, path, work / "off"), "on": Cluster(3, path, work / "on", ["--secret", SECRET.decode()])}
    prompt = list(range(5, 25))
    try:
        for cluster in clusters.values():
            for daemon in cluster.daemons:
                daemon.launch()
        for cluster in clusters.values():
            for daemon in cluster.daemons:
                daemon.wait_started()
            cluster.serving()
        rates: dict[str, list[float]] = {"off": [], "on": []}
        texts: dict[str, set[str]] = {"off": set(), "on": set()}
        for _ in range(rounds + 1):  # the first round warms both up and is not counted
            for side, cluster in clusters.items():
                sent, times, text, usage = stream(cluster.entry, cluster.model, prompt, tokens)
                texts[side].add(text)
                rates[side].append((len(times) - 1) / (times[-1] - times[0]))
        assert texts["off"] == texts["on"] and len(texts["on"]) == 1, texts
        off, on = statistics.median(rates["off"][1:]), statistics.median(rates["on"][1:])
        return {"model": path.name, "stages": 3, "tokens": tokens, "tok_s_off": round(off, 2),
                "tok_s_on": round(on, 2), "on_over_off": round(on / off, 3),
                "rounds_tok_s": {k: [round(v, 2) for v in vs[1:]] for k, vs in rates.items()}}
    finally:
        for cluster in clusters.values():
            cluster.stop()


# --- bulk ------------------------------------------------------------------------------------------


def bulk_fetch(rounds: int, work: Path, rate_name: str = "1gbit", limit: int = 500 << 20) -> dict:
    import netns
    import weights as wb

    from tbmesh.weights.manifest import build_manifest
    from tbmesh.weights.store import Local, Store

    model = work / "model"
    wb.write_checkpoint(model)
    manifest = build_manifest(model)
    wanted, _ = wb.first_objects(manifest, limit)
    with netns.Lab() as lab:
        a, b = lab.add_mac("a"), lab.add_mac("b")
        cable = lab.cable(a, b, rate=rate_name)
        addr = cable.addr(b)
        server_loop, client_loop = wb.Loop(b.netns), wb.Loop(a.netns)
        servers = {side: wb.Server(server_loop, Local(manifest, model, Store(work / f"store-{side}")), addr,
                                   me=me("server", secret))
                   for side, secret in (("off", None), ("on", SECRET))}
        probes: list[float] = []
        fetches: dict[str, list[dict]] = {"off": [], "on": []}
        try:
            for _ in range(rounds):
                probes.append(asyncio.run(wb._probe(a, b, addr)))
                for side, secret in (("off", None), ("on", SECRET)):
                    fetches[side].append(wb.fetch_round(servers[side], client_loop, wanted, work,
                                                        client=me("client", secret)))
        finally:
            for server in servers.values():
                server.close()
            server_loop.close()
            client_loop.close()
    probe_rate = statistics.median(probes)
    off, on = wb.rate(fetches["off"]), wb.rate(fetches["on"])
    return {"cable": rate_name, "bytes": fetches["off"][0]["bytes"],
            "probe_gbit_s": round(probe_rate * 8 / 1e9, 4),
            "fetch_gbit_s_off": round(off * 8 / 1e9, 4), "fetch_gbit_s_on": round(on * 8 / 1e9, 4),
            "on_over_probe": round(on / probe_rate, 3), "off_over_probe": round(off / probe_rate, 3),
            "on_over_off": round(on / off, 3),
            "cpu_s_per_gb": {side: round(wb.cpu_per_gb(f), 3) for side, f in fetches.items()},
            "rounds": fetches}


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "secure.json")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}: use {', '.join(MODES)}")
    if "bulk" in modes and os.geteuid() != 0:
        parser.error("bulk needs root (network namespaces): sudo .venv/bin/python bench/secure.py")
    work = Path(tempfile.mkdtemp(prefix="tbmesh-bench-secure-"))
    result: dict[str, Any] = {**provenance(), "machine": platform.machine(), "cpus": os.cpu_count(), "rounds": args.rounds,
                              "load_before": os.getloadavg()}
    try:
        if "control" in modes:
            result["control"] = control(args.rounds)
            print("control round trip (us):", json.dumps({k: (v["rtt_us_off"], v["rtt_us_on"], v["on_over_off"])
                                                          for k, v in result["control"].items()}))
        if "decode" in modes:
            result["decode"] = decode(args.rounds, work)
            d = result["decode"]
            print(f"decode through 3 stages: {d['tok_s_off']} tok/s off, {d['tok_s_on']} on, {d['on_over_off']}x")
        if "bulk" in modes:
            result["bulk"] = bulk_fetch(args.rounds, work)
            b = result["bulk"]
            print(f"bulk over a {b['cable']} cable: probe {b['probe_gbit_s']} Gbit/s, fetch {b['fetch_gbit_s_off']} off, "
                  f"{b['fetch_gbit_s_on']} on ({b['on_over_probe']}x of the probe, {b['on_over_off']}x of off)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # keep the modes this run did not measure
        result = {**json.loads(args.out.read_text()), **result}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
