"""Which Macs keep which layers on disk beyond their own stage, so that every layer stays on
at least `replicas` disks: the layers of a Mac that dies can still be fetched from another.
Pure: the leader computes it from the disk states its members publish and the plan.

A Mac's stage counts as on its disk (it fetches what it lacks before it loads), unless it
holds those layers in memory only (`DiskState.memory`: its disk lost them; it fetches
nothing). Memory is no copy: a layer there is copied to other disks, by members that do
not hold it in memory (they fetch it from the one that does). The copies still missing are
spread evenly over the members with room beyond their stage (`DiskState.free`), each taking
a contiguous run of layers where it can. A layer no member has room for stays short, and
`tbmesh status` says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tbmesh.core.messages import FIRST, LAST, DiskState, KeepOnDisk
from tbmesh.core.types import ModelSpec, Stage, ranges_of

REPLICAS = 2  # copies of each layer on the members' disks, when they have the room


def keep_on_disk(model: ModelSpec, disks: Mapping[str, DiskState], stages: Sequence[Stage],
                 replicas: int = REPLICAS) -> tuple[KeepOnDisk, ...]:
    """What each member must keep on disk besides its stage (only members that need to)."""
    disks = {n: d for n, d in disks.items() if d.model == model.name}
    # the ends as two more "layers": what the first stage reads beyond its layers, and the last
    ends = {-1: FIRST, -2: LAST}
    size = {i: b for i, b in enumerate(model.layer_bytes)} | {-1: model.embed_bytes, -2: model.head_bytes}
    holders: dict[int, set[str]] = {i: set() for i in size}
    in_memory: dict[int, set[str]] = {i: set() for i in size}  # they cannot fetch it: no copy
    for node, disk in disks.items():
        for i in range(model.num_layers):
            if disk.has(i, i + 1):
                holders[i].add(node)
            elif disk.serves(i, i + 1):
                in_memory[i].add(node)
        for i, end in ends.items():
            if end in disk.ends:
                holders[i].add(node)
            elif end in disk.memory_ends:
                in_memory[i].add(node)
    room = {n: d.free for n, d in disks.items()}  # beyond each one's stage
    for stage in stages:
        if stage.node not in disks:
            continue
        mine = list(range(stage.start, stage.end)) + [-1] * (stage.start == 0) + [-2] * (stage.end == model.num_layers)
        for i in mine:
            if stage.node not in in_memory[i]:
                holders[i].add(stage.node)  # it fetches what it lacks before it loads
    short = {i: replicas - len(holders[i]) for i in size if len(holders[i]) < replicas}
    kept: dict[str, list[int]] = {}
    for _ in range(replicas):  # one more copy of each short layer per round
        todo = [i for i in sorted(size, key=lambda i: (i < 0, i)) if short.get(i, 0) > 0]
        if not todo:
            break
        # Spread the round's bytes evenly over the members with room, in contiguous runs.
        able = sorted((n for n in disks if room[n] > 0), key=lambda n: (-room[n], n))
        quota = sum(size[i] for i in todo) / max(len(able), 1)
        given = dict.fromkeys(able, 0)
        for i in todo:
            fits = [n for n in able if n not in holders[i] and n not in in_memory[i] and room[n] >= size[i]]
            if not fits:
                continue
            best = next((n for n in fits if 0 < given[n] < quota), None) or min(fits, key=lambda n: given[n])
            holders[i].add(best)
            room[best] -= size[i]
            given[best] += size[i]
            short[i] -= 1
            kept.setdefault(best, []).append(i)
    return tuple(KeepOnDisk(n, ranges_of(sorted(i for i in layers if i >= 0)),
                            tuple(ends[i] for i in (-1, -2) if i in layers))
                 for n, layers in sorted(kept.items()))


def copies(model: ModelSpec, disks: Mapping[str, DiskState]) -> list[int]:
    """How many of the disks hold each layer."""
    held = [d for d in disks.values() if d.model == model.name]
    return [sum(d.has(i, i + 1) for d in held) for i in range(model.num_layers)]
