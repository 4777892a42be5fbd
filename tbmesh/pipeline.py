"""The data plane: serve this node's stage of the plan, and conduct the requests that enter here.

A request is conducted by the node whose API it entered (its *entry*): the entry tokenizes,
sends the prompt to stage 0, and for every token the last stage samples it streams the token
to the client and feeds it back to stage 0. Stages pass hidden states along as raw tensors;
each keeps the KV cache of its own layers per request. All MLX work runs in one worker
thread, in order, so the event loop (and the heartbeats) never wait for it.

    entry --Tensor(tokens)--> stage 0 --Tensor(hidden)--> ... --> last stage
      ^                                                             |
      +--------------------------Token(sampled)---------------------+
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from tbmesh.core.messages import ShardState
from tbmesh.core.types import Plan
from tbmesh.net import wire
from tbmesh.openai_api import ApiError, GenerationParams
from tbmesh.runtime.sampling import Sampling, sample
from tbmesh.runtime.shard import Shard, load_shard

if TYPE_CHECKING:
    from tbmesh.daemon import Daemon

log = logging.getLogger(__name__)

PREFILL_STEP = 2048  # as mlx-lm's generate_step: same chunks, same floating-point results


class PipelineBroken(Exception):
    """The request cannot go on in this plan (a stage went away, the plan changed)."""


@dataclass(frozen=True)
class Forward:
    """What a stage needs to know about a tensor, beyond the tensor (Tensor.meta on the wire)."""

    to: str  # the node that must run stage `stage`
    entry: str  # where sampled tokens go
    stage: int
    epoch: int
    sample: bool  # the last stage samples after this step (false for early prefill chunks)
    temperature: float
    top_p: float
    seed: int | None

    def meta(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Forward:
        """Validated: a peer's tensor meta is untrusted input."""
        try:
            forward = cls(str(meta["to"]), str(meta["entry"]), int(meta["stage"]),
                          int(meta["epoch"]), bool(meta["sample"]), float(meta["temperature"]),
                          float(meta["top_p"]), None if meta["seed"] is None else int(meta["seed"]))
            forward.sampling  # noqa: B018  (validates the sampling fields)
        except (KeyError, TypeError, ValueError) as error:
            raise wire.ProtocolError(f"tensor meta: {error}") from None
        if forward.stage < 0:
            raise wire.ProtocolError(f"tensor meta: stage {forward.stage}")
        return forward

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


