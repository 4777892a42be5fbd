"""The layers this node holds, as the keeper (keeper.py) decides: loading them (in the MLX
thread, with the steps queued meanwhile run between two layers of the load), fetching what
our disk lacks from peers first (in a thread of its own, each run of layers loaded as it
arrives), forming the tensor groups we are a member of (group.py), and letting layers go.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tbmesh.core.assignment import Assignment, Range
from tbmesh.core.messages import Fetching, ShardState
from tbmesh.core.types import Plan, Stage
from tbmesh.runtime.shard import Kept, LoadAbandoned, Shard, load_shard
from tbmesh.serving import keeper as k
from tbmesh.serving.counters import Counters
from tbmesh.serving.disk import Disk
from tbmesh.serving.group import GroupShard, start_group, watch
from tbmesh.serving.host import Host
from tbmesh.serving.keeper import Keeper
from tbmesh.serving.mlx_thread import MlxThread
from tbmesh.serving.steps import Steps
from tbmesh.weights.manifest import TensorEntry

log = logging.getLogger(__name__)

GROUP_RETRY_S = 0.5  # how often a group load waiting for a member's connection tries again
FETCH_RETRY_S = 0.5  # how often a load waiting for the model's manifest tries again
EARLY_RUNS = 4  # a stage's fetch is split in this many runs of layers, each loaded as it arrives


@dataclass
class Forming:
    """A group forming for layers this node serves alone now (Layers._reshape)."""

    stage: Stage
    epoch: int
    shard: GroupShard | None = None  # once every member has loaded its share
    failed: str = ""


class Layers:
    def __init__(self, host: Host, model_dir: Path | None, disk: Disk | None, thread: MlxThread,
                 held: dict[Range, Shard | GroupShard], steps: Steps, dropped: Callable[[Range], None],
                 counters: Counters) -> None:
        self.host = host
        self.me = host.me
        self.model_dir = model_dir
        self.model_name = model_dir.name if model_dir is not None else None
        self.disk = disk  # the model's weights on our disk, and what to fetch from peers
        self.thread = thread
        self.held = held  # a group stage's: our rank's worker
        self.steps = steps
        self.dropped = dropped  # layers went: the routes from them go too
        self.counters = counters
        self.keeper = Keeper()
        self.closed = False
        self.in_use: set[Range] = set()  # the caches' layers in use, as of the last change in the thread
        self._wake: Any = None  # the timer of the keeper's next WakeAt
        self._fetch_share: dict[Range, float] = {}  # of a load's progress that was fetching
        self._early: dict[Range, Shard] = {}  # layers of a load under way loaded as they arrived (thread's)
        self._forming: Forming | None = None  # a group forming for layers we serve alone (_reshape)
        self._generation = 0  # bumped when the loads under way are to be ignored (see follow)
        self._loading_as: tuple | None = None  # the shape of the stage under way (_shape)

    def follow(self, plan: Plan | None, preparing: Plan | None) -> None:
        """The running plan or the one being prepared changed: hold what they want of us."""
        view = self.host.view()
        assignment = Assignment.of(self.me, self.model_name, plan, preparing, view.model,
                                   view.memory_usable, view.context)
        formed = self._reshape(assignment)
        stale = set()  # layers held (or loading) one way that the new plan wants another
        for stage, epoch in ((assignment.prepare, assignment.prepare_epoch), (assignment.serve, assignment.serve_epoch)):
            layers = (stage.start, stage.end) if stage is not None and stage is not formed else None
            if layers in self.held and _group_of(self.held[layers]) != stage.group:
                stale.add(layers)
            if layers == self.keeper.loading and self._loading_as not in (None, _shape(stage, epoch)):
                stale.add(layers)
                self._generation += 1  # what the load under way finds is dropped
        self._keep(self.keeper.assign(assignment, time.monotonic(), self.in_use, frozenset(stale)))

    def observe(self, in_use: set[Range]) -> None:
        """The caches changed: layers no request uses any more may go now."""
        if in_use != self.in_use:
            self.in_use = in_use
            self._keep(self.keeper.tick(time.monotonic(), in_use))

    def damaged(self, layers: Range, tensor: str) -> None:
        """Our held `layers` computed NaN or inf and hold a weight that is not finite: they go,
        published as a load that failed, so the leader plans without us; they are read from
        disk again when tried again (and a load refuses weights that are not finite)."""
        why = (f"{tensor} of layers {layers[0]}-{layers[1] - 1} holds values that are not finite (NaN or inf) "
               f"in {self.host.name}'s memory")
        log.error("%s: letting the layers go", why)
        self.host.record("damaged", self.me, why)
        self._keep(self.keeper.damaged(layers, why, time.monotonic(), self.in_use))

    def close(self) -> None:
        self.closed = True
        self.keeper.loading = None  # a load under way stops at its next layer
        for shard in [*self.held.values(), self._forming and self._forming.shard]:
            if isinstance(shard, GroupShard):
                shard.stop()

    def _name(self, node: str) -> str:
        return self.host.view().name(node)

    # ----- the keeper's actions ----------------------------------------------------------

    def _keep(self, actions: list[k.Action]) -> None:
        for action in actions:
            if isinstance(action, k.Load):
                self._load(action.target, action.tight)
            elif isinstance(action, k.Drop):
                self._drop(action.layers)
            elif isinstance(action, k.Publish):
                self.host.shard_changed(self._as_published(action.state))
            elif isinstance(action, k.WakeAt):
                self._wake_at(action.at)

    def _wake_at(self, at: float) -> None:
        delay = max(0.0, at - time.monotonic())
        if self._wake is not None and self._wake.when() <= self.host.loop.time() + delay:
            return
        if self._wake is not None:
            self._wake.cancel()

        def wake() -> None:
            self._wake = None
            self._keep(self.keeper.tick(time.monotonic(), self.in_use))

        self._wake = self.host.loop.call_later(delay, wake)

    def _drop(self, layers: Range) -> None:
        if isinstance(shard := self.held.pop(layers, None), GroupShard):
            shard.stop()
        self._held_changed()
        log.info("dropped layers %d-%d", layers[0], layers[1] - 1)
        self.dropped(layers)

    def _held_changed(self) -> None:
        """What our disk lacks of the held shards, peers may fetch from memory (Disk.hold)."""
        if self.disk is not None:
            self.disk.hold(self.held.values())

    # ----- loading ---------------------------------------------------------------------

    def _load(self, target: Range, tight: bool) -> None:
        stage, epoch = self._stage_for(target)
        self._loading_as = _shape(stage, epoch)
        disk = self.disk
        missing = disk.missing(*target) if disk is not None else []
        if missing is None:  # we do not know the model's tensors yet: its manifest is on its way
            self.host.loop.call_later(FETCH_RETRY_S, self._load_again, target, tight)
            return
        if missing:
            self._fetch(target, tight, missing)
            return
        if stage is not None and stage.group:
            self._load_group(target, stage, epoch)
            return
        generation = self._generation
        # tight: hold on to the parts the target reuses only, so the rest is freed before reading
        keep: list[Shard | Kept] = [shard.parts_for(*target) if tight else shard for shard in self.held.values()
                                    if isinstance(shard, Shard)]
        share = self._fetch_share.pop(target, 0.0)
        tensors = disk.tensors(*target) if disk is not None else None

        def on_layer(done: int, total: int) -> bool:
            self.host.loop.call_soon_threadsafe(self._progressed, target, share + (1 - share) * done / total)
            self.thread.run_queued()  # steps of requests in flight go between layers
            return self.keeper.loading == target and self._generation == generation

        def load() -> Shard:  # in the thread, after the loads of the layers fetched first
            early = self._early.pop(target, None)
            return load_shard(self.model_dir, *target, keep=keep + ([early] if early else []),
                              on_layer=on_layer, tensors=tensors)

        def done(shard: Shard | None, error: BaseException | None) -> None:
            if self._generation == generation:
                self._loaded(target, shard, error)

        self.thread.submit(load, done, long=True)

    def _stage_for(self, target: Range) -> tuple[Stage | None, int]:
        """Our stage of the assignment whose layers are `target`, and its plan's epoch."""
        assignment = self.keeper.assignment
        if assignment is not None:
            for stage, epoch in ((assignment.prepare, assignment.prepare_epoch),
                                 (assignment.serve, assignment.serve_epoch)):
                if stage is not None and (stage.start, stage.end) == target:
                    return stage, epoch
        return None, 0

    def _load_again(self, target: Range, tight: bool) -> None:
        if self.keeper.loading == target and not self.closed:
            self._load(target, tight)

    def _load_failure(self, error: BaseException) -> str:
        """Why a load failed, in one line for the cluster to read."""
        if not (self.model_dir is not None and self.model_dir.is_dir() and os.access(self.model_dir, os.R_OK)):
            return (f"the model directory {self.model_dir} is unreadable on {self.host.name} "
                    f"({type(error).__name__}: {error}): it loads no new layers until it is readable again, "
                    "and keeps serving the ones it holds while a plan uses them")
        return f"{type(error).__name__}: {error}"

    def _progressed(self, target: Range, progress: float) -> None:
        self._keep(self.keeper.progressed(target, progress))

    def _loaded(self, target: Range, shard: Shard | None, error: BaseException | None) -> None:
        now = time.monotonic()
        self._early.pop(target, None)
        if isinstance(error, LoadAbandoned):
            self.keeper.load_abandoned(target)
            self._keep(self.keeper.tick(now, self.in_use))
            return
        if error is not None:
            log.error("loading layers %d-%d failed: %r", target[0], target[1] - 1, error)
            self._keep(self.keeper.load_failed(target, self._load_failure(error), now, self.in_use))
            return
        self.held[target] = shard
        self._held_changed()
        counters = self.counters
        counters.peak_weight_bytes = max(counters.peak_weight_bytes, weight_bytes(self.held.values()))
        counters.loads += 1
        counters.layers_read += shard.read_layers
        counters.layers_kept += shard.kept_layers
        counters.bytes_read += shard.read_bytes
        log.info("loaded layers %d-%d (%.1f MB; %d layers read, %d kept)", target[0], target[1] - 1,
                 shard.weight_bytes / 1e6, shard.read_layers, shard.kept_layers)
        self._keep(self.keeper.loaded(target, now, self.in_use))
        self.steps.pump()

    def _load_early(self, target: Range, upto: int) -> None:
        """Load the layers of `target` fetched so far, [start, upto), while the rest arrive:
        the last load takes them as they are (as it takes a held shard's)."""
        assert self.disk is not None
        if self.keeper.loading != target:
            return
        start, tensors = target[0], self.disk.tensors(target[0], upto)

        def load() -> None:
            early = self._early.get(target)
            if self.keeper.loading != target:
                return
            shard = load_shard(self.model_dir, start, upto, keep=[early] if early else [],
                               on_layer=lambda *_: self.thread.run_queued() or True, tensors=tensors)
            if self.keeper.loading == target:
                self._early[target] = shard

        def done(_: Any, error: BaseException | None) -> None:
            if error is not None:  # the last load reads them again, and says why if it fails too
                log.warning("loading layers %d-%d early failed: %s", start, upto - 1, error)
                self._early.pop(target, None)

        self.thread.submit(load, done, long=True)

    # ----- fetching --------------------------------------------------------------------

    def _fetch(self, target: Range, tight: bool, missing: list[TensorEntry]) -> None:
        """Fetch the tensors of `target` our disk lacks from the peers whose disks hold them,
        in a thread of its own (the MLX thread keeps stepping), then load."""
        assert self.disk is not None
        disk, peers = self.disk, self.disk.peers()
        total = sum(e.object_size for e in missing)
        stage = self.host.view().model
        load_bytes = sum(stage.layer_bytes[target[0]:target[1]]) if stage is not None else total
        share = total / (total + load_bytes)  # progress counts fetched and loaded bytes alike
        self._fetch_share[target] = share
        started = time.monotonic()
        log.info("fetching %.1f MB for layers %d-%d from %s", total / 1e6, target[0], target[1] - 1,
                 ", ".join(p.name for p in peers) or "no peer")

        def progressed(done: int) -> None:  # in the fetch's threads
            self.host.loop.call_soon_threadsafe(self._fetch_progressed, target, done, total, started,
                                                tuple(p.node for p in peers))

        # in runs of layers, each loaded as soon as it is here while the next arrive (unless
        # tight: then the old stage goes first, and loading early would hold both)
        runs = [(target[1], missing)] if tight else _runs_of(missing, target)

        def stop() -> bool:
            return self.keeper.loading != target

        def run() -> None:
            report, error, before = None, None, 0
            try:
                for upto, entries in runs:
                    report = disk.fetch(entries, peers, lambda done, b=before: progressed(b + done), stop)
                    before += sum(e.object_size for e in entries)
                    if report.stopped:
                        break
                    if upto < target[1]:
                        self.host.loop.call_soon_threadsafe(self._load_early, target, upto)
            except Exception as failure:  # noqa: BLE001 (FetchFailed, a disk error: the load fails with it)
                report, error = None, failure
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self.host.loop.call_soon_threadsafe(self._fetched, target, tight, report, error)

        threading.Thread(target=run, name=f"fetch-{target[0]}-{target[1]}", daemon=True).start()

    def _fetch_progressed(self, target: Range, done: int, total: int, started: float,
                          sources: tuple[str, ...]) -> None:
        assert self.disk is not None
        before = self.disk.fetching
        if before is not None and before.done >= done:
            return  # calls from several threads may come in any order
        self.disk.fetching = Fetching(done, total, done / max(time.monotonic() - started, 1e-6), sources)
        if before is None or done * 10 // max(total, 1) > before.done * 10 // max(total, 1):  # in tenths
            self.host.disk_changed(self.disk.state())
        self._progressed(target, self._fetch_share.get(target, 0.0) * done / max(total, 1))

    def _fetched(self, target: Range, tight: bool, report: Any, error: BaseException | None) -> None:
        assert self.disk is not None
        self.disk.fetching = None
        self.host.disk_changed(self.disk.state())  # what we now hold, for peers that lack it too
        if self.keeper.loading != target:
            self._fetch_share.pop(target, None)
            self._early.pop(target, None)
            self.keeper.load_abandoned(target)
            self._keep(self.keeper.tick(time.monotonic(), self.in_use))
            return
        if error is not None:
            log.error("fetching layers %d-%d failed: %s", target[0], target[1] - 1, error)
            why = f"could not fetch layers {target[0]}-{target[1] - 1}: {error}"
            self._keep(self.keeper.load_failed(target, why, time.monotonic(), self.in_use))
            return
        log.info("fetched layers %d-%d: %s", target[0], target[1] - 1, report)
        self._load(target, tight)

    # ----- tensor groups ---------------------------------------------------------------

    def _load_group(self, target: Range, stage: Stage, epoch: int) -> None:
        """Load `target` as our rank of the group `stage` (the keeper's load)."""
        generation = self._generation

        def wanted() -> bool:  # read from the thread: a newer plan may want something else
            return self.keeper.loading == target and self._generation == generation and not self.closed

        if not self._form_group(stage, epoch, wanted,
                                lambda shard, error: self._group_started(target, generation, shard, error)):
            self.host.loop.call_later(GROUP_RETRY_S, self._load_again, target, False)

    def _form_group(self, stage: Stage, epoch: int, wanted: Callable[[], bool],
                    done: Callable[[GroupShard | None, BaseException | None], None]) -> bool:
        """Start our rank's worker of the group `stage` (tbmesh.serving.group) in a thread;
        done(shard, error) on the loop when every member's worker has loaded its share, or
        when it failed or wanted() turned false. False when a member is not connected (yet)."""
        target = (stage.start, stage.end)
        try:
            addresses, view = self.host.group_addresses(stage.group), self.host.view()
        except ConnectionError as error:  # a member just went (a new plan is coming) or is not here yet
            log.info("layers %d-%d wait for the group: %s", *target, error)
            return False
        log.info("starting rank %d of %s's group for layers %d-%d (epoch %d, %s)", stage.group.index(self.me),
                 "+".join(map(self._name, stage.group)), *target, epoch, ", ".join(addresses))

        def run() -> None:
            shard, error = None, None
            try:
                places = self.disk.places(*target) if self.disk is not None else None
                shard = start_group(self.model_dir, stage, epoch, self.me, addresses, self.host.name,
                                    lambda: not wanted(), places, view.rdma, view.names)
            except Exception as failure:  # noqa: BLE001 (GroupFailed, OSError: the load failed, saying why)
                error = failure
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self.host.loop.call_soon_threadsafe(done, shard, error)

        threading.Thread(target=run, name=f"group-{target[0]}-{target[1]}", daemon=True).start()
        return True

    def _group_started(self, target: Range, generation: int, shard: GroupShard | None,
                       error: BaseException | None) -> None:
        now = time.monotonic()
        if self.keeper.loading != target or self._generation != generation or self.closed:
            if shard is not None:  # a newer plan wants other layers (or these, another way)
                shard.stop()
            return
        if error is not None:
            log.error("the group for layers %d-%d failed to form: %s", *target, error)
            self._keep(self.keeper.load_failed(target, f"{type(error).__name__}: {error}", now, self.in_use))
            return
        assert shard is not None
        self._hold_group(target, shard)
        self._keep(self.keeper.loaded(target, now, self.in_use))
        self.steps.pump()

    def _hold_group(self, target: Range, shard: GroupShard) -> None:
        self.held[target] = shard
        self._held_changed()
        watch(shard, lambda s, status: self.host.loop.call_soon_threadsafe(self._group_exited, s, status))
        self.counters.loads += 1
        self.counters.layers_read += target[1] - target[0]
        self.counters.bytes_read += shard.weight_bytes
        self.counters.peak_weight_bytes = max(self.counters.peak_weight_bytes, weight_bytes(self.held.values()))
        log.info("rank %d of the group for layers %d-%d is ready (%.1f MB here)", shard.rank, *target,
                 shard.weight_bytes / 1e6)

    def _group_exited(self, shard: GroupShard, status: int) -> None:
        """Our rank's worker exited unasked: the group is gone (a member died, or the worker)."""
        target = (shard.stage.start, shard.stage.end)
        if self.held.get(target) is not shard or self.closed:
            return
        log.warning("the group of layers %d-%d ended (its worker exited with status %s)", *target, status)
        self.host.record("group-ended", None, f"layers {target[0]}-{target[1] - 1} of "
                         f"{'+'.join(map(self._name, shard.stage.group))}: a member is gone")
        self._keep(self.keeper.forget(target, time.monotonic(), self.in_use))

    # A Mac serving layers alone that the next plan gives a group it is in (the second Mac
    # joins): the keeper sees the same layers held, so we form the group ourselves while
    # the Mac keeps serving alone, report the stage not ready until the group is, and swap
    # at the commit (requests in flight then resume on the group, from their tokens so far).

    def _reshape(self, assignment: Assignment) -> Stage | None:
        """Form or swap in the group described above; the prepared stage it covers, if any."""
        prepare, serve = assignment.prepare, assignment.serve
        forming = self._forming
        if forming is not None and forming.shard is not None and (serve, assignment.serve_epoch) == \
                (forming.stage, forming.epoch):  # the commit: the group serves from now on
            self._forming = None
            target = (serve.start, serve.end)
            old = self.held.pop(target, None)
            self._hold_group(target, forming.shard)
            stage = (self.me, *target)
            self.steps.drop_caches(lambda route: stage not in route, groups=False)  # the alone stage's only
            log.info("layers %d-%d: the group serves them now (%s)", *target, "alone before" if old else "")
            return None
        alone = serve is not None and not serve.group and isinstance(self.held.get((serve.start, serve.end)), Shard)
        wanted = prepare if prepare is not None and prepare.group and alone and \
            (prepare.start, prepare.end) == (serve.start, serve.end) else None
        if forming is not None and (forming.stage, forming.epoch) != (wanted, assignment.prepare_epoch):
            self._forming = None  # the plan moved on: the thread sees it and stops the worker
            if forming.shard is not None:
                forming.shard.stop()
        if wanted is not None and self._forming is None:
            forming = self._forming = Forming(wanted, assignment.prepare_epoch)
            if not self._form_group(wanted, forming.epoch, lambda: self._forming is forming and not self.closed,
                                    lambda shard, error: self._formed(forming, shard, error)):
                self._forming = None  # tried again in a moment
                self.host.loop.call_later(GROUP_RETRY_S, self._reshape_again)
        return wanted

    def _reshape_again(self) -> None:
        if self.keeper.assignment is not None and not self.closed:
            self._reshape(self.keeper.assignment)

    def _formed(self, forming: Forming, shard: GroupShard | None, error: BaseException | None) -> None:
        if self._forming is not forming:
            if shard is not None:
                shard.stop()
            return
        if error is not None:
            log.error("the group for layers %d-%d failed to form: %s", forming.stage.start, forming.stage.end - 1, error)
            forming.failed = f"{type(error).__name__}: {error}"
        forming.shard = shard
        self.host.shard_changed(self._as_published(self.keeper.published))

    def _as_published(self, state: ShardState | None) -> ShardState | None:
        """The keeper's state, but a stage whose group is still forming is not ready (see above)."""
        forming = self._forming
        if state is None or forming is None or forming.shard is not None or \
                (state.start, state.end, state.epoch) != (forming.stage.start, forming.stage.end, forming.epoch):
            return state
        return replace(state, progress=0.0, failed=forming.failed)


