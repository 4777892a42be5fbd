"""Stage 0's part of serving: what the stages of a route run next. Pure: no MLX, no I/O.

The node of a route's stage 0 receives the attempts (`Admit`) of every entry, and is asked
for the next `Step` whenever its MLX worker is free (`next_step`). It decides everything
that shapes the stages' KV caches, and the other stages replay its decisions in order:

- **Admission.** The stages hold at most `context` tokens of KV (the room the planner
  reserved), counting every live cache as its tokens + KV_BLOCK and every prefix-cache entry
  as its tokens. An attempt is admitted when its prompt fits beside what is held, after
  evicting prefix-cache entries, least recently used first; otherwise it waits, first come
  first served. Before a decode step would overflow, entries go first, then the youngest
  attempt is *preempted*: its caches are freed and its entry starts it again later
  (re-prefilling prompt + tokens so far; seeded and greedy sampling draw the same tokens).
  An attempt alone on the route is never held back.
- **The prefix cache** (prefix_cache.py): an admitted prompt starts from the entry sharing
  its longest prefix; a finished answer is kept as an entry (prompt + answer), for the next
  turn of the conversation.
- **Continuous batching in lanes.** Decoding attempts run in *lanes*: batches whose KV
  caches every stage keeps together (mlx-lm's BatchKVCache), one forward per lane step. A
  route has as many lanes as stages, so that each stage can work on one lane while the
  others are on their way (pipeline fill). Attempts join a lane when it comes back to
  stage 0 and leave it when they end, without stopping the others.
- **Chunked prefill, decode first.** A prompt is prefilled in chunks of at most
  `prefill_chunk` tokens, and a decode step of a ready lane runs before each chunk after the
  first: a long prompt slows the streams already decoding (one chunk per lane step) but
  never freezes them (vLLM's chunked prefill, with one chunk per step as its budget).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from tbmesh.core.status import SchedulerStatus
from tbmesh.serving.messages import (
    Admit,
    Constraint,
    Member,
    Origin,
    Release,
    Route,
    Step,
)
from tbmesh.serving.prefix_cache import PrefixIndex
from tbmesh.serving.settings import KV_BLOCK, ServingSettings


@dataclass
class Attempt:
    admit: Admit
    tokens: list[int]  # the prompt, then every token produced (by earlier attempts too)
    order: int  # admission order: larger is younger
    cached: int = 0  # tokens the stages' caches hold once the steps sent so far have run
    origin: Origin | None = None  # where its caches start; sent with its first step
    sent: bool = False  # a step of it has gone to the stages (its caches exist there)
    step: int = 0  # the step it samples next
    lane: Lane | None = None

    @property
    def id(self) -> str:
        return self.admit.attempt

    @property
    def prefilled(self) -> bool:
        """All but the last token are in its caches: it decodes from here."""
        return self.cached >= len(self.tokens) - 1


@dataclass
class Lane:
    id: str
    members: list[Attempt] = field(default_factory=list)  # the batch's rows, in order
    in_flight: list[Attempt] | None = None  # the members of the step on its way


@dataclass
class Book:
    """All that stage 0 keeps for one route."""

    route: Route
    waiting: deque[Attempt] = field(default_factory=deque)  # not admitted yet
    prefilling: deque[Attempt] = field(default_factory=deque)  # admitted, prompt not all in
    ready: list[Attempt] = field(default_factory=list)  # prefilled, waiting for a lane
    lanes: list[Lane] = field(default_factory=list)
    index: PrefixIndex = field(default_factory=PrefixIndex)
    releases: list[Release] = field(default_factory=list)  # to send with its next step
    evictions: list[str] = field(default_factory=list)
    retired: bool = False  # no new attempts: it goes once its attempts have ended

    def live(self) -> Iterator[Attempt]:
        """Admitted attempts."""
        yield from self.prefilling
        yield from self.ready
        for lane in self.lanes:
            yield from lane.members

    def held(self) -> int:
        """KV positions the stages hold for this route (see the module notes)."""
        lanes = sum(_lane_room(lane.members) for lane in self.lanes)
        # an attempt outside a lane has room for its whole prompt from its admission on
        alone = sum(len(a.tokens) + KV_BLOCK for a in itertools.chain(self.prefilling, self.ready))
        return lanes + alone + self.index.tokens


def _lane_room(members: list[Attempt], grow: int = 0) -> int:
    """Positions a lane's batched cache holds: every row as long as the longest."""
    return len(members) * (max(a.cached for a in members) + grow + KV_BLOCK) if members else 0


@dataclass(frozen=True)
class Refused:
    """An attempt stage 0 gives up on: its entry hears why (`preempted`: start it again)."""

    attempt: str
    entry: str
    reason: str
    preempted: bool = False