class Pipeline:
    def __init__(self, daemon: Daemon, model_dir: Path | None) -> None:
        self.daemon = daemon
        self.model_dir = model_dir
        self.model_name = model_dir.name if model_dir is not None else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self.shard: Shard | None = None
        self.shard_state: ShardState | None = None
        self.caches: dict[str, list] = {}  # request -> KV cache of our layers (worker thread only)
        self.cancelled: collections.deque[str] = collections.deque(maxlen=4096)
        self.conducting: dict[str, asyncio.Queue] = {}  # request -> tokens (entry side)
        self.conducting_epoch: dict[str, int] = {}
        self._tokenizer: Any = None
        self._loading: tuple[int, int] | None = None

    @property
    def me(self) -> str:
        return self.daemon.core.id

    async def close(self) -> None:
        for queue in self.conducting.values():
            queue.put_nowait(PipelineBroken("the node is stopping"))
        # MLX 0.32 aborts the process at exit (SIGABRT) now and then when a thread that used
        # it still has streams: clear them in that thread first (ml-explore/mlx#3126)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(self.executor.submit(mx.clear_streams)), 10)
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ----- following the plan ----------------------------------------------------------

    def on_plan(self, plan: Plan | None) -> None:
        """Called after every change of the view: load our stage when the plan moves it."""
        for request, epoch in list(self.conducting_epoch.items()):
            if plan is None or plan.epoch != epoch:
                self.conducting[request].put_nowait(PipelineBroken("the cluster re-planned"))
        stage = plan.stage_of(self.me) if plan is not None and plan.model == self.model_name else None
        if stage is None:
            self._loading = None  # a load still under way is for a plan we are not in
            if self.shard_state is not None:
                self._publish(None)
                self.executor.submit(self._drop)
            return
        wanted = (stage.start, stage.end)
        held = self.shard_state
        if held is not None and (held.start, held.end) == wanted and held.progress >= 1.0:
            if held.epoch != plan.epoch:  # same layers in a new plan: nothing to load
                self._publish(ShardState(held.model, stage.start, stage.end, plan.epoch))
            return
        if self._loading == wanted:
            return
        self._loading = wanted
        self._publish(ShardState(self.model_name, stage.start, stage.end, plan.epoch, 0.0))
        future = self.executor.submit(self._load, stage.start, stage.end)
        asyncio.wrap_future(future).add_done_callback(
            lambda f, epoch=plan.epoch, want=wanted: self._loaded(f, epoch, want))

    def _load(self, start: int, end: int) -> Shard:
        self._drop()
        return load_shard(self.model_dir, start, end)

    def _drop(self) -> None:
        self.shard = None
        self.caches.clear()
        mx.clear_cache()

    def _loaded(self, future: asyncio.Future, epoch: int, wanted: tuple[int, int]) -> None:
        if self._loading != wanted:
            return  # superseded by a newer plan
        self._loading = None
        if future.cancelled() or future.exception() is not None:
            log.error("loading layers %d-%d failed: %r", *wanted,
                      None if future.cancelled() else future.exception())
            self._publish(None)
            return
        self.shard = future.result()
        log.info("loaded layers %d-%d (%.1f MB)", wanted[0], wanted[1] - 1,
                 self.shard.weight_bytes / 1e6)
        plan = self.daemon.core.plan  # the same layers may belong to a newer plan by now
        stage = plan.stage_of(self.me) if plan is not None else None
        if stage is not None and (stage.start, stage.end) == wanted:
            epoch = plan.epoch
        self._publish(ShardState(self.model_name, wanted[0], wanted[1], epoch))

    def _publish(self, state: ShardState | None) -> None:
        self.shard_state = state
        self.daemon.carry_out(self.daemon.core.set_shard(state, self.daemon.now()))

    # ----- the entry side: what the OpenAI API calls --------------------------------------

    def models(self) -> list[str]:
        return [self.model_name] if self.model_name else []

    def tokenizer(self, model: str) -> Any:
        if self._tokenizer is None:
            from mlx_lm.utils import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def unavailable(self, model: str) -> ApiError | None:
        core = self.daemon.core
        plan = core.plan
        if plan is None:
            if core.no_fit:
                return ApiError(503, f"the model does not fit the cluster: {core.no_fit}",
                                "service_unavailable")
            waiting = "a leader" if core.leader is None else "the leader's plan"
            return ApiError(503, f"no plan yet: waiting for {waiting}", "service_unavailable")
        shards = core.shards()
        names = {n: i.name for n, i in core.node_infos().items()}
        loading = []
        for stage in plan.stages:
            held = shards.get(stage.node)
            if held is None or (held.start, held.end, held.epoch) != (stage.start, stage.end, plan.epoch) \
                    or held.progress < 1.0:
                progress = f" {held.progress:.0%}" if held is not None and held.progress < 1 else ""
                loading.append(f"{names.get(stage.node, stage.node)} (layers {stage.start}-"
                               f"{stage.end - 1}{progress})")
        if loading:
            return ApiError(503, "waiting for shards to load: " + ", ".join(loading),
                            "service_unavailable")
        return None

    async def generate(self, model: str, prompt: list[int], params: GenerationParams) -> AsyncIterator[int]:
        """Run one request through the pipeline; yields sampled tokens until EOS or max_tokens."""
        plan = self.daemon.core.plan
        if plan is None or (error := self.unavailable(model)) is not None:
            raise error or ApiError(503, "no plan yet", "service_unavailable")
        request = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.conducting[request] = queue
        self.conducting_epoch[request] = plan.epoch
        eos = set(self.tokenizer(model).eos_token_ids)
        # the seed is fixed once per request, so a replay draws the same tokens
        sampling = Sampling(params.temperature, params.top_p, params.seed).seeded()
        try:
            rest = list(prompt)
            while len(rest) > 1:  # all but the last prompt token, in mlx-lm's chunks
                chunk, rest = rest[: min(PREFILL_STEP, len(rest) - 1)], rest[min(PREFILL_STEP, len(rest) - 1):]
                self._send_tokens(request, plan, 0, chunk, sampling, sample=False)
            self._send_tokens(request, plan, 0, rest, sampling, sample=True)
            for step in range(params.max_tokens):
                token = await queue.get()
                if isinstance(token, Exception):
                    raise token
                if token in eos:
                    return
                yield token
                if step + 1 < params.max_tokens:
                    self._send_tokens(request, plan, step + 1, [token], sampling, sample=True)
        finally:
            del self.conducting[request]
            del self.conducting_epoch[request]
            for stage in plan.stages:  # free the caches everywhere, whatever ended the request
                self.deliver(wire.Cancel(request, stage.node, "finished"))

    def _send_tokens(self, request: str, plan: Plan, step: int, tokens: list[int],
                     sampling: Sampling, sample: bool) -> None:
        forward = Forward(plan.stages[0].node, self.me, 0, plan.epoch, sample,
                          sampling.temperature, sampling.top_p, sampling.seed)
        array = np.array([tokens], dtype=np.int32)  # numpy: no MLX on the event loop
        self.deliver(wire.tensor_from_array(array, request, step, forward.meta()))

    # ----- delivery: direct, relayed, or to ourselves ------------------------------------

    def deliver(self, message: wire.Tensor | wire.Token | wire.Cancel) -> None:
        to = message.meta["to"] if isinstance(message, wire.Tensor) else message.to
        if to == self.me:
            self.receive(message)
        elif not self.daemon.send_to(to, message):
            log.warning("no route to %s: dropping %s of request %s", to,
                        type(message).__name__.lower(), message.request)
            if isinstance(message, wire.Tensor) and message.request in self.conducting:
                self.conducting[message.request].put_nowait(PipelineBroken(f"no route to {to}"))

    def receive(self, message: wire.Tensor | wire.Token | wire.Cancel) -> None:
        """A data-plane message for us, or one to pass on toward its node."""
        to = message.meta.get("to") if isinstance(message, wire.Tensor) else message.to
        if to != self.me:
            self.deliver(message)
            return
        if isinstance(message, wire.Token):
            queue = self.conducting.get(message.request)
            if queue is not None:  # a negative token: the step failed at some stage
                queue.put_nowait(message.token if message.token >= 0
                                 else PipelineBroken("a stage failed to compute its step"))
        elif isinstance(message, wire.Cancel):
            self.cancelled.append(message.request)
            self.executor.submit(self.caches.pop, message.request, None)  # after queued work
        else:
            self._run_stage(message, Forward.from_meta(message.meta))

    def _run_stage(self, tensor: wire.Tensor, forward: Forward) -> None:
        shard, plan = self.shard, self.daemon.core.plan
        if tensor.request in self.cancelled:
            return
        if shard is None or plan is None or forward.epoch != plan.epoch \
                or forward.stage >= len(plan.stages) or plan.stages[forward.stage].node != self.me:
            log.info("dropping a step of request %s: not our stage in epoch %d", tensor.request,
                     forward.epoch)
            return
        future = self.executor.submit(self._compute, shard, plan, tensor, forward)
        asyncio.wrap_future(future).add_done_callback(lambda f: self._computed(f, tensor, forward))

    def _compute(self, shard: Shard, plan: Plan, tensor: wire.Tensor, forward: Forward) -> wire.Tensor | int | None:
        """Worker thread: one step of one request through our layers; returns the tensor
        for the next stage, the sampled token (last stage), or None (a prefill chunk)."""
        if tensor.request in self.cancelled:
            return None
        cache = self.caches.get(tensor.request)
        if cache is None:
            cache = self.caches[tensor.request] = shard.make_cache()
        out = shard.forward(wire.array_from_tensor(tensor), cache)
        if not shard.last:
            mx.eval(out)
            nxt = forward.stage + 1
            meta = Forward(plan.stages[nxt].node, forward.entry, nxt, forward.epoch, forward.sample,
                           forward.temperature, forward.top_p, forward.seed).meta()
            return wire.tensor_from_array(out, tensor.request, tensor.step, meta)
        if not forward.sample:
            mx.eval([c.state for c in cache])
            return None
        return sample(out, forward.sampling, tensor.step)

    def _computed(self, future: asyncio.Future, tensor: wire.Tensor, forward: Forward) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("stage step of request %s failed: %r", tensor.request, future.exception())
            self.deliver(wire.Token(tensor.request, tensor.step, -1, forward.entry))
            return
        out = future.result()
        if isinstance(out, int):
            self.deliver(wire.Token(tensor.request, tensor.step, out, forward.entry))
        elif out is not None:
            self.deliver(out)

    # ----- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "requests": len(self.conducting),  # entering here, in flight
            "stage_requests": len(self.caches),  # holding a KV cache in our layers
            "weight_bytes": self.shard.weight_bytes if self.shard else 0,
            "active_memory": mx.get_active_memory(),
        }
