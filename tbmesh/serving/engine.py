"""The serving engine: the asyncio + MLX adapter that drives the pure parts of serving.

    conductor.py  the requests entering here (attempts, routes, retries)
    scheduler.py  stage 0 of a route: admission, lanes, chunked prefill, the prefix cache
    keeper.py     the layers this node holds, loads and lets go
    stage.py      one step over our layers, with the KV caches (MLX)

It carries out what they decide: messages to other nodes through the `Host` it is handed
(never the daemon itself), loads, and steps, all MLX work in one worker thread, in order,
so that the event loop (and the heartbeats) never wait for it. While the worker loads a
shard, the steps queued meanwhile run between two layers of the load. Stage 0's next step
is asked for whenever the worker has no step to run, so that a batch takes every request
ready at the last moment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from tbmesh.core.assignment import Assignment, Range
from tbmesh.core.generation import (
    BadRequest,
    GenerationParams,
    Sampling,
    TokenLogprobs,
    Unavailable,
)
from tbmesh.core.messages import Fetching, ShardState
from tbmesh.core.status import CacheFigures, EngineCounters, LoadingStatus, RuntimeStatus
from tbmesh.core.types import Plan, Stage
from tbmesh.net import wire
from tbmesh.runtime.shard import Kept, LoadAbandoned, Shard, load_shard
from tbmesh.serving import conductor as c
from tbmesh.serving import keeper as k
from tbmesh.serving.conductor import Conductor
from tbmesh.serving.disk import Disk
from tbmesh.serving.group import GroupShard, start_group, watch
from tbmesh.serving.host import Host
from tbmesh.serving.keeper import Keeper
from tbmesh.serving.messages import Admit, Member, Route, Step, route_of
from tbmesh.serving.scheduler import Scheduler
from tbmesh.serving.settings import ServingSettings
from tbmesh.serving.stage import Outcome, StageCaches
from tbmesh.serving.tensor_worker import GroupFailed
from tbmesh.serving.view import usable
from tbmesh.weights.manifest import TensorEntry

log = logging.getLogger(__name__)

GROUP_RETRY_S = 0.5  # how often a group load waiting for a member's connection tries again
POLL_S = 0.01  # how often requests waiting for a usable plan look at the view again
FETCH_RETRY_S = 0.5  # how often a load waiting for the model's manifest tries again
SCAN_EVERY_S = 60.0  # a held shard's weights are looked over for NaN at most this often (a prompt
                     # that overflows the model's dtype makes NaN again at every retry, on any Mac)

DataMessage = wire.Tensor | wire.Tokens | wire.Cancel


@dataclass
class Forming:
    """A group forming for layers this node serves alone now (Engine._reshape)."""

    stage: Stage
    epoch: int
    shard: GroupShard | None = None  # once every member has loaded its share
    failed: str = ""


@dataclass
class Counters:
    loads: int = 0  # shards loaded
    layers_read: int = 0  # layers read from disk
    layers_kept: int = 0  # layers a new shard took from one already in memory
    peak_weight_bytes: int = 0  # the most weight bytes held at once (at the end of a load)
    bytes_read: int = 0
    resumed: int = 0  # attempts started again on another route
    tokens: int = 0  # tokens streamed by this entry
    steps: int = 0  # steps this node's stages ran
    refused_nonfinite: int = 0  # rows of steps refused here: activations or outputs not finite


class Worker:
    """The one thread that runs MLX, in order. A long job (a load) runs the jobs queued
    meanwhile at its own pace (`run_queued`), never another long one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._jobs: collections.deque[tuple[bool, Callable[[], Any], Callable[[Any, BaseException | None], None]]] = \
            collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mlx", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None],
               long: bool = False) -> None:
        """Run fn() in the worker, then done(result, error) on the event loop."""
        with self._ready:
            self._jobs.append((long, fn, done))
            self._ready.notify()

    def stop(self) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()

    def run_queued(self) -> None:
        """From inside a long job: run the short jobs queued so far."""
        while True:
            with self._ready:
                job = next((j for j in self._jobs if not j[0]), None)
                if job is None:
                    return
                self._jobs.remove(job)
            self._call(job)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft()
            self._call(job)

    def _call(self, job: tuple[bool, Callable[[], Any], Callable[[Any, BaseException | None], None]]) -> None:
        _, fn, done = job
        try:
            result, error = fn(), None
        except BaseException as failure:  # noqa: BLE001  (the event loop side reads it)
            result, error = None, failure
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self.loop.call_soon_threadsafe(done, result, error)


