"""Cost of the wire protocol: encode + decode of tensor frames and control messages.

For a 1x1x2048 float32 hidden state (8 KiB) and an 8 MiB float32 tensor it measures, per
message, the median over many runs of:
  wire-numpy  tensor_from_array + encode, then FrameDecoder.feed (in 256 KiB reads, as the
              daemon reads a socket) + next_message + array_from_tensor(numpy, zero-copy)
  wire-mlx    the same from and to an MLX array (mx.array makes one more copy on arrival)
and two baselines measured in the same run: pickle (protocol 5, dumps + loads of the numpy
array) and copy (bytes() of the array's memory: one memcpy, the floor for any receiver that
owns its data). Also a Heartbeat and a 256-node LinkStates round trip, and their sizes.

    python bench/wire.py [--out bench/results/wire.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from tbmesh.core.messages import Adjacency, Heartbeat, LinkState, LinkStates
from tbmesh.core.types import NodeInfo, Plan, Stage
from tbmesh.net import wire

READ = 256 * 1024  # what the daemon asks of the socket per read


def median_us(fn: Callable[[], Any], runs: int) -> float:
    for _ in range(min(20, runs)):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def wire_round_trip(array: Any, lib: str) -> Callable[[], Any]:
    def run() -> Any:
        parts = wire.encode(wire.tensor_from_array(array, "req", 1))
        decoder = wire.FrameDecoder()
        for part in parts:
            view = memoryview(part)
            for i in range(0, view.nbytes, READ):
                decoder.feed(view[i:i + READ])
        out = wire.array_from_tensor(decoder.next_message(), lib)
        if lib == "mlx":
            mx.eval(out)
        return out
    return run


def tensor_case(shape: tuple[int, ...], runs: int) -> dict[str, Any]:
    array = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    mx_array = mx.array(array)
    mx.eval(mx_array)
    assert np.array_equal(wire_round_trip(array, "numpy")(), array)
    assert np.array_equal(np.array(wire_round_trip(mx_array, "mlx")()), array)
    figures = {
        "bytes": array.nbytes,
        "runs": runs,
        "wire_numpy_us": median_us(wire_round_trip(array, "numpy"), runs),
        "wire_mlx_us": median_us(wire_round_trip(mx_array, "mlx"), runs),
        "pickle_us": median_us(lambda: pickle.loads(pickle.dumps(array, protocol=5)), runs),
        "copy_us": median_us(lambda: bytes(memoryview(array).cast("B")), runs),
    }
    figures["wire_numpy_vs_pickle"] = figures["wire_numpy_us"] / figures["pickle_us"]
    figures["wire_numpy_vs_copy"] = figures["wire_numpy_us"] / figures["copy_us"]
    figures["wire_mlx_vs_pickle"] = figures["wire_mlx_us"] / figures["pickle_us"]
    return figures


def control_case(message: Any, runs: int) -> dict[str, Any]:
    def run() -> Any:
        return wire.decode(b"".join(wire.encode(message)))
    assert run() == message
    return {"bytes": sum(len(p) for p in wire.encode(message)), "runs": runs,
            "wire_us": median_us(run, runs),
            "pickle_us": median_us(lambda: pickle.loads(pickle.dumps(message)), runs)}


def big_link_states(n: int) -> LinkStates:
    ids = [f"{i:016x}" for i in range(n)]
    plan = Plan(3, 7, "kimi-k2-thinking", tuple(Stage(node, i, i + 1, 10**10) for i, node in enumerate(ids)))
    states = tuple(
        LinkState(node, 2, 40, NodeInfo(node, f"Mac Studio {i}", "Apple M3 Ultra", 512 << 30, 384 << 30, 2.8e13),
                  tuple(Adjacency(ids[(i + k) % n], False, 0.00012, 9.6e9) for k in (1, 2, 3, 4)),
                  3, ids[0], plan if i == 0 else None)
        for i, node in enumerate(ids))
    return LinkStates(ids[0], states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/wire.json")
    args = parser.parse_args()
    results = {
        "python": platform.python_version(), "machine": platform.machine(),
        "numpy": np.__version__, "mlx": mx.__version__,
        "hidden_1x1x2048_f32": tensor_case((1, 1, 2048), 3000),
        "tensor_8MiB_f32": tensor_case((2 * 2**20,), 60),
        "heartbeat": control_case(Heartbeat("0123456789abcdef", 3, 1234, 5678.25, 5678.2, 0.0004, 2**63), 3000),
        "link_states_256": control_case(big_link_states(256), 30),
    }
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        if "wire_numpy_us" in r:
            print(f"{name:22} {r['bytes']:>9} B  wire-numpy {r['wire_numpy_us']:9.1f} us  "
                  f"wire-mlx {r['wire_mlx_us']:9.1f} us  pickle {r['pickle_us']:9.1f} us  "
                  f"copy {r['copy_us']:8.1f} us  wire/pickle {r['wire_numpy_vs_pickle']:.2f}  "
                  f"wire/copy {r['wire_numpy_vs_copy']:.2f}")
        else:
            print(f"{name:22} {r['bytes']:>9} B  wire {r['wire_us']:9.1f} us  pickle {r['pickle_us']:9.1f} us")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
