"""What tensor parallelism buys a group of Macs: a decode cost model. A PROJECTION, not a
measurement: no Mac ran it here; its two free constants are calibrated on published figures.

Decoding one token for one request reads every weight it uses once, so a Mac's time is
bytes / memory bandwidth, and a step over the network costs latency + bytes / link bandwidth:

    compute(B)     = B / (BANDWIDTH x efficiency)
    hop            = sync + latency + A / link_bandwidth
    all_reduce(N)  = sync + rounds(N) x latency + share(N) x A / link_bandwidth
    pipeline of N  = compute(W_split + W_whole) + (N - 1) x hop
    tensor of N    = compute(W_split / N + W_whole) + 2 x L x all_reduce(N)
    speed-up       = pipeline of N / tensor of N        (the same N Macs, the same link)

W: the weight bytes one token reads (an MoE reads its shared parts and the active experts
only); W_split what a group's members divide among themselves, W_whole what each of them
reads anyway (mlx-lm's `shard` leaves the output head, the router and MLA's down-projections
whole); L layers; A one hidden state (hidden x 2 bytes); 2 all-reduces per layer (after the
attention's output projection and after the MLP's). jaccl's mesh all-reduce is 1 round, each
member sending its A to every other over its own cable (share 1); MLX's TCP ring takes
2(N-1) rounds of A/N each (share 2(N-1)/N). `sync` is what MLX adds to each collective or
hand-over beyond the wire (a GPU-CPU synchronisation).

More latency (on the wire or in `sync`) adds (N - 1) to the pipeline's time for each 2 L
rounds(N) it adds to the group's, so it lowers the speed-up wherever the speed-up exceeds
(N - 1) / (2 L rounds(N)), far below 1: it never makes a group worth choosing over a pipeline.

Calibration (`calibration()`): the free constants are the efficiency and `sync`. exo
publishes "up to 1.8x speedup on 2 devices and 3.2x speedup on 4 devices" (exo README,
Tensor Parallelism) for Qwen3-235B, DeepSeek v3.1 and Kimi-K2-Thinking on M3 Ultra Mac
Studios over Thunderbolt 5 RDMA. Speed-ups alone fix only the ratio of `sync` to compute,
so the efficiency comes from an absolute figure: Kimi-K2-Thinking at 28.3 tokens/s on 4
Studios with exo over RDMA (Jeff Geerling's December 2025 benchmark, quoted in exo's README
benchmarks and by snackonai.com, 2026-04-19). Solved exactly on the 2-Studio speed-up and
that rate, with exo's group taken as splitting every weight (W_whole = 0: mlx-lm's split
cannot reach 1.8x on Kimi at all, see below); the 4-Studio speed-up is the check (3.28x
against 3.2x). The result: efficiency 0.36 of 819 GB/s, sync 48 us.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tbmesh.core.presets import preset_spec
from tbmesh.core.types import ModelSpec

GB = 1e9
M3_ULTRA_BANDWIDTH = 819 * GB  # bytes/s of memory bandwidth (Apple's M3 Ultra specification)
BF16 = 2  # bytes of an activation or an unquantized weight


@dataclass(frozen=True)
class Link:
    """The cables of a group, as a collective sees them."""

    name: str
    latency_s: float  # one message, one way, on the wire and the transport's stack
    bytes_per_s: float
    mesh: bool  # every two members cabled, 1-round all-reduce (jaccl); else MLX's TCP ring

    def rounds(self, n: int) -> int:
        return 1 if self.mesh else 2 * (n - 1)

    def share(self, n: int) -> float:
        """Hidden states' worth of bytes each member sends per all-reduce, one after the other."""
        return 1.0 if self.mesh else 2 * (n - 1) / n


# "single digit microseconds" (Alex Cheema, exo); about 3 us measured (NetworkChuck, 2025-12);
# 7.4 GB/s between two nodes with JACCL (zingnex.cn, 2026-04-07).
TB5_RDMA = Link("Thunderbolt 5, RDMA (jaccl)", 3e-6, 7.4 * GB, mesh=True)
# IP over Thunderbolt 4 (40 Gb/s), MLX's ring over TCP: tens of microseconds a message.
TB4_TCP = Link("Thunderbolt 4, TCP (ring)", 50e-6, 2.5 * GB, mesh=False)


@dataclass(frozen=True)
class Work:
    """What one decoded token reads and sends, as a tensor group divides it."""

    layers: int
    hidden_bytes: int  # one hidden state
    split_bytes: float  # weights read per token that a group's members divide among themselves
    whole_bytes: float = 0.0  # weights every member reads anyway

    @property
    def weight_bytes(self) -> float:
        return self.split_bytes + self.whole_bytes


@dataclass(frozen=True)
class Calibration:
    efficiency: float  # share of the memory bandwidth a decode achieves
    sync_s: float  # MLX's cost of one collective or hand-over beyond the wire
    bandwidth: float = M3_ULTRA_BANDWIDTH


def compute_s(nbytes: float, cal: Calibration) -> float:
    return nbytes / (cal.bandwidth * cal.efficiency)


