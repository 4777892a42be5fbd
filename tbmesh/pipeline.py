"""The data plane: serve this node's stages of the plans, and conduct the requests that enter here.

A request is conducted by the node whose API it entered (its *entry*): the entry tokenizes,
sends the prompt to stage 0, and for every token the last stage samples it streams the token
to the client and feeds it back to stage 0. Stages pass hidden states along as raw tensors;
each keeps the KV cache of its own layers per request. All MLX work runs in one worker
thread, in order, so the event loop (and the heartbeats) never wait for it; while that thread
loads a shard, the steps of requests in flight run between two layers of the load.

    entry --Tensor(tokens)--> stage 0 --Tensor(hidden)--> ... --> last stage
      ^                                                             |
      +--------------------------Token(sampled)---------------------+

Every tensor carries its *route* (node and layer range of each stage, fixed by the entry when
the attempt starts), so a stage needs no plan to run it: it runs the layers the route names
if it holds them, and says so to the entry when it does not. That is what lets a plan change
under running requests: a commit that only moves layers lets requests in flight finish on
their route (nodes keep those layers while they are used), and when a route is gone (a stage
died, or its layers were dropped) the entry, which keeps each request's prompt and the tokens
produced so far, starts a new attempt on the current plan with prompt + tokens as the
prefill. The client only sees a pause.

Shards: a node holds its stage of the running plan and, while a new plan is prepared, its
stage of that one too (layers they share are one copy); see core/assignment.py.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from tbmesh.core.assignment import Assignment, Range
from tbmesh.core.types import Plan
from tbmesh.net import wire
from tbmesh.generation import GenerationParams, Unavailable
from tbmesh.runtime.sampling import Sampling, sample
from tbmesh.runtime.shard import Kept, LoadAbandoned, Shard, load_shard

if TYPE_CHECKING:
    from tbmesh.daemon import Daemon

log = logging.getLogger(__name__)

PREFILL_STEP = 2048  # as mlx-lm's generate_step: same chunks, same floating-point results
POLL = 0.01  # s between looks at the view while a request waits for a usable plan
DRAIN_S = 30.0  # the longest requests in flight keep layers a new plan moved away
LOAD_RETRY_S = 10.0  # a load that failed (a bad file) is tried again after this long
LINGER_S = 5.0  # layers no plan wants and no request uses stay this long (a join may want them)
MAX_FAILURES = 6  # attempts in a row without a token before a request gives up (~3 s of back-off)

Route = tuple[tuple[str, int, int], ...]  # (node, start, end) per stage


class PipelineBroken(Exception):
    """This attempt cannot go on (a stage went away or lost its cache, the plan changed)."""


@dataclass(frozen=True)
class Forward:
    """What a stage needs to know about a tensor, beyond the tensor (Tensor.meta on the wire)."""

    route: Route
    entry: str  # where sampled tokens go
    stage: int
    fresh: bool  # the attempt's first chunk: the stage makes a new KV cache for it
    sample: bool  # the last stage samples after this step (false for early prefill chunks)
    temperature: float
    top_p: float
    seed: int | None

    @property
    def to(self) -> str:
        return self.route[self.stage][0]

    @property
    def layers(self) -> Range:
        return self.route[self.stage][1:]

    def meta(self) -> dict[str, Any]:
        return {**self.__dict__, "to": self.to, "route": [list(r) for r in self.route]}

    def next(self) -> Forward:
        return Forward(self.route, self.entry, self.stage + 1, self.fresh, self.sample,
                       self.temperature, self.top_p, self.seed)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Forward:
        """Validated: a peer's tensor meta is untrusted input."""
        try:
            route = tuple((str(n), int(s), int(e)) for n, s, e in meta["route"])
            forward = cls(route, str(meta["entry"]), int(meta["stage"]), bool(meta["fresh"]),
                          bool(meta["sample"]), float(meta["temperature"]), float(meta["top_p"]),
                          None if meta["seed"] is None else int(meta["seed"]))
            forward.sampling  # noqa: B018  (validates the sampling fields)
        except (KeyError, TypeError, ValueError) as error:
            raise wire.ProtocolError(f"tensor meta: {error}") from None
        if not 0 <= forward.stage < len(route) or any(not 0 <= s < e for _, s, e in route):
            raise wire.ProtocolError(f"tensor meta: stage {forward.stage} of route {route}")
        return forward

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


