"""The entry's part of serving: the requests that entered this node. Pure: no MLX, no I/O.

The entry keeps each request's prompt and the tokens produced so far, so that it can start
it again anywhere. An *attempt* runs it on one route: the entry sends stage 0 an `Admit`
with the prompt and the tokens so far, and hears the tokens back as the last stage samples
them. When a route breaks (a stage stopped answering, could not run a step, or lost its
layers) the entry starts a new attempt on the usable plan, with prompt + tokens as the
prompt and the same seed and step numbers, so that seeded and greedy sampling draw the
same tokens: the client only sees a pause. It gives up after `resume_wait` seconds without
a usable plan, or MAX_FAILURES attempts in a row without a token.

Events in (with the time and what the cluster view says: `Usable`), actions out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tbmesh.core.generation import GenerationError, Sampling, TokenLogprobs, Unavailable
from tbmesh.serving.messages import Admit, Route

MAX_FAILURES = 6  # attempts in a row without a token before a request gives up (~3 s of back-off)
BACKOFF_S = 0.05  # before the route that just failed is tried again; doubles with each failure

Usable = tuple[Route, int] | str  # the running plan's route and epoch, or why none serves


@dataclass
class Request:
    id: str
    prompt: list[int]
    max_tokens: int
    sampling: Sampling  # seeded once, so that every attempt draws the same tokens
    ends: tuple[int, ...]
    started: float
    tokens: list[int] = field(default_factory=list)
    attempt: str = ""  # the attempt under way; "" while waiting for a usable route
    route: Route = ()
    attempts: int = 0
    failures: int = 0  # attempts in a row that ended without a token
    produced_at_start: int = 0  # len(tokens) when the attempt under way started
    waiting_since: float = 0.0
    failed_route: Route = ()  # taken again only from retry_at on
    retry_at: float = 0.0
    why: str = ""  # why the last attempt ended


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendAdmit:
    admit: Admit


@dataclass(frozen=True)
class SendCancel:
    """Tell stage 0 that the attempt is over (its caches become a prefix-cache entry)."""

    attempt: str
    to: str


@dataclass(frozen=True)
class Emit:
    request: str
    token: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class Finish:
    request: str


@dataclass(frozen=True)
class Fail:
    request: str
    error: GenerationError


@dataclass(frozen=True)
class Resumed:
    """An attempt started again (for the event log)."""

    request: str
    epoch: int
    tokens: int
    after: float  # s since the request started


Action = SendAdmit | SendCancel | Emit | Finish | Fail | Resumed


class Conductor:
    def __init__(self, me: str, resume_wait: float, new_id: Callable[[], str]) -> None:
        self.me = me
        self.resume_wait = resume_wait
        self.new_id = new_id
        self.requests: dict[str, Request] = {}
        self._by_attempt: dict[str, Request] = {}
        self.resumed = 0  # attempts started again
        self.streamed = 0  # tokens emitted

    def submit(self, prompt: list[int], max_tokens: int, sampling: Sampling, ends: tuple[int, ...],
               now: float, usable: Usable) -> tuple[str, list[Action]]:
        """A new request; its id, and what to do."""
        request = Request(self.new_id(), list(prompt), max_tokens, sampling.seeded(), ends, now,
                          waiting_since=now)
        self.requests[request.id] = request
        return request.id, self._start(request, now, usable)

    def close(self, request_id: str) -> list[Action]:
        """The request's consumer is gone or has all it wants (a stop string, the end)."""
        request = self.requests.pop(request_id, None)
        return [] if request is None else self._end_attempt(request)

    def on_tokens(self, sampled: list[tuple[str, int, int]], now: float,
                  logprobs: dict[str, TokenLogprobs] | None = None) -> list[Action]:  # fmt: skip
        """Tokens (attempt, step, token) the last stage of some route sampled, and the
        log-probabilities of those (by attempt) whose request asked for them."""
        actions: list[Action] = []
        for attempt, step, token in sampled:
            request = self._by_attempt.get(attempt)
            if request is None or step != len(request.tokens):
                continue  # an attempt that ended, or a token it had already
            if token in request.ends:
                actions += self._finish(request)
                continue
            request.tokens.append(token)
            request.failures = 0
            self.streamed += 1
            actions.append(Emit(request.id, token, (logprobs or {}).get(attempt)))
            if len(request.tokens) >= request.max_tokens:
                actions += self._finish(request)
        return actions

    def on_failed(self, attempt: str, why: str, preempted: bool, now: float, usable: Usable) -> list[Action]:
        """A stage could not run the attempt (`preempted`: stage 0 needed its KV room; not a
        failure, it waits for room)."""
        request = self._by_attempt.get(attempt)
        if request is None:
            return []
        return self._broken(request, why, now, usable, counts=not preempted)

    def on_node_trouble(self, node: str, now: float, usable: Usable) -> list[Action]:
        """A node stopped answering, restarted or left: a step of ours on its way through it
        may be lost with its connection, so attempts routed through it start again."""
        actions: list[Action] = []
        for request in list(self._by_attempt.values()):
            if any(n == node for n, _, _ in request.route):
                actions += self._broken(request, f"{node} stopped answering", now, usable)
        return actions

    def on_link_trouble(self, crosses: Callable[[Route, str], bool], why: str, now: float,
                        usable: Usable) -> list[Action]:
        """A connection between two nodes broke: attempts whose route (or entry) `crosses` it
        start again at once. Not a failure of the route: both nodes are still there."""
        actions: list[Action] = []
        for request in list(self._by_attempt.values()):
            if crosses(request.route, self.me):
                actions += self._broken(request, why, now, usable, counts=False)
        return actions

    def tick(self, now: float, usable: Usable, hopeless: bool = False) -> list[Action]:
        """Start the requests waiting for a usable route, or fail them at their deadline. A
        request never started fails at once when waiting is `hopeless` (the model does not
        fit: `usable` says why); one in flight waits its resume_wait (a Mac may come back)."""
        actions: list[Action] = []
        for request in list(self.requests.values()):
            if request.attempt:
                continue
            if hopeless and isinstance(usable, str) and not request.attempts:
                self.requests.pop(request.id, None)
                actions.append(Fail(request.id, Unavailable(usable)))
            else:
                actions += self._start(request, now, usable)
        return actions

    @property
    def waiting(self) -> bool:
        return any(not r.attempt for r in self.requests.values())

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do though no event came: a waiting request's
        back-off ends (the route that failed may be taken again) or its resume_wait is up.
        A view that changes (a route becomes usable, or the model stops fitting) is an
        event: the caller ticks then too. None while no request waits."""
        deadlines = []
        for request in self.requests.values():
            if not request.attempt:
                deadlines.append(request.waiting_since + self.resume_wait)
                if request.failed_route:
                    deadlines.append(request.retry_at)
        return min(deadlines, default=None)

    # ----- attempts ------------------------------------------------------------------------

    def _start(self, request: Request, now: float, usable: Usable) -> list[Action]:
        if request.failed_route and now >= request.retry_at:
            request.failed_route = ()  # its back-off is over: no deadline of it any more
        if isinstance(usable, str) or (usable[0] == request.failed_route and now < request.retry_at):
            if now - request.waiting_since < self.resume_wait:
                return []
            self.requests.pop(request.id, None)
            why = usable if isinstance(usable, str) else request.why
            return [Fail(request.id, Unavailable(why))]
        route, epoch = usable
        actions: list[Action] = []
        if request.attempts:
            self.resumed += 1
            actions.append(Resumed(request.id, epoch, len(request.tokens), now - request.started))
        request.attempt, request.route = f"{request.id}.{request.attempts}", route
        request.attempts += 1
        request.produced_at_start = len(request.tokens)
        self._by_attempt[request.attempt] = request
        admit = Admit(request.attempt, route, self.me, tuple(request.prompt + request.tokens),
                      len(request.tokens), request.max_tokens, request.sampling, request.ends)
        return actions + [SendAdmit(admit)]

    def _broken(self, request: Request, why: str, now: float, usable: Usable, counts: bool = True) -> list[Action]:
        route = request.route
        actions = self._end_attempt(request)
        if counts:
            request.failures = 0 if len(request.tokens) > request.produced_at_start else request.failures + 1
        if request.failures > MAX_FAILURES:
            self.requests.pop(request.id, None)
            return actions + [Fail(request.id, Unavailable(
                f"the request failed {request.failures} times in a row: {why}"))]
        request.why, request.waiting_since = why, now
        if counts:
            request.failed_route, request.retry_at = route, now + BACKOFF_S * 2 ** request.failures
        return actions + self._start(request, now, usable)

    def _finish(self, request: Request) -> list[Action]:
        self.requests.pop(request.id, None)
        return self._end_attempt(request) + [Finish(request.id)]

    def _end_attempt(self, request: Request) -> list[Action]:
        if not request.attempt:
            return []
        del self._by_attempt[request.attempt]
        cancel = SendCancel(request.attempt, request.route[0][0])
        request.attempt, request.route = "", ()
        return [cancel]