class Engine:
    def __init__(self, host: Host, model_dir: Path | None, settings: ServingSettings = ServingSettings(),
                 disk: Disk | None = None) -> None:
        self.host = host
        self.me = host.me
        self.model_dir = model_dir
        self.disk = disk  # the model's weights on our disk, and what to fetch from peers
        self.model_name = model_dir.name if model_dir is not None else None
        self.settings = settings
        self.conductor = Conductor(self.me, settings.resume_wait, _new_id)
        self.scheduler = Scheduler(settings, _new_id)
        self.keeper = Keeper()
        self.caches = StageCaches(self.me, host.name)  # the worker's
        self.worker = Worker(host.loop)
        self.held: dict[Range, Shard | GroupShard] = {}  # a group stage's: our rank's worker
        self.counters = Counters()
        self._queues: dict[str, asyncio.Queue] = {}  # request -> what generate() yields
        self._tokenizer: Any = None
        self._busy = 0  # steps in the worker
        self._wake: asyncio.TimerHandle | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._recent_tokens: collections.deque[float] = collections.deque(maxlen=4096)
        self._in_use: set[Range] = set()  # caches.in_use(), as of the last change in the worker
        self._figures = self.caches.figures()  # as of the last change in the worker
        self._fetch_share: dict[Range, float] = {}  # of a load's progress that was fetching
        self._early: dict[Range, Shard] = {}  # layers of a load under way loaded as they arrived (worker's)
        self._forming: Forming | None = None  # a group forming for layers we serve alone (_reshape)
        self._generation = 0  # bumped when the loads under way are to be ignored (see on_view)
        self._loading_as: tuple | None = None  # the shape of the stage under way (_shape)
        self._scanned: dict[int, float] = {}  # id of a held shard -> when its weights were looked over (worker's)
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for queue in self._queues.values():
            queue.put_nowait(Unavailable("the node is stopping"))
        self.keeper.loading = None  # a load under way stops at its next layer
        for shard in [*self.held.values(), self._forming and self._forming.shard]:
            if isinstance(shard, GroupShard):
                shard.stop()
        # MLX 0.32 aborts the process at exit (SIGABRT) now and then when a thread that used
        # it still has streams: clear them in that thread first (ml-explore/mlx#3126)
        done = self.host.loop.create_future()
        self.worker.submit(mx.clear_streams, lambda *_: done.done() or done.set_result(None))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done, 10)
        self.worker.stop()

    # ----- the API's side (tbmesh.core.generation.Backend) ------------------------------------

    def models(self) -> list[str]:
        return [self.model_name] if self.model_name else []

    def context(self, model: str) -> int | None:
        return self.settings.context  # the KV room of a stage: what one request may hold at most

    def tokenizer(self, model: str) -> Any:
        if self._tokenizer is None:
            from tbmesh.weights.modeldir import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def unavailable(self, model: str) -> Unavailable | None:
        """Why a request cannot start now: the model does not fit the cluster. Otherwise (a
        leader being elected, a plan being made or loaded, a stage gone) it waits up to
        resume_wait, as a request in flight does, and fails then saying what it waited for:
        a node that just started, or restarted, answers as soon as it has joined."""
        view = self.host.view()
        serves = view.plan.manifest if view.plan is not None else ""
        mine = self.disk.manifest.digest if self.disk is not None and self.disk.manifest is not None else ""
        if serves and mine and mine != serves:  # our tokenizer is another model's: answers would be wrong
            return Unavailable(f"{self.host.name} holds another model under the name {model} than the cluster "
                               f"serves (manifest {mine[:12]}… vs {serves[:12]}…): ask a Mac that holds the "
                               "cluster's, or give this one a copy of it")
        if view.no_fit:
            return Unavailable(usable(view))  # usable() says why it does not fit
        if self.disk is not None and not self.disk.ready:
            if not any(d.model == model and d.manifest for d in view.disks.values()):
                return Unavailable(f"no reachable Mac holds the model {model}: start one with --model DIR "
                                   "holding it, or pull it (tbmesh model pull)")
            return Unavailable(f"{self.host.name} is fetching the model's description (config, tokenizer) "
                               "from its peers")
        return None

    async def generate(self, model: str, prompt: list[int],
                       params: GenerationParams) -> AsyncIterator[int | TokenLogprobs]:  # fmt: skip
        """Run one request through the cluster; yields sampled tokens until an end token or
        max_tokens. Survives plan changes: each new route gets the prompt and the tokens so far."""
        if (error := self.unavailable(model)) is not None:
            raise error
        if len(prompt) + params.max_tokens > self.settings.context:  # the API checks it first
            raise BadRequest(f"the prompt ({len(prompt)} tokens) and max_tokens ({params.max_tokens}) "
                             f"need more than the context of {self.settings.context} tokens", "max_tokens")
        ends = tuple(self.tokenizer(model).eos_token_ids)
        queue: asyncio.Queue = asyncio.Queue()
        sampling = Sampling(params.temperature, params.top_p, params.seed, params.logprobs)
        request, actions = self.conductor.submit(prompt, params.max_tokens, sampling, ends, time.monotonic(),
                                                 self._usable())
        self._queues[request] = queue
        self._conduct(actions)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self._queues.pop(request, None)
            self._conduct(self.conductor.close(request))

    def _usable(self) -> tuple[Route, int] | str:
        return usable(self.host.view())

    def _conduct(self, actions: list[c.Action]) -> None:
        for action in actions:
            if isinstance(action, c.SendAdmit):
                self._send_admit(action.admit)
            elif isinstance(action, c.SendCancel):
                self._deliver(action.to, wire.Cancel(action.attempt, action.to, "ended", "end"))
            elif isinstance(action, c.Emit):
                self.counters.tokens += 1
                self._recent_tokens.append(time.monotonic())
                self._put(action.request, action.token if action.logprobs is None else action.logprobs)
            elif isinstance(action, c.Finish):
                self._put(action.request, None)
            elif isinstance(action, c.Fail):
                self._put(action.request, action.error)
            elif isinstance(action, c.Resumed):
                self.counters.resumed += 1
                self.host.record("resumed", None, f"request {action.request[:8]} on epoch {action.epoch} "
                                 f"after {action.tokens} tokens ({action.after:.2f} s in)")
        if self.conductor.waiting and self._poll is None:
            self._poll = self.host.loop.call_later(POLL_S, self._tick_conductor)

    def _tick_conductor(self) -> None:
        self._poll = None
        self._conduct(self.conductor.tick(time.monotonic(), self._usable(), hopeless=bool(self.host.view().no_fit)))

    def _put(self, request: str, item: Any) -> None:
        queue = self._queues.get(request)
        if queue is not None:
            queue.put_nowait(item)

    def _send_admit(self, admit: Admit) -> None:
        tokens = np.array(admit.tokens, dtype=np.int32)
        tensor = wire.tensor_from_array(tokens, admit.attempt, admit.produced, admit.meta())
        if not self._deliver(admit.to, tensor):
            self._conduct(self.conductor.on_failed(admit.attempt, f"no route to {self._name(admit.to)}",
                                                   False, time.monotonic(), self._usable()))

    # ----- the cluster's side --------------------------------------------------------------

    def on_view(self, plan: Plan | None, preparing: Plan | None) -> None:
        """The running plan or the one being prepared changed: follow it."""
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
        self._keep(self.keeper.assign(assignment, time.monotonic(), self._in_use, frozenset(stale)))
        self.scheduler.retire({route_of(plan)} if plan is not None else set())
        if self.conductor.waiting:
            self._tick_conductor()

    def on_node_trouble(self, node: str, gone: bool) -> None:
        """A node stopped answering (`gone`: it died, left or restarted). Attempts routed through
        it start again; when it is gone, so are the routes through it and the requests it
        entered, here (no Cancel will come from it)."""
        now = time.monotonic()
        self._conduct(self.conductor.on_node_trouble(node, now, self._usable()))
        if not gone:
            return
        for attempt, entry in self.scheduler.drop_routes_through(node):
            self._fail_at_entry(attempt, entry, f"{self._name(node)} is gone")
        self.scheduler.drop_entered_by(node)
        self._drop_caches(lambda route: all(n != node for n, _, _ in route))
        self._pump()

    def on_link_trouble(self, a: str, b: str) -> None:
        """The connection between nodes a and b broke or went silent, though both may still be
        reachable by other cables: what it carried may be lost. The attempts whose route or
        entry has both ends start again (stage 0 and the entries each do their part)."""
        def crosses(route: Route, entry: str) -> bool:
            nodes = {n for n, _, _ in route} | {entry}
            return a in nodes and b in nodes

        why = f"the link {self._name(a)}-{self._name(b)} broke"
        self._conduct(self.conductor.on_link_trouble(crosses, why, time.monotonic(), self._usable()))
        for attempt, entry in self.scheduler.break_attempts(crosses):
            # not a failure: the route is sound, so the entry starts it again at once and
            # flapping cables cannot use up its failures (it may not have heard of the break)
            self._deliver(entry, wire.Cancel(attempt, entry, why, "preempt"))
        self._pump()

    # ----- messages --------------------------------------------------------------------

    def receive(self, message: DataMessage) -> None:
        """A data-plane message for us, or one to pass on toward its node. A malformed one
        raises wire.ProtocolError (the connection it came on is closed)."""
        to = message.meta.get("to") if isinstance(message, wire.Tensor) else message.to
        if to != self.me:
            self._deliver(to, message)
            return
        if isinstance(message, wire.Tokens):
            self._on_tokens(message)
        elif isinstance(message, wire.Cancel):
            self._on_cancel(message)
        elif message.meta.get("kind") == "admit":
            admit = Admit.from_tensor(message)
            if admit.route[0][0] != self.me:
                raise wire.ProtocolError(f"admit for stage 0 on {admit.route[0][0]}")
            self._check_tokens(admit.tokens)
            self.scheduler.admit(admit)
            self._pump()
        else:
            step = Step.from_meta(message.meta)
            if step.to != self.me or step.stage == 0 or step.rows != (message.shape[0] if message.shape else 0) \
                    and step.kind != "flush":
                raise wire.ProtocolError(f"step for stage {step.stage} on {step.to} with shape {message.shape}")
            self._run(step, message)

    def _check_tokens(self, tokens: Iterable[int]) -> None:
        """Token ids from a peer go into stage 0's embedding, where one out of range crashes
        MLX: refuse them as the protocol errors they are."""
        first = next((shard for shard in self.held.values() if shard.first), None)
        if first is None:
            return  # no layers of stage 0 here: the attempt is refused when its step comes
        config = first.config
        vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
        if vocab and any(not 0 <= t < vocab for t in tokens):
            raise wire.ProtocolError(f"a token id outside the vocabulary (0..{vocab - 1})")

    def _on_tokens(self, message: wire.Tokens) -> None:
        self._check_tokens(s.token for s in message.tokens)
        sampled = {s.attempt: (s.step, s.token) for s in message.tokens}
        self.scheduler.on_tokens(message.lane, sampled)
        logprobs = {s.attempt: TokenLogprobs(s.token, -s.surprisal, tuple((t, -x) for t, x in s.top))
                    for s in message.tokens if s.surprisal is not None}  # fmt: skip
        self._conduct(self.conductor.on_tokens([(s.attempt, s.step, s.token) for s in message.tokens],
                                               time.monotonic(), logprobs))
        self._pump()

    def _on_cancel(self, message: wire.Cancel) -> None:
        if message.kind == "end":
            self.scheduler.cancel(message.request, failed=False)
        else:
            if message.kind == "fail":
                self.scheduler.cancel(message.request, failed=True)
            self._conduct(self.conductor.on_failed(message.request, message.reason, message.kind == "preempt",
                                                   time.monotonic(), self._usable()))
        self._pump()

    def _deliver(self, to: str, message: DataMessage) -> bool:
        if to == self.me:
            self.receive(message)
            return True
        if self.host.send(to, message):
            return True
        log.warning("no route to %s: dropping a %s", self._name(to), type(message).__name__.lower())
        return False

    def _fail_at_entry(self, attempt: str, entry: str, why: str) -> None:
        self._deliver(entry, wire.Cancel(attempt, entry, why, "fail"))

    def _name(self, node: str) -> str:
        return self.host.view().name(node)

    # ----- steps -----------------------------------------------------------------------

    def _pump(self) -> None:
        """Stage 0's next steps, while the worker has none to run."""
        while self._busy == 0 and not self._closed:
            found = self.scheduler.next_step()
            for refused in self.scheduler.take_refused():
                self._deliver(refused.entry, wire.Cancel(refused.attempt, refused.entry, refused.reason,
                                                         "preempt" if refused.preempted else "fail"))
            if found is None:
                return
            step, tokens = found
            array = np.array(tokens, dtype=np.int32).reshape((len(step.members), 1) if step.kind == "decode"
                                                              else (1, len(tokens)))
            self._run(step, wire.tensor_from_array(array))  # stage 0 has the step itself: no meta

    def _run(self, step: Step, tensor: wire.Tensor) -> None:
        shard = self.held.get(step.layers)
        if (shard is None or isinstance(shard, GroupShard) and shard.rank != 0) and step.kind != "flush":
            self._failed(step, step.members, f"{self._name(self.me)} does not run layers "
                                             f"{step.layers[0]}-{step.layers[1] - 1}")
            return
        self._busy += 1
        self.worker.submit(lambda: self._compute(shard, step, tensor),
                           lambda result, error: self._computed(step, result, error))

    def _compute(self, shard: Shard | GroupShard | None, step: Step,
                 tensor: wire.Tensor) -> tuple[Outcome, wire.Tensor | None, Any, str | None]:
        """Worker thread. A group's rank 0 runs the step on every rank (GroupFailed if it cannot).
        When our layers made NaN or inf of finite inputs, their weights are looked at: the
        name of one that is not finite (the shard is damaged) comes last, else None."""
        x = wire.array_from_tensor(tensor) if step.kind != "flush" else None
        damaged = None
        if isinstance(shard, GroupShard):
            outcome = shard.worker.run(step, x)
        else:
            outcome = self.caches.run(shard, step, x) if shard is not None else Outcome()
            if outcome.nonfinite and shard is not None and self._scan_due(shard):
                damaged = shard.damaged()
        forward = None
        if not step.last:
            following = step.onward(outcome.ran if outcome.out is not None else None)
            if outcome.out is not None:
                forward = wire.tensor_from_array(outcome.out, step.lane, 0, following.meta())
            else:
                forward = wire.tensor_from_array(np.zeros((0,), np.int32), step.lane, 0, following.meta())
        return outcome, forward, self._snapshot(), damaged

    def _scan_due(self, shard: Shard) -> bool:
        """Worker thread: whether to look over the shard's weights now (see SCAN_EVERY_S)."""
        now = time.monotonic()
        if now - self._scanned.get(id(shard), -SCAN_EVERY_S) < SCAN_EVERY_S:
            return False
        self._scanned = {key: at for key, at in self._scanned.items() if now - at < SCAN_EVERY_S}
        self._scanned[id(shard)] = now
        return True

    def _snapshot(self) -> tuple[set[Range], dict[str, int]]:
        """Worker thread: what the loop side keeps of the caches (layers in use, figures),
        ours and those of the groups we are rank 0 of."""
        in_use, figures = self.caches.in_use(), self.caches.figures()
        for shard in self._rank0_groups():
            in_use |= shard.worker.in_use()
            for key, value in shard.worker.figures().items():
                figures[key] = figures.get(key, 0) + value
        return in_use, figures

    def _drop_caches(self, keep: Callable[[Route], bool]) -> None:
        """Forget the caches of every route for which keep(route) is false, here and in the
        groups we are rank 0 of (in the worker, after the steps queued before)."""
        def drop() -> None:
            self.caches.drop(keep)
            for shard in self._rank0_groups():
                with contextlib.suppress(GroupFailed):  # a dead group holds nothing
                    shard.worker.drop(keep)

        self._in_worker(drop)

    def _observe(self, snapshot: tuple[set[Range], dict[str, int]]) -> None:
        """The caches changed: layers no request uses any more may go now."""
        in_use, self._figures = snapshot
        if in_use != self._in_use:
            self._in_use = in_use
            self._keep(self.keeper.tick(time.monotonic(), in_use))

    def _computed(self, step: Step, result: tuple[Outcome, wire.Tensor | None, Any, str | None] | None,
                  error: BaseException | None) -> None:
        self._busy -= 1
        if error is not None:
            log.error("a %s step of layers %d-%d failed: %r", step.kind, *step.layers, error)
            self._failed(step, step.members, f"{self._name(self.me)} failed to compute a step")
        elif result is not None:
            outcome, forward, snapshot, damaged = result
            self._observe(snapshot)
            self.counters.steps += step.kind != "flush"
            if outcome.failed:
                self.counters.refused_nonfinite += outcome.refused
                for member, why in outcome.failed:
                    self._failed(step, (member,), why)
            if damaged is not None:
                self._damaged(step.layers, damaged)
            if forward is not None:
                if not self._deliver(step.route[step.stage + 1][0], forward):
                    self._failed(step, outcome.ran, f"no route to {self._name(step.route[step.stage + 1][0])}")
            elif step.kind == "decode" and step.last:
                self._send_tokens(step, outcome)
        self._pump()

    def _send_tokens(self, step: Step, outcome: Outcome) -> None:
        sampled = [(m, _sampled(m, outcome)) for m in outcome.ran]
        stage0 = step.route[0][0]
        self._deliver(stage0, wire.Tokens(stage0, step.lane, tuple(s for _, s in sampled)))
        for entry in dict.fromkeys(m.entry for m, _ in sampled if m.entry != stage0):
            self._deliver(entry, wire.Tokens(entry, step.lane, tuple(s for m, s in sampled if m.entry == entry)))

    def _failed(self, step: Step, members: tuple[Member, ...], why: str) -> None:
        """Attempts that cannot go on: their entry and stage 0 hear why."""
        stage0 = step.route[0][0]
        for member in members:
            for node in dict.fromkeys((stage0, member.entry)):
                self._deliver(node, wire.Cancel(member.attempt, node, why, "fail"))

    def _in_worker(self, fn: Callable[[], Any]) -> None:
        """Change the caches in the worker (after the steps queued before), then observe them."""
        def done(snapshot: Any, error: BaseException | None) -> None:
            if error is not None:
                log.error("worker job failed: %r", error)
            else:
                self._observe(snapshot)

        self.worker.submit(lambda: (fn(), self._snapshot())[1], done)

    def _damaged(self, layers: Range, tensor: str) -> None:
        """Our held `layers` computed NaN or inf and hold a weight that is not finite: they go,
        published as a load that failed, so the leader plans without us; they are read from
        disk again when tried again (and a load refuses weights that are not finite)."""
        why = (f"{tensor} of layers {layers[0]}-{layers[1] - 1} holds values that are not finite (NaN or inf) "
               f"in {self.host.name}'s memory")
        log.error("%s: letting the layers go", why)
        self.host.record("damaged", self.me, why)
        self._keep(self.keeper.damaged(layers, why, time.monotonic(), self._in_use))

    # ----- layers ----------------------------------------------------------------------

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
            self._keep(self.keeper.tick(time.monotonic(), self._in_use))

        self._wake = self.host.loop.call_later(delay, wake)

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
            self.worker.run_queued()  # steps of requests in flight go between layers
            return self.keeper.loading == target and self._generation == generation

        def load() -> Shard:  # in the worker, after the loads of the layers fetched first
            early = self._early.pop(target, None)
            return load_shard(self.model_dir, *target, keep=keep + ([early] if early else []),
                              on_layer=on_layer, tensors=tensors)

        def done(shard: Shard | None, error: BaseException | None) -> None:
            if self._generation == generation:
                self._loaded(target, shard, error)

        self.worker.submit(load, done, long=True)

    def _stage_for(self, target: Range) -> tuple[Stage | None, int]:
        """Our stage of the assignment whose layers are `target`, and its plan's epoch."""
        assignment = self.keeper.assignment
        if assignment is not None:
            for stage, epoch in ((assignment.prepare, assignment.prepare_epoch),
                                 (assignment.serve, assignment.serve_epoch)):
                if stage is not None and (stage.start, stage.end) == target:
                    return stage, epoch
        return None, 0

    def _load_group(self, target: Range, stage: Stage, epoch: int) -> None:
        """Load `target` as our rank of the group `stage` (the keeper's load)."""
        generation = self._generation

        def wanted() -> bool:  # read from the thread: a newer plan may want something else
            return self.keeper.loading == target and self._generation == generation and not self._closed

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

    def _group_exited(self, shard: GroupShard, status: int) -> None:
        """Our rank's worker exited unasked: the group is gone (a member died, or the worker)."""
        target = (shard.stage.start, shard.stage.end)
        if self.held.get(target) is not shard or self._closed:
            return
        log.warning("the group of layers %d-%d ended (its worker exited with status %s)", *target, status)
        self.host.record("group-ended", None, f"layers {target[0]}-{target[1] - 1} of "
                         f"{'+'.join(map(self._name, shard.stage.group))}: a member is gone")
        self._keep(self.keeper.forget(target, time.monotonic(), self._in_use))

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
                               on_layer=lambda *_: self.worker.run_queued() or True, tensors=tensors)
            if self.keeper.loading == target:
                self._early[target] = shard

        def done(_: Any, error: BaseException | None) -> None:
            if error is not None:  # the last load reads them again, and says why if it fails too
                log.warning("loading layers %d-%d early failed: %s", start, upto - 1, error)
                self._early.pop(target, None)

        self.worker.submit(load, done, long=True)

    def _load_again(self, target: Range, tight: bool) -> None:
        if self.keeper.loading == target and not self._closed:
            self._load(target, tight)

    def _fetch(self, target: Range, tight: bool, missing: list[TensorEntry]) -> None:
        """Fetch the tensors of `target` our disk lacks from the peers whose disks hold them,
        in a thread of its own (the worker keeps stepping), then load."""
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
            self._keep(self.keeper.tick(time.monotonic(), self._in_use))
            return
        if error is not None:
            log.error("fetching layers %d-%d failed: %s", target[0], target[1] - 1, error)
            why = f"could not fetch layers {target[0]}-{target[1] - 1}: {error}"
            self._keep(self.keeper.load_failed(target, why, time.monotonic(), self._in_use))
            return
        log.info("fetched layers %d-%d: %s", target[0], target[1] - 1, report)
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
            self._keep(self.keeper.tick(now, self._in_use))
            return
        if error is not None:
            log.error("loading layers %d-%d failed: %r", target[0], target[1] - 1, error)
            self._keep(self.keeper.load_failed(target, self._load_failure(error), now, self._in_use))
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
        self._keep(self.keeper.loaded(target, now, self._in_use))
        self._pump()

    def _group_started(self, target: Range, generation: int, shard: GroupShard | None,
                       error: BaseException | None) -> None:
        now = time.monotonic()
        if self.keeper.loading != target or self._generation != generation or self._closed:
            if shard is not None:  # a newer plan wants other layers (or these, another way)
                shard.stop()
            return
        if error is not None:
            log.error("the group for layers %d-%d failed to form: %s", *target, error)
            self._keep(self.keeper.load_failed(target, f"{type(error).__name__}: {error}", now, self._in_use))
            return
        assert shard is not None
        self._hold_group(target, shard)
        self._keep(self.keeper.loaded(target, now, self._in_use))
        self._pump()

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

    # A Mac serving layers alone that the next plan gives a group it is in (the second Mac
    # joins): the keeper sees the same layers held, so the engine forms the group itself while
    # the Mac keeps serving alone, reports the stage not ready until the group is, and swaps
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
            self._in_worker(lambda: self.caches.drop(lambda route: stage not in route))  # the alone stage's only
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
            if not self._form_group(wanted, forming.epoch, lambda: self._forming is forming and not self._closed,
                                    lambda shard, error: self._formed(forming, shard, error)):
                self._forming = None  # tried again in a moment
                self.host.loop.call_later(GROUP_RETRY_S, self._reshape_again)
        return wanted

    def _reshape_again(self) -> None:
        if self.keeper.assignment is not None and not self._closed:
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

    def _held_changed(self) -> None:
        """What our disk lacks of the held shards, peers may fetch from memory (Disk.hold)."""
        if self.disk is not None:
            self.disk.hold(self.held.values())

    def _rank0_groups(self) -> list[GroupShard]:
        """The groups we run the steps of (rank 0): their caches are ours to report and drop."""
        return [s for s in list(self.held.values()) if isinstance(s, GroupShard) and s.rank == 0]

    def _drop(self, layers: Range) -> None:
        if isinstance(shard := self.held.pop(layers, None), GroupShard):
            shard.stop()
        self._held_changed()
        log.info("dropped layers %d-%d", layers[0], layers[1] - 1)
        for attempt, entry in self.scheduler.drop_routes_from(self.me, layers):
            self._fail_at_entry(attempt, entry, f"{self._name(self.me)} dropped layers {layers[0]}-{layers[1] - 1}")
        stage = (self.me, *layers)
        self._drop_caches(lambda route: stage not in route)

    # ----- status ----------------------------------------------------------------------

    def status(self) -> RuntimeStatus:
        now = time.monotonic()
        recent = sum(1 for t in self._recent_tokens if now - t <= 5.0)
        loading = self.keeper.loading
        return RuntimeStatus(
            requests=len(self.conductor.requests),  # entering here, in flight
            held=tuple(sorted(self.held)),
            loading=None if loading is None else LoadingStatus(loading[0], loading[1], self.keeper.progress),
            weight_bytes=weight_bytes(self.held.values()),
            active_memory=mx.get_active_memory(),
            tokens_per_s=recent / 5.0,
            counters=EngineCounters(**vars(self.counters)),
            tight_loads=self.keeper.tight_loads,  # loads begun after letting the running stage go
            scheduler=self.scheduler.status(),  # as stage 0 of the routes that start here
            caches=CacheFigures(**self._figures),  # as of the last change in the worker
        )


EARLY_RUNS = 4  # a stage's fetch is split in this many runs of layers, each loaded as it arrives


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


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def _sampled(member: Member, outcome: Outcome) -> wire.Sampled:
    """A member's token as the last stage sends it, with its log-probabilities if it asked."""
    token = outcome.tokens[member.attempt]
    logprobs = outcome.logprobs.get(member.attempt)
    if logprobs is None:
        return wire.Sampled(member.attempt, member.step, token)
    return wire.Sampled(member.attempt, member.step, token, _surprisal(logprobs.logprob),
                        tuple((t, _surprisal(p)) for t, p in logprobs.top))


def _surprisal(logprob: float) -> float:
    return min(-logprob, SURPRISAL_MAX)  # finite, as every wire number: a probability of 0 is e**-1e9


SURPRISAL_MAX = 1e9
