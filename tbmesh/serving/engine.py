"""The serving engine: the asyncio adapter that drives the pure parts of serving, and the
backend the API serves (tbmesh.core.generation.Backend). Its parts, one job each:

    conductor.py  the requests entering here (attempts, routes, retries)       pure
    scheduler.py  stage 0 of a route: admission, lanes, chunked prefill       pure
    keeper.py     the layers this node holds, loads and lets go               pure
    steps.py      runs the steps on our layers (stage.py: with the KV caches)  MLX thread
    layers.py     carries out the keeper: loads, fetches, tensor groups        MLX thread, threads

The engine takes the API's requests to the conductor and streams their tokens back, routes
the data-plane messages (to one of its parts, or on toward their node through the `Host` it
is handed, never the daemon itself), and hands the cluster's events to the parts. All MLX
work runs in one thread (mlx_thread.py), in order, so that the event loop (and the
heartbeats) never wait for it. Nothing polls: the conductor's deadlines (a back-off, a
resume_wait) arm one timer, and the view changing wakes the requests waiting for a route.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from tbmesh.core.assignment import Range
from tbmesh.core.generation import (
    BadRequest,
    Sampling,
    TokenLogprobs,
    Unavailable,
)
from tbmesh.core.status import CacheFigures, EngineCounters, LoadingStatus, RuntimeStatus
from tbmesh.core.types import Plan
from tbmesh.net import wire
from tbmesh.runtime.shard import Shard
from tbmesh.serving import conductor as c
from tbmesh.serving.conductor import Conductor
from tbmesh.serving.counters import Counters
from tbmesh.serving.disk import Disk
from tbmesh.serving.group import GroupShard
from tbmesh.serving.host import Host
from tbmesh.serving.keeper import Keeper
from tbmesh.serving.layers import Layers, weight_bytes
from tbmesh.serving.messages import Admit, Route, Step, route_of
from tbmesh.serving.mlx_thread import MlxThread
from tbmesh.serving.scheduler import Scheduler
from tbmesh.serving.settings import ServingSettings
from tbmesh.serving.steps import Steps
from tbmesh.serving.view import usable

log = logging.getLogger(__name__)

DataMessage = wire.Tensor | wire.Tokens | wire.Cancel


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
        self.counters = Counters()
        self.thread = MlxThread(host.loop)
        self.held: dict[Range, Shard | GroupShard] = {}  # what Layers holds, Steps runs
        self.steps = Steps(self.me, host.name, self.thread, self.scheduler, self.held, self._deliver, self._name,
                           lambda in_use: self.layers.observe(in_use),
                           lambda layers, tensor: self.layers.damaged(layers, tensor), self.counters,
                           lambda: self.tokenizer(""))  # a last stage's grammars need the model's tokenizer
        self.layers = Layers(host, model_dir, disk, self.thread, self.held, self.steps, self._dropped,
                             self.counters)
        self._queues: dict[str, asyncio.Queue] = {}  # request -> what generate() yields
        self._tokenizer: Any = None
        self._timer: asyncio.TimerHandle | None = None  # at the conductor's next deadline
        self._timer_at: float | None = None
        self._look_again: asyncio.Handle | None = None  # a tick soon: the view changed (on_cluster_change)
        self._recent_tokens: collections.deque[float] = collections.deque(maxlen=4096)

    @property
    def keeper(self) -> Keeper:
        return self.layers.keeper

    @property
    def _figures(self) -> dict[str, int]:
        """The caches' figures, as of their last change (status() reads them)."""
        return self.steps.figures

    async def close(self) -> None:
        self.steps.closed = True
        for queue in self._queues.values():
            queue.put_nowait(Unavailable("the node is stopping"))
        self.layers.close()
        for handle in (self._timer, self._look_again):
            if handle is not None:
                handle.cancel()
        # MLX 0.32 aborts the process at exit (SIGABRT) now and then when a thread that used
        # it still has streams: clear them in that thread first (ml-explore/mlx#3126)
        done = self.host.loop.create_future()
        self.thread.submit(mx.clear_streams, lambda *_: done.done() or done.set_result(None))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done, 10)
        self.thread.stop()

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

    async def generate(self, model: str, prompt: list[int], max_tokens: int,
                       sampling: Sampling) -> AsyncIterator[int | TokenLogprobs]:  # fmt: skip
        """Run one request through the cluster; yields sampled tokens until an end token or
        max_tokens. Survives plan changes: each new route gets the prompt and the tokens so far."""
        if (error := self.unavailable(model)) is not None:
            raise error
        if len(prompt) + max_tokens > self.settings.context:  # the API checks it first
            raise BadRequest(f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) "
                             f"need more than the context of {self.settings.context} tokens", "max_tokens")
        ends = tuple(self.tokenizer(model).eos_token_ids)
        queue: asyncio.Queue = asyncio.Queue()
        request, actions = self.conductor.submit(prompt, max_tokens, sampling, ends, time.monotonic(),
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
        self._arm_timer()

    def _tick_conductor(self) -> None:
        view = self.host.view()
        self._conduct(self.conductor.tick(time.monotonic(), usable(view), hopeless=bool(view.no_fit)))

    def _arm_timer(self) -> None:
        """One timer, at the conductor's next deadline; none while no request waits on time."""
        at = self.conductor.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = None if at is None else self.host.loop.call_later(max(0.0, at - time.monotonic()),
                                                                        self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._tick_conductor()

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
        self.layers.follow(plan, preparing)
        self.scheduler.retire({route_of(plan)} if plan is not None else set())
        if self.conductor.waiting:
            self._tick_conductor()

    def on_cluster_change(self) -> None:
        """Something else in the cluster view may have changed (a member's shard, a suspicion,
        whether the model fits): the requests waiting for a usable route look again, as soon
        as the daemon is done with what changed it (not from inside its call)."""
        if self.conductor.waiting and self._look_again is None:
            self._look_again = self.host.loop.call_soon(self._looked_again)

    def _looked_again(self) -> None:
        self._look_again = None
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
        self.steps.drop_caches(lambda route: all(n != node for n, _, _ in route))
        self.steps.pump()

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
        self.steps.pump()

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
            self.steps.pump()
        else:
            step = Step.from_meta(message.meta)
            if step.to != self.me or step.stage == 0 or step.rows != (message.shape[0] if message.shape else 0) \
                    and step.kind != "flush":
                raise wire.ProtocolError(f"step for stage {step.stage} on {step.to} with shape {message.shape}")
            self.steps.run(step, message)

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
        self.steps.pump()

    def _on_cancel(self, message: wire.Cancel) -> None:
        if message.kind == "end":
            self.scheduler.cancel(message.request, failed=False)
        else:
            if message.kind == "fail":
                self.scheduler.cancel(message.request, failed=True)
            self._conduct(self.conductor.on_failed(message.request, message.reason, message.kind == "preempt",
                                                   time.monotonic(), self._usable()))
        self.steps.pump()

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

    def _dropped(self, layers: Range) -> None:
        """Our layers went: so do the routes that start with them, and their caches here."""
        for attempt, entry in self.scheduler.drop_routes_from(self.me, layers):
            self._fail_at_entry(attempt, entry, f"{self._name(self.me)} dropped layers {layers[0]}-{layers[1] - 1}")
        stage = (self.me, *layers)
        self.steps.drop_caches(lambda route: stage not in route)

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


def _new_id() -> str:
    return uuid.uuid4().hex[:16]
