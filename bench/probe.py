"""Bandwidth probe accuracy through tbf-shaped cables in the network-namespace lab (root).

For each MTU and tbf rate it runs several probes (tbmesh.net.probe, both ends in this
process on one event loop, as in the tests) and reports their median against:
  - the shaped rate (what `tc tbf rate` says; it counts whole Ethernet frames),
  - the TCP payload capacity, rate * (mtu - 52) / (mtu + 14), what any TCP transfer can
    get through such a cable,
  - the baseline measured in the same run on the same cable: a long plain bulk TCP
    transfer (blocking sockets, one sender and one receiver thread, all bytes from the first
    to the last at the receiver). iperf3 is not available here; this plays its part.
The unshaped row shows what this machine's Python stack itself can push through a veth.

    sudo .venv/bin/python bench/probe.py [--probes 5] [--reference-seconds 3]
                                         [--out bench/results/probe.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the lab harness lives with the tests

import netns  # noqa: E402
from provenance import provenance  # noqa: E402

from tbmesh.net.probe import plain, probe_receive, probe_send  # noqa: E402

RATES: list[str | None] = ["500mbit", "1gbit", "5gbit", None]
MTUS = [1500, 9000]


async def one_probe(a: netns.Mac, b: netns.Mac, cable: netns.Cable) -> tuple[float, float]:
    """(measured bits/s, wall seconds the probe took at the sender)."""
    (reader, writer), (server_reader, server_writer) = await netns.open_streams(a, b, cable.addr(b))
    receiving = asyncio.create_task(probe_receive(plain(server_reader, server_writer)))
    start = time.perf_counter()
    result = await probe_send(plain(reader, writer))
    elapsed = time.perf_counter() - start
    await receiving
    writer.close()
    server_writer.close()
    return result.bytes_per_s * 8, elapsed


def bulk_reference(a: netns.Mac, b: netns.Mac, cable: netns.Cable, seconds: float) -> float:
    """Bits/s of a plain bulk TCP transfer lasting `seconds`, timed at the receiver."""
    sender, conn = netns.connected_pair(a, b, cable.addr(b))
    got: dict[str, float] = {}

    def receive() -> None:
        buf = bytearray(1 << 20)
        total, first, last = 0, 0.0, 0.0
        while n := conn.recv_into(buf):
            last = time.perf_counter()
            first = first or last
            total += n
        got["rate"] = total * 8 / (last - first)

    thread = threading.Thread(target=receive)
    thread.start()
    zeros = memoryview(bytes(1 << 20))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sender.sendall(zeros)
    sender.close()
    thread.join()
    conn.close()
    return got["rate"]


def measure(a: netns.Mac, b: netns.Mac, cable: netns.Cable, rate: str | None,
            probes: int, reference_seconds: float) -> dict:
    cable.shape(rate)
    runs = [asyncio.run(one_probe(a, b, cable)) for _ in range(probes)]
    rates = [r for r, _ in runs]
    durations = [d for _, d in runs]
    reference = bulk_reference(a, b, cable, reference_seconds)
    median = statistics.median(rates)
    row: dict = {
        "mtu": cable.mtu,
        "rate": rate or "unshaped",
        "probes": probes,
        "probe_gbit_median": round(median / 1e9, 4),
        "probe_gbit_min": round(min(rates) / 1e9, 4),
        "probe_gbit_max": round(max(rates) / 1e9, 4),
        "probe_s_median": round(statistics.median(durations), 3),
        "probe_s_max": round(max(durations), 3),
        "reference_gbit": round(reference / 1e9, 4),
        "probe_over_reference": round(median / reference, 4),
    }
    if rate is not None:
        shaped = netns.parse_rate(rate)
        payload = shaped * netns.tcp_payload_fraction(cable.mtu)
        row["payload_capacity_gbit"] = round(payload / 1e9, 4)
        row["error_vs_rate_pct"] = round((median / shaped - 1) * 100, 2)
        row["error_vs_payload_pct"] = round((median / payload - 1) * 100, 2)
    return row


def print_row(row: dict) -> None:
    def pct(key: str) -> str:
        return f"{row[key]:+6.2f}%" if key in row else "     - "

    print(f"{row['mtu']:5d}  {row['rate']:>9s}  {row['probe_gbit_median']:7.3f}  "
          f"[{row['probe_gbit_min']:.3f}-{row['probe_gbit_max']:.3f}]  "
          f"{pct('error_vs_rate_pct')}  {pct('error_vs_payload_pct')}  "
          f"{row['probe_s_median']:5.3f}/{row['probe_s_max']:5.3f}  "
          f"{row['reference_gbit']:7.3f}  {row['probe_over_reference']:6.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--reference-seconds", type=float, default=3.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "probe.json"))
    args = parser.parse_args()
    reason = netns.unavailable_reason()
    if reason:
        sys.exit(f"bench/probe.py: {reason}")

    print("  mtu       rate  probe Gbit/s (median [min-max])  vs rate  vs payload  "
          "probe s med/max  reference Gbit/s  probe/ref")
    rows = []
    started = time.perf_counter()
    for mtu in MTUS:
        with netns.Lab() as lab:
            a, b = lab.add_mac("a"), lab.add_mac("b")
            cable = lab.cable(a, b, mtu=mtu)
            for rate in RATES:
                row = measure(a, b, cable, rate, args.probes, args.reference_seconds)
                rows.append(row)
                print_row(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        **provenance(),
        "method": "median of N probes (0.5 s, receiver-timed after a 20% warm-up) per tbf rate;"
                  " reference: plain bulk TCP through the same cable in the same run",
        "tbf": {rate: netns.tbf_args(netns.parse_rate(rate)) for rate in RATES if rate},
        "reference_seconds": args.reference_seconds,
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