def route_of(plan: Plan) -> Route:
    return tuple((s.node, s.start, s.end) for s in plan.stages)


@dataclass
class Conducted:
    """A request this node is the entry of: what it needs to start over on another plan."""

    prompt: list[int]
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)
    attempt: str = ""  # the wire id of the current attempt
    route: Route = ()
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class Counters:
    loads: int = 0  # shards loaded
    layers_read: int = 0  # layers read from disk
    layers_kept: int = 0  # layers a new shard took from one already in memory
    tight_loads: int = 0  # loads begun after letting the running stage go (both did not fit)
    peak_weight_bytes: int = 0  # the most weight bytes held at once (at the end of a load)
    bytes_read: int = 0
    resumed: int = 0  # attempts started again on another route
    tokens: int = 0  # tokens streamed by this entry


class Pipeline:
    def __init__(self, daemon: Daemon, model_dir: Path | None, resume_wait: float = 30.0) -> None:
        self.daemon = daemon
        self.model_dir = model_dir
        self.model_name = model_dir.name if model_dir is not None else None
        self.resume_wait = resume_wait
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self.held: dict[Range, Shard] = {}  # loaded shards (event loop side)
        self.caches: dict[str, tuple[Range, list]] = {}  # attempt -> KV cache (worker thread only)
        self.cancelled: collections.deque[str] = collections.deque(maxlen=4096)
        self.conducting: dict[str, Conducted] = {}  # attempt -> request (entry side)
        self.counters = Counters()
        self._recent_tokens: collections.deque[float] = collections.deque(maxlen=4096)
        self._tokenizer: Any = None
        self._assignment: Assignment | None = None
        self._loading: Range | None = None
        self._progress = 0.0
        self._stage_attempts: dict[str, tuple[Range, str]] = {}  # attempt -> (layers, entry), cache held
        self._unwanted_since: dict[Range, float] = {}  # held layers no plan wants, since when
        self._recheck: asyncio.TimerHandle | None = None
        self._failed: tuple[Range, float, str] | None = None  # the last load that failed: when, why
        self._queued: collections.deque[tuple[concurrent.futures.Future, Callable[..., Any], tuple]] = \
            collections.deque()  # MLX work other than loads (see _in_worker)

    @property
    def me(self) -> str:
        return self.daemon.core.id

    async def close(self) -> None:
        for request in self.conducting.values():
            request.queue.put_nowait(Unavailable("the node is stopping"))
        self._loading = None  # a load under way stops at its next layer
        # MLX 0.32 aborts the process at exit (SIGABRT) now and then when a thread that used
        # it still has streams: clear them in that thread first (ml-explore/mlx#3126)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(self.executor.submit(mx.clear_streams)), 10)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ----- following the plans -----------------------------------------------------------

    def on_view(self, plan: Plan | None, preparing: Plan | None) -> None:
        """Called when the running plan or the one being prepared changes: load our stage of
        the newest, keep what either needs, and let go of the rest (see _follow)."""
        core = self.daemon.core
        self._assignment = Assignment.of(self.me, self.model_name, plan, preparing, core.config.model,
                                         core.info.memory_usable, core.config.context)
        self._follow()

    def on_node_trouble(self, node: str) -> None:
        """A node stopped answering, restarted or left: a step of ours that was on its way
        through it may be lost with its connection, so attempts that route through it start
        again (on the same plan once it answers, or on the next plan without it)."""
        for request in self.conducting.values():
            if any(n == node for n, _, _ in request.route):
                request.queue.put_nowait(PipelineBroken(f"{self._name(node)} stopped answering"))

    def on_node_gone(self, node: str) -> None:
        """A node died, left or restarted: the attempts it entered will send no Cancel, so
        their caches here go now (not only when their layers are dropped)."""
        for attempt in [a for a, (_, entry) in self._stage_attempts.items() if entry == node]:
            self._forget(attempt)

    def _forget(self, attempt: str) -> None:
        """Free an attempt's cache here and refuse its steps still on their way."""
        self.cancelled.append(attempt)
        self._in_worker(self.caches.pop, attempt, None)  # after queued work
        self._stage_attempts.pop(attempt, None)

    def _name(self, node: str) -> str:
        info = self.daemon.core.node_infos().get(node)
        return info.name if info is not None else node

    def _follow(self) -> None:
        assignment = self._assignment
        if assignment is None:
            return
        target = assignment.target
        failed = self._failed is not None and self._failed[0] == target \
            and time.monotonic() - self._failed[1] < LOAD_RETRY_S
        if target is not None and target not in self.held and self._loading != target and not failed:
            self._start_load(target, assignment.tight)  # first: the load keeps any held layer it can use
        elif target != self._loading:
            self._loading = None  # the load under way is for a plan we left: it stops
        self._let_go(assignment.keep, linger=target is None, at_once=assignment.tight)
        self._publish()

    def _let_go(self, keep: set[Range], linger: bool, at_once: bool = False) -> None:
        """Drop layers no plan wants, once nothing needs them.

        Requests in flight finish on the route they started on (a commit that only moves
        layers costs them nothing; a re-prefill would), so layers stay while attempts use
        them, up to DRAIN_S. While no plan gives us a stage (`linger`), unused layers stay
        LINGER_S: a Mac that ran alone and joins keeps what it holds for the stage the next
        plan gives it, a moment later. `at_once`: memory cannot wait (the running and the
        prepared stage do not fit together), the attempts using them resume on the new plan.
        """
        now = time.monotonic()
        for layers in list(self.held):
            if layers in keep:
                self._unwanted_since.pop(layers, None)
                continue
            since = self._unwanted_since.setdefault(layers, now)
            users = [a for a, (used, _) in self._stage_attempts.items() if used == layers]
            if at_once or now - since >= DRAIN_S or (not users and (not linger or now - since >= LINGER_S)):
                del self.held[layers], self._unwanted_since[layers]
                for attempt in users:
                    del self._stage_attempts[attempt]
                log.info("dropped layers %d-%d", layers[0], layers[1] - 1)
                self._in_worker(self._drop, layers)
        if self._unwanted_since and self._recheck is None:
            def recheck() -> None:
                self._recheck = None
                self._follow()
            self._recheck = self.daemon.loop.call_later(1.0, recheck)

    def _start_load(self, target: Range, tight: bool = False) -> None:
        self._loading, self._progress, self._failed = target, 0.0, None
        # tight: hold on to the parts the target reuses only, so the rest is freed before reading
        keep = [shard.parts_for(*target) if tight else shard for shard in self.held.values()]
        self.counters.tight_loads += tight
        future = self.executor.submit(self._load, target, keep)
        asyncio.wrap_future(future).add_done_callback(lambda f: self._loaded(f, target))

    def _load(self, target: Range, keep: list[Shard | Kept]) -> Shard:
        """Worker thread."""
        def on_layer(done: int, total: int) -> bool:
            self._to_loop(self._on_progress, target, done / total)
            self._run_queued()  # steps of requests in flight go between layers, not after the load
            return self._loading == target

        return load_shard(self.model_dir, *target, keep=keep, on_layer=on_layer)

    def _to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """From the worker thread: call fn(*args) on the event loop (unless it has closed)."""
        with contextlib.suppress(RuntimeError):
            self.daemon.loop.call_soon_threadsafe(fn, *args)

    def _in_worker(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run fn(*args) in the MLX thread after the work queued before it; during a load it
        runs between two layers."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queued.append((future, fn, args))
        self.executor.submit(self._run_queued)
        return future

    def _run_queued(self) -> None:
        """Worker thread: everything queued so far, in order."""
        while self._queued:
            future, fn, args = self._queued.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:  # noqa: BLE001  (the event loop side reads it)
                    future.set_exception(error)

    def _on_progress(self, target: Range, progress: float) -> None:
        if self._loading == target and progress - self._progress >= 0.1:
            self._progress = progress  # published in steps: each publication floods the cluster
            self._publish()

    def _drop(self, dropped: Range) -> None:
        """Worker thread: the caches of dropped layers go with them."""
        for request in [r for r, (layers, _) in self.caches.items() if layers == dropped]:
            del self.caches[request]
        mx.clear_cache()

    def _loaded(self, future: asyncio.Future, target: Range) -> None:
        error = None if future.cancelled() else future.exception()
        if self._loading != target or future.cancelled() or isinstance(error, LoadAbandoned):
            return  # abandoned, or superseded by a newer plan
        self._loading = None
        if error is not None:
            log.error("loading layers %d-%d failed: %r", target[0], target[1] - 1, error)
            # tried again after LOAD_RETRY_S, not at once; meanwhile the leader plans without us
            self._failed = (target, time.monotonic(), f"{type(error).__name__}: {error}")
            self.daemon.loop.call_later(LOAD_RETRY_S, self._follow)
            self._publish()
            return
        shard = future.result()
        self.held[target] = shard
        c = self.counters
        c.peak_weight_bytes = max(c.peak_weight_bytes, _weight_bytes(self.held.values()))
        c.loads, c.layers_read, c.layers_kept = c.loads + 1, c.layers_read + shard.read_layers, \
            c.layers_kept + shard.kept_layers
        c.bytes_read += shard.read_bytes
        log.info("loaded layers %d-%d (%.1f MB; %d layers read, %d kept)", target[0], target[1] - 1,
                 shard.weight_bytes / 1e6, shard.read_layers, shard.kept_layers)
        self._follow()

    def _publish(self) -> None:
        assignment = self._assignment
        failed = self._failed[2] if self._failed and assignment and self._failed[0] == assignment.target else ""
        state = None if assignment is None else assignment.state(set(self.held), self._progress, failed)
        if state != self.daemon.core.shard:
            self.daemon.carry_out(self.daemon.core.set_shard(state, self.daemon.now()))

    # ----- the entry side: what the OpenAI API calls --------------------------------------

    def models(self) -> list[str]:
        return [self.model_name] if self.model_name else []

    def tokenizer(self, model: str) -> Any:
        if self._tokenizer is None:
            from tbmesh.runtime.modeldir import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def unavailable(self, model: str) -> Unavailable | None:
        """Why a request cannot start now. With a running plan it waits instead (up to
        resume_wait) for the plan's nodes to be ready, as a request in flight does."""
        if self.daemon.core.plan is not None:
            return None
        return self._why_not()

    def _why_not(self) -> Unavailable | None:
        """Why the running plan cannot serve now, or None when it can."""
        core = self.daemon.core
        plan = core.plan
        if core.no_fit:
            return Unavailable(f"the model does not fit the cluster: {core.no_fit}")
        shards = core.shards()
        names = {n: i.name for n, i in core.node_infos().items()}
        if plan is None:
            if core.preparing is None:
                waiting = "a leader" if core.leader is None else "the leader's plan"
                return Unavailable(f"no plan yet: waiting for {waiting}")
            loading = [self._loading_text(s, core.preparing, shards.get(s.node), names)
                       for s in core.preparing.stages]
            return Unavailable("waiting for shards to load: " + ", ".join(filter(None, loading)))
        members = core.members()  # node -> suspected
        gone = [names.get(s.node, s.node) for s in plan.stages if members.get(s.node, True)]
        if gone:
            return Unavailable(f"{', '.join(gone)} stopped answering: waiting for a new plan")
        waiting = [names.get(s.node, s.node) for s in plan.stages
                   if (held := shards.get(s.node)) is None or held.serving != plan.epoch]
        if waiting:
            return Unavailable(f"waiting for {', '.join(waiting)} to serve epoch {plan.epoch}")
        return None

    @staticmethod
    def _loading_text(stage, plan: Plan, held, names: dict[str, str]) -> str | None:
        if held is not None and held.ready and (held.start, held.end, held.epoch) == \
                (stage.start, stage.end, plan.epoch):
            return None
        progress = f" {held.progress:.0%}" if held is not None and held.epoch == plan.epoch else ""
        return f"{names.get(stage.node, stage.node)} (layers {stage.start}-{stage.end - 1}{progress})"

    async def _usable_route(self, deadline: float, failed: Route = (), retry_at: float = 0.0) -> tuple[Route, int]:
        """The running plan's route once every stage of it serves; Unavailable at the deadline.
        The route that just `failed` is taken again only from `retry_at` on (a stage that
        restarted is back once it reloads; a dead one is gone once the others notice)."""
        while True:
            error = self._why_not()
            now = time.monotonic()
            if error is None:
                plan = self.daemon.core.plan
                if route_of(plan) != failed or now >= retry_at:
                    return route_of(plan), plan.epoch
            elif now >= deadline:
                raise error
            await asyncio.sleep(POLL)

    async def generate(self, model: str, prompt: list[int], params: GenerationParams) -> AsyncIterator[int]:
        """Run one request through the pipeline; yields sampled tokens until EOS or max_tokens.
        Survives plan changes: each new route gets the prompt and the tokens so far."""
        if (error := self.unavailable(model)) is not None:
            raise error
        eos = set(self.tokenizer(model).eos_token_ids)
        # the seed is fixed once per request, so a replay draws the same tokens
        request = Conducted(list(prompt), Sampling(params.temperature, params.top_p, params.seed).seeded())
        base, attempts, started = uuid.uuid4().hex, 0, time.monotonic()
        failed: Route = ()
        failures, retry_at = 0, 0.0  # attempts in a row that ended without a token
        while True:
            route, epoch = await self._usable_route(time.monotonic() + self.resume_wait,
                                                    failed, retry_at)
            if attempts:
                self.counters.resumed += 1
                self.daemon.record("resumed", None, f"request {base[:8]} on epoch {epoch} after "
                                   f"{len(request.tokens)} tokens ({time.monotonic() - started:.2f} s in)")
            request.attempt, request.route = f"{base}.{attempts}", route
            attempts += 1
            self.conducting[request.attempt] = request
            produced = len(request.tokens)
            try:
                async for token in self._attempt(request, params.max_tokens, eos):
                    if token in eos:
                        return
                    request.tokens.append(token)
                    self.counters.tokens += 1
                    self._recent_tokens.append(time.monotonic())
                    yield token
                return
            except PipelineBroken as why:
                failures = 0 if len(request.tokens) > produced else failures + 1
                if failures > MAX_FAILURES:
                    raise Unavailable(f"the request failed {failures} times in a row: {why}") from None
                failed, retry_at = route, time.monotonic() + 0.05 * 2 ** failures
                log.info("request %s: %s; starting again from %d tokens", base[:8], why,
                         len(request.tokens))
            finally:
                self._end_attempt(request)

    async def _attempt(self, request: Conducted, max_tokens: int, eos: set[int]) -> AsyncIterator[int]:
        """Prefill prompt + tokens so far on the attempt's route, then decode step by step."""
        rest = request.prompt + request.tokens
        fresh = True
        while len(rest) > 1:  # all but the last token, in mlx-lm's chunks
            n = min(PREFILL_STEP, len(rest) - 1)
            self._send_tokens(request, 0, rest[:n], fresh, sample=False)
            rest, fresh = rest[n:], False
        step = len(request.tokens)
        self._send_tokens(request, step, rest, fresh, sample=True)
        while step < max_tokens:
            token = await request.queue.get()
            if isinstance(token, Exception):
                raise token
            step += 1
            if step < max_tokens and token not in eos:  # the next step first: the pipeline
                self._send_tokens(request, step, [token], False, sample=True)  # works while
            yield token  # the client is written to

    def _end_attempt(self, request: Conducted) -> None:
        del self.conducting[request.attempt]
        for node in dict.fromkeys(n for n, _, _ in request.route):  # free its caches everywhere
            self.deliver(wire.Cancel(request.attempt, node, "finished"))
        request.queue = asyncio.Queue()  # nothing of this attempt reaches the next one

    def _send_tokens(self, request: Conducted, step: int, tokens: list[int], fresh: bool,
                     sample: bool) -> None:
        s = request.sampling
        forward = Forward(request.route, self.me, 0, fresh, sample, s.temperature, s.top_p, s.seed)
        array = np.array([tokens], dtype=np.int32)  # numpy: no MLX on the event loop
        self.deliver(wire.tensor_from_array(array, request.attempt, step, forward.meta()))

    # ----- delivery: direct, relayed, or to ourselves ------------------------------------

    def deliver(self, message: wire.Tensor | wire.Token | wire.Cancel) -> None:
        to = message.meta["to"] if isinstance(message, wire.Tensor) else message.to
        if to == self.me:
            self.receive(message)
        elif not self.daemon.send_to(to, message):
            log.warning("no route to %s: dropping %s of request %s", to,
                        type(message).__name__.lower(), message.request)
            if isinstance(message, wire.Tensor):
                self._fail(message, f"no route to {to}")

    def _fail(self, tensor: wire.Tensor, why: str) -> None:
        """Tell the tensor's entry that its attempt cannot go on."""
        entry = tensor.meta.get("entry")
        if isinstance(entry, str):
            self.deliver(wire.Cancel(tensor.request, entry, why))

    def receive(self, message: wire.Tensor | wire.Token | wire.Cancel) -> None:
        """A data-plane message for us, or one to pass on toward its node."""
        to = message.meta.get("to") if isinstance(message, wire.Tensor) else message.to
        if to != self.me:
            self.deliver(message)
            return
        if isinstance(message, wire.Token):
            request = self.conducting.get(message.request)
            if request is not None:  # a negative token: the step failed at some stage
                request.queue.put_nowait(message.token if message.token >= 0
                                         else PipelineBroken("a stage failed to compute its step"))
        elif isinstance(message, wire.Cancel):
            self._forget(message.request)
            request = self.conducting.get(message.request)
            if request is not None:  # a stage gave up on it
                request.queue.put_nowait(PipelineBroken(message.reason))
        else:
            self._run_stage(message, Forward.from_meta(message.meta))

    def _run_stage(self, tensor: wire.Tensor, forward: Forward) -> None:
        if tensor.request in self.cancelled:
            return
        shard = self.held.get(forward.layers)
        if shard is None:
            self._fail(tensor, f"{self._name(self.me)} does not hold layers "
                               f"{forward.layers[0]}-{forward.layers[1] - 1}")
            return
        if forward.fresh:
            self._stage_attempts[tensor.request] = (forward.layers, forward.entry)
        future = self._in_worker(self._compute, shard, tensor, forward)
        # straight back to the event loop from the worker (wrap_future would take two turns)
        future.add_done_callback(lambda f: self._to_loop(self._computed, f, tensor, forward))

    def _compute(self, shard: Shard, tensor: wire.Tensor, forward: Forward) -> wire.Tensor | int | str | None:
        """Worker thread: one step of one request through our layers; returns the tensor
        for the next stage, the sampled token (last stage), None (a prefill chunk), or why
        the step cannot run."""
        if tensor.request in self.cancelled:
            return None
        held = self.caches.get(tensor.request)
        if held is None:
            if not forward.fresh:  # we restarted, or dropped these layers, since its prefill
                return f"{self.daemon.core.info.name} lost the request's cache"
            held = self.caches[tensor.request] = (forward.layers, shard.make_cache())
        cache = held[1]
        out = shard.forward(wire.array_from_tensor(tensor), cache)
        if not shard.last:
            mx.eval(out)
            return wire.tensor_from_array(out, tensor.request, tensor.step, forward.next().meta())
        if not forward.sample:
            mx.eval([c.state for c in cache])
            return None
        return sample(out, forward.sampling, tensor.step)

    def _computed(self, future: concurrent.futures.Future, tensor: wire.Tensor, forward: Forward) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("stage step of request %s failed: %r", tensor.request, future.exception())
            self.deliver(wire.Token(tensor.request, tensor.step, -1, forward.entry))
            return
        out = future.result()
        if isinstance(out, str):
            self._fail(tensor, out)
        elif isinstance(out, int):
            self.deliver(wire.Token(tensor.request, tensor.step, out, forward.entry))
        elif out is not None:
            self.deliver(out)

    # ----- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = sum(1 for t in self._recent_tokens if now - t <= 5.0)
        return {
            "requests": len(self.conducting),  # entering here, in flight
            "stage_requests": len(self.caches),  # holding a KV cache in our layers
            "held": [list(r) for r in sorted(self.held)],
            "loading": None if self._loading is None else
            {"start": self._loading[0], "end": self._loading[1], "progress": self._progress},
            "weight_bytes": _weight_bytes(self.held.values()),
            "active_memory": mx.get_active_memory(),
            "tokens_per_s": recent / 5.0,
            **self.counters.__dict__,
        }


def _weight_bytes(shards) -> int:
    """Bytes of the held shards, counting a layer two of them share once."""
    from mlx.utils import tree_flatten

    seen: dict[int, int] = {}
    for shard in shards:
        for _, array in tree_flatten(shard.model.parameters()):
            seen[id(array)] = array.nbytes
    return sum(seen.values())