def _runs_of(missing: list[TensorEntry], target: Range) -> list[tuple[int, list[TensorEntry]]]:
    """`missing` in runs of consecutive layers, about EARLY_RUNS of them: (the first layer
    after the run, the tensors to fetch for it); the ends come with the first run."""
    start, end = target
    step = max(1, -(-(end - start) // EARLY_RUNS))
    runs = []
    for upto in range(start + step, end + step, step):
        upto = min(upto, end)
        entries = [e for e in missing if (e.layer is None and upto - step <= start) or
                   (e.layer is not None and upto - step <= e.layer < upto)]
        if upto == end:  # whatever is left (the last stage's head)
            taken = {id(e) for _, run in runs for e in run} | {id(e) for e in entries}
            entries += [e for e in missing if id(e) not in taken]
        runs.append((upto, entries))
    return [(upto, entries) for upto, entries in runs if entries]


def weight_bytes(shards: Any) -> int:
    """Bytes of the held shards, counting a layer two of them share once."""
    from mlx.utils import tree_flatten

    seen: dict[int, int] = {}
    groups = 0
    for shard in shards:
        if isinstance(shard, GroupShard):
            groups += shard.weight_bytes  # our rank's share, in its worker
            continue
        for _, array in tree_flatten(shard.model.parameters()):
            seen[id(array)] = array.nbytes
    return sum(seen.values()) + groups


def _group_of(shard: Shard | GroupShard) -> tuple[str, ...]:
    return shard.stage.group if isinstance(shard, GroupShard) else ()


def _shape(stage: Stage | None, epoch: int) -> tuple:
    """How a stage is held: alone, or by a group incarnation (its members and plan epoch)."""
    return () if stage is None or not stage.group else (stage.group, epoch)