def hop_s(work: Work, link: Link, cal: Calibration) -> float:
    return cal.sync_s + link.latency_s + work.hidden_bytes / link.bytes_per_s


def all_reduce_s(work: Work, n: int, link: Link, cal: Calibration) -> float:
    return cal.sync_s + link.rounds(n) * link.latency_s + link.share(n) * work.hidden_bytes / link.bytes_per_s


def pipeline_s(work: Work, n: int, link: Link, cal: Calibration) -> float:
    """Seconds per token through a pipeline of n Macs (one request: one stage works at a time)."""
    return compute_s(work.weight_bytes, cal) + (n - 1) * hop_s(work, link, cal)


def tensor_s(work: Work, n: int, link: Link, cal: Calibration) -> float:
    """Seconds per token on a tensor-parallel group of n Macs."""
    if n == 1:
        return compute_s(work.weight_bytes, cal)
    return compute_s(work.split_bytes / n + work.whole_bytes, cal) + 2 * work.layers * all_reduce_s(work, n, link, cal)


def speedup(work: Work, n: int, link: Link, cal: Calibration | None = None) -> float:
    """How much faster n Macs decode as one tensor group than as a pipeline (a projection)."""
    cal = cal or calibration()
    return pipeline_s(work, n, link, cal) / tensor_s(work, n, link, cal)


# --- the models' work ----------------------------------------------------------------


def decode_work(preset: str, split_all: bool = False) -> Work:
    """A preset's Work per token (see spec_work)."""
    return spec_work(preset_spec(preset), split_all)


def spec_work(spec: ModelSpec, split_all: bool = False) -> Work:
    """What one token of `spec` reads: the layers' `read_bytes` (an MoE reads its active experts
    only) and the head (the embedding: one row a token, nothing). W_whole is what mlx-lm's
    `shard` leaves whole: the output head, and in each layer its `whole_bytes` (norms, the MoE
    router, MLA's down-projections); nothing when `split_all`."""
    read = (spec.read_bytes or sum(spec.layer_bytes)) + spec.head_bytes
    hidden = spec.hidden_size * BF16
    if split_all:
        return Work(spec.num_layers, hidden, read)
    whole = spec.whole_bytes + spec.head_bytes
    return Work(spec.num_layers, hidden, read - whole, whole)


# --- calibration ---------------------------------------------------------------------

EXO_SPEEDUP = {2: 1.8, 4: 3.2}  # exo README: "up to 1.8x speedup on 2 devices and 3.2x ... on 4"
KIMI_4_STUDIOS_TOKENS_PER_S = 28.3  # Kimi-K2-Thinking, exo over RDMA, 4 M3 Ultra (Jeff Geerling)


@functools.cache
def calibration() -> Calibration:
    """The efficiency and sync that make a fully split Kimi-K2-Thinking group on TB5 RDMA
    decode 1.8x faster than a pipeline on 2 Studios, and at 28.3 tokens/s on 4.

    With u = one all-reduce (= one hop on the mesh) and C = compute of the whole token:
      C + u = 1.8 (C/2 + 2 L u)  and  C/4 + 2 L u = 1 / 28.3  ->  C and u in closed form.
    """
    work = decode_work("kimi-k2-thinking", split_all=True)
    s2, t4, layers = EXO_SPEEDUP[2], 1 / KIMI_4_STUDIOS_TOKENS_PER_S, work.layers
    ratio = (1 - s2 / 2) / (2 * layers * s2 - 1)  # u / C
    c = t4 / (1 / 4 + 2 * layers * ratio)
    u = ratio * c
    wire = TB5_RDMA.latency_s + work.hidden_bytes / TB5_RDMA.bytes_per_s
    return Calibration(efficiency=work.weight_bytes / (M3_ULTRA_BANDWIDTH * c), sync_s=u - wire)


def projection(preset: str = "kimi-k2-thinking", sizes: tuple[int, ...] = (2, 4)) -> list[str]:
    """The projected speed-ups, one line each, labelled as such."""
    cal = calibration()
    lines = [(f"PROJECTION (cost model calibrated on exo's published figures: efficiency {cal.efficiency:.3f} "
              f"of {cal.bandwidth / GB:.0f} GB/s, sync {cal.sync_s * 1e6:.1f} us per collective)")]
    for split_all, how in ((False, "mlx-lm's shard (head, router, MLA down-projections whole)"),
                           (True, "every weight split (as calibrated on exo)")):
        work = decode_work(preset, split_all)
        for link in (TB5_RDMA, TB4_TCP):
            for n in sizes:
                lines.append(f"{preset}, {n} M3 Ultra, {link.name}, {how}: {speedup(work, n, link, cal):.2f}x "
                             f"the pipeline ({1 / tensor_s(work, n, link, cal):.1f} vs "
                             f"{1 / pipeline_s(work, n, link, cal):.1f} tokens/s)")
    return lines


if __name__ == "__main__":  # python -m tbmesh.core.tensor_cost
    print("\n".join(projection()))