@dataclass
class SchedulerStats:
    admitted: int = 0
    preempted: int = 0
    decode_steps: int = 0
    decoded: int = 0  # tokens sampled in decode steps
    prefill_steps: int = 0
    prefilled: int = 0  # prompt tokens prefilled (not taken from the prefix cache)


class Scheduler:
    def __init__(self, settings: ServingSettings, new_id: Callable[[], str]) -> None:
        self.settings = settings
        self.new_id = new_id  # unique ids for lanes and prefix-cache entries
        self.books: dict[Route, Book] = {}
        self.stats = SchedulerStats()
        self._order = itertools.count()
        self._turn = 0  # which book goes first (round robin)
        self._last_prefill = False  # the last step was a prefill chunk: a decode step may go first
        self.refused: list[Refused] = []  # to tell the entries; the caller takes them

    # ----- events ------------------------------------------------------------------------

    def admit(self, admit: Admit) -> None:
        book = self.books.setdefault(admit.route, Book(admit.route))
        book.waiting.append(Attempt(admit, list(admit.tokens), next(self._order), step=admit.produced))

    def cancel(self, attempt: str, failed: bool) -> None:
        """The entry ended the attempt (its caches are kept as a prefix-cache entry: the
        next turn of a conversation, or the same request started again, starts from it), or
        a stage could not run it (`failed`: freed; and if it started from an entry some
        stage did not hold, that entry goes)."""
        for book in self.books.values():
            found = self._find(book, attempt)
            if found is not None:
                if failed and found.origin is not None and found.origin.entry in book.index:
                    book.index.remove(found.origin.entry)
                    book.evictions.append(found.origin.entry)
                self._end(book, found, save=not failed)
                self._tidy(book)
                return

    def on_tokens(self, lane_id: str, sampled: dict[str, tuple[int, int]]) -> None:
        """The last stage sampled a lane step: attempt -> (step, token). Members with no token
        failed on the way (their entries heard why): they leave the lane."""
        for book in self.books.values():
            lane = next((lane for lane in book.lanes if lane.id == lane_id), None)
            if lane is None:
                continue
            stepped, lane.in_flight = lane.in_flight or [], None
            for attempt in stepped:
                if attempt.lane is not lane:
                    continue  # it ended while its step was on its way
                step, token = sampled.get(attempt.id, (-1, -1))
                if step != attempt.step:
                    self._end(book, attempt, save=False)
                    continue
                attempt.tokens.append(token)
                attempt.step += 1
                self.stats.decoded += 1
                if token in attempt.admit.ends or attempt.step >= attempt.admit.max_tokens:
                    self._end(book, attempt, save=True)
            self._tidy(book)
            return

    def drop_routes_through(self, node: str) -> list[tuple[str, str]]:
        """A node of these routes is gone: their attempts are gone (their entries start them
        again elsewhere), and so are the prefix caches (the other stages drop theirs too).
        Returns the attempts dropped, with their entries."""
        return self._drop(lambda route: any(n == node for n, _, _ in route))

    def drop_routes_from(self, node: str, layers: tuple[int, int]) -> list[tuple[str, str]]:
        """Stage 0 of these routes (`node`, `layers`) dropped its layers: as above."""
        return self._drop(lambda route: route[0] == (node, *layers))

    def break_attempts(self, crosses: Callable[[Route, str], bool]) -> list[tuple[str, str]]:
        """A connection broke: the attempts whose route (or entry) `crosses` it end, unsaved
        (a step or its tokens may be lost on the way, so the stages' caches may disagree),
        and their lanes with them. Returns them with their entries, to start again."""
        broken = []
        for book in self.books.values():
            for attempt in [a for a in itertools.chain(book.waiting, book.live())
                            if crosses(book.route, a.admit.entry)]:
                broken.append((attempt.id, attempt.admit.entry))
                self._end(book, attempt, save=False)
            self._tidy(book)
        return broken

    def drop_entered_by(self, node: str) -> None:
        """The entry `node` is gone: its attempts end (no Cancel will come from it)."""
        for book in self.books.values():
            for attempt in [a for a in itertools.chain(book.waiting, book.live()) if a.admit.entry == node]:
                self._end(book, attempt, save=False)
            self._tidy(book)

    def take_refused(self) -> list[Refused]:
        """Attempts given up since the last call, for their entries to hear."""
        refused, self.refused = self.refused, []
        return refused

    def _drop(self, dropped: Callable[[Route], bool]) -> list[tuple[str, str]]:
        gone = []
        for route in [r for r in self.books if dropped(r)]:
            book = self.books.pop(route)
            gone += [(a.id, a.admit.entry) for a in itertools.chain(book.waiting, book.live())]
        return gone

    def retire(self, current: set[Route]) -> None:
        """Routes no longer served take no new attempts; once their attempts have ended, their
        prefix-cache entries are evicted on every stage and the route is forgotten."""
        for route, book in self.books.items():
            book.retired = route not in current

    # ----- the next step -----------------------------------------------------------------

    def next_step(self) -> tuple[Step, list[int]] | None:
        """What the stages run next, and stage 0's input tokens (a decode step: one per
        member; a prefill chunk: the chunk). None when nothing is waiting."""
        books = list(self.books.values())
        for book in books:
            self._admit_waiting(book)
        turn = self._turn % len(books) if books else 0
        self._turn += 1
        books = books[turn:] + books[:turn]
        decode = next(((b, lane) for b in books if (lane := self._lane_for(b)) is not None), None)
        prefill = next((b for b in books if b.prefilling), None)
        if prefill is not None and (not self._last_prefill or decode is None):
            self._last_prefill = True
            return self._prefill(prefill)
        if decode is not None and (found := self._decode(*decode)) is not None:
            self._last_prefill = False
            return found
        if prefill is not None:
            return self._prefill(prefill)
        for book in books:
            if book.releases or book.evictions:
                return self._with_instructions(book, Step(book.route, 0, "flush")), []
        for route in [r for r, b in self.books.items() if b.retired and self._idle(b)]:
            book = self.books[route]
            if len(book.index):
                book.evictions += book.index.clear()
                return self._with_instructions(book, Step(book.route, 0, "flush")), []
            del self.books[route]
        return None

    def _lane_for(self, book: Book) -> Lane | None:
        """The lane to step next: one back at stage 0 with members (the fullest first), or
        for new joiners a new lane while the route has fewer lanes than stages, else the
        emptiest lane back at stage 0. Not added to the book yet."""
        idle = [lane for lane in book.lanes if lane.in_flight is None]
        if not book.ready:
            return max((lane for lane in idle if lane.members), key=lambda lane: len(lane.members), default=None)
        if len(book.lanes) < len(book.route):
            return Lane(self.new_id())
        return min(idle, key=lambda lane: len(lane.members), default=None)

    def _decode(self, book: Book, lane: Lane) -> tuple[Step, list[int]] | None:
        if lane not in book.lanes:
            book.lanes.append(lane)
        # room for the members' next token: prefix-cache entries go, then the youngest attempts
        while lane.members and not self._make_room(book, _lane_room(lane.members, 1) - _lane_room(lane.members)):
            if self._live(book) <= 1:
                break  # alone: never held back
            self._preempt(book, max(book.live(), key=lambda a: a.order))
        # the lanes share the decoding attempts evenly, so each stage has one to work on
        if lane.members:
            share = -(-(sum(len(other.members) for other in book.lanes) + len(book.ready)) // len(book.route))
        else:  # a new lane: its share of the joiners, with the lanes still to come
            share = -(-len(book.ready) // (len(book.route) - len(book.lanes) + 1))
        size = min(self.settings.max_batch, max(len(lane.members), share))
        while book.ready and len(lane.members) < size:
            joiner = book.ready[0]
            grown = _lane_room(lane.members + [joiner], 1) - _lane_room(lane.members, 1) \
                - (len(joiner.tokens) + KV_BLOCK)
            if not self._make_room(book, grown) and self._live(book) > 1:
                break
            book.ready.pop(0)
            joiner.lane = lane
            lane.members.append(joiner)
        if not lane.members:
            book.lanes.remove(lane)
            return None
        members = []
        for attempt in lane.members:
            members.append(self._member(attempt))
            attempt.cached += 1
        lane.in_flight = list(lane.members)
        self.stats.decode_steps += 1
        # one stage may build the lane's next step ahead; worth it when that step will most
        # likely be the same rows again (nobody waits to join, nobody reaches max_tokens)
        ahead = len(book.route) == 1 and not (book.waiting or book.prefilling or book.ready) \
            and all(a.step + 1 < a.admit.max_tokens for a in lane.members)
        step = Step(book.route, 0, "decode", lane.id, tuple(members), ahead=ahead)
        return self._with_instructions(book, step), [a.tokens[-1] for a in lane.members]

    def _prefill(self, book: Book) -> tuple[Step, list[int]]:
        attempt = book.prefilling[0]
        start = attempt.cached
        length = min(self.settings.prefill_chunk, len(attempt.tokens) - 1 - start)
        member = self._member(attempt)
        attempt.cached += length
        if attempt.prefilled:
            book.prefilling.popleft()
            book.ready.append(attempt)
        self.stats.prefill_steps += 1
        self.stats.prefilled += length
        step = Step(book.route, 0, "prefill", "", (member,), start, length)
        return self._with_instructions(book, step), attempt.tokens[start:start + length]

    @staticmethod
    def _member(attempt: Attempt) -> Member:
        """The attempt in a step; its first one says where its caches start."""
        origin = None if attempt.sent else attempt.origin or Origin()
        attempt.sent = True
        admit, constraint = attempt.admit, None
        if origin is not None and admit.sampling.grammar is not None:  # the last stage builds its matcher
            constraint = Constraint(admit.sampling.grammar, admit.tokens[len(admit.tokens) - admit.produced:])
        return Member(attempt.id, admit.entry, attempt.step, attempt.cached, admit.sampling, origin, constraint)

    def _with_instructions(self, book: Book, step: Step) -> Step:
        releases, evictions = tuple(book.releases), tuple(book.evictions)
        book.releases, book.evictions = [], []
        return replace(step, releases=releases, evictions=evictions)

    # ----- admission and room ------------------------------------------------------------

    def _admit_waiting(self, book: Book) -> None:
        while book.waiting:
            attempt = book.waiting[0]
            if self.settings.prefix_cache and attempt.admit.use_cache:
                attempt.origin = book.index.lookup(attempt.tokens, len(attempt.tokens) - 1)
            if not self._make_room(book, len(attempt.tokens) + KV_BLOCK, also=attempt) and self._live(book):
                attempt.origin = None
                return
            book.waiting.popleft()
            attempt.cached = attempt.origin.length if attempt.origin else 0
            (book.ready if attempt.prefilled else book.prefilling).append(attempt)
            self.stats.admitted += 1

    def _make_room(self, book: Book, need: int, also: Attempt | None = None) -> bool:
        """Whether `need` more positions fit, evicting prefix-cache entries (least recently
        used first; not one an attempt is about to start from) if they must go."""
        pinned = {a.origin.entry for a in itertools.chain(book.live(), [also] if also else [])
                  if not a.sent and a.origin is not None}
        while book.held() + need > self.settings.context:
            entry = book.index.oldest(skip=pinned)
            if entry is None:
                return False
            book.index.remove(entry)
            book.evictions.append(entry)
        return True

    @staticmethod
    def _live(book: Book) -> int:
        return sum(1 for _ in book.live())

    def _preempt(self, book: Book, attempt: Attempt) -> None:
        self.stats.preempted += 1
        self.refused.append(Refused(attempt.id, attempt.admit.entry,
                                    f"preempted: the KV room of stage 0 ({self.settings.context} tokens) "
                                    "is full", preempted=True))
        self._end(book, attempt, save=False)

    # ----- ending ------------------------------------------------------------------------

    def _find(self, book: Book, attempt: str) -> Attempt | None:
        return next((a for a in itertools.chain(book.waiting, book.live()) if a.id == attempt), None)

    def _end(self, book: Book, attempt: Attempt, save: bool) -> None:
        """Take the attempt out; its caches on the stages are freed or kept as an entry."""
        for queue in (book.waiting, book.prefilling):
            if attempt in queue:
                queue.remove(attempt)
        if attempt in book.ready:
            book.ready.remove(attempt)
        if attempt.lane is not None:
            attempt.lane.members.remove(attempt)
            attempt.lane = None
        if not attempt.sent:
            return
        entry = ""
        if save and self.settings.prefix_cache and attempt.cached > 0 and not book.retired:
            entry = self.new_id()
            book.evictions += book.index.insert(entry, attempt.tokens[: attempt.cached])
        book.releases.append(Release(attempt.id, attempt.cached, entry))
        attempt.sent = False

    def _tidy(self, book: Book) -> None:
        """A lane with no members left is gone (a step of it on its way finds no lane)."""
        book.lanes = [lane for lane in book.lanes if lane.members]

    @staticmethod
    def _idle(book: Book) -> bool:
        return not book.waiting and not Scheduler._live(book) and not book.releases and not book.evictions

    # ----- status ------------------------------------------------------------------------

    def status(self) -> SchedulerStatus:
        books = list(self.books.values())
        stats = self.stats
        return SchedulerStatus(
            queued=sum(len(b.waiting) for b in books),
            decoding=sum(len(lane.members) for b in books for lane in b.lanes),
            kv_tokens=sum(b.held() for b in books),
            kv_room=self.settings.context,
            prefix_hits=sum(b.index.stats.hits for b in books),
            prefix_lookups=sum(b.index.stats.lookups for b in books),
            prefix_hit_tokens=sum(b.index.stats.hit_tokens for b in books),
            admitted=stats.admitted, preempted=stats.preempted, decode_steps=stats.decode_steps,
            decoded=stats.decoded, prefill_steps=stats.prefill_steps, prefilled=stats.prefilled,
        )
