"""Stage 0's scheduler (serving/scheduler.py) driven directly: which step goes next. No MLX
(test_serving_batch.py runs its steps on real layers)."""

from __future__ import annotations

import itertools

from tbmesh.core.generation import Sampling
from tbmesh.serving.messages import Admit, Origin, Release
from tbmesh.serving.scheduler import Book, Scheduler
from tbmesh.serving.settings import ServingSettings

ONE = (("a", 0, 8),)
THREE = (("a", 0, 3), ("b", 3, 6), ("c", 6, 8))
END = 9


def scheduler(**settings) -> Scheduler:
    ids = itertools.count()
    return Scheduler(ServingSettings(**settings), lambda: f"x{next(ids)}")


def admit(s: Scheduler, attempt: str, prompt: list[int], max_tokens: int = 50, route=ONE) -> None:
    s.admit(Admit(attempt, route, "e", tuple(prompt), 0, max_tokens, Sampling(), (END,)))


def back(s: Scheduler, step, token: int = 5) -> None:
    """The last stage's tokens for a decode step."""
    s.on_tokens(step.lane, {m.attempt: (m.step, token) for m in step.members})


def test_a_long_prompt_is_prefilled_in_chunks_between_the_decode_steps_of_the_others():
    s = scheduler(prefill_chunk=4)
    admit(s, "a", list(range(10, 20)))  # 10 tokens: 9 prefilled (4 + 4 + 1), the last one decodes
    steps = [s.next_step()[0] for _ in range(3)]
    assert [(st.kind, st.start, st.length) for st in steps] == [("prefill", 0, 4), ("prefill", 4, 4), ("prefill", 8, 1)]
    assert steps[0].members[0].origin == Origin() and steps[1].members[0].origin is None
    first, tokens = s.next_step()
    assert first.kind == "decode" and tokens == [19] and first.members[0].position == 9
    admit(s, "b", list(range(30, 40)))
    back(s, first)
    kinds = []
    for _ in range(6):
        step, _ = s.next_step()
        kinds.append(step.kind)
        if step.kind == "decode":
            back(s, step)
    # decode first: never two chunks in a row while a lane is ready; then b joins a's lane
    assert kinds == ["prefill", "decode", "prefill", "decode", "prefill", "decode"]
    assert [m.attempt for m in step.members] == ["a", "b"] and step.members[1].position == 9


def test_the_decoding_requests_share_one_lane_per_stage():
    s = scheduler()
    for i in range(7):
        admit(s, f"r{i}", [3], route=THREE)  # one token: nothing to prefill
    lanes = [s.next_step()[0] for _ in range(3)]
    assert [len(step.members) for step in lanes] == [3, 2, 2] and len({st.lane for st in lanes}) == 3
    assert s.next_step() is None  # every lane is on its way
    back(s, lanes[1])
    again, tokens = s.next_step()
    assert again.lane == lanes[1].lane and tokens == [5, 5] and [m.step for m in again.members] == [1, 1]


def run(s: Scheduler, until, limit: int = 100):
    """Steps, answering decode steps with token 5, until one satisfies `until`."""
    for _ in range(limit):
        step, _ = s.next_step()
        if until(step):
            return step
        if step.kind == "decode":
            back(s, step)
    raise AssertionError("no such step")


def test_an_answer_that_ends_is_released_with_the_next_step_and_kept_in_the_prefix_cache():
    s = scheduler()
    admit(s, "a", [1, 2, 3], max_tokens=2)
    admit(s, "b", [7, 8], max_tokens=50)
    step = run(s, lambda step: step.releases)
    (release,) = step.releases
    assert release.attempt == "a" and release.length == 4 and release.save_as  # 1 2 3 5 are in its cache
    assert "a" not in [m.attempt for m in step.members]
    index = s.books[ONE].index
    assert index.lookup([1, 2, 3, 5, 6, 4], 5) == Origin(release.save_as, 4)


def test_a_prompt_starts_from_the_cache_and_an_entry_a_stage_lacked_is_evicted():
    s = scheduler()
    s.books[ONE] = Book(ONE)
    s.books[ONE].index.insert("e1", [1, 2, 3, 4, 5])
    admit(s, "a", [1, 2, 3, 4, 9, 9])
    step, tokens = s.next_step()
    assert step.kind == "prefill" and step.start == 4 and tokens == [9]
    assert step.members[0].origin == Origin("e1", 4)
    s.cancel("a", failed=True)  # a stage did not hold e1
    step, _ = s.next_step()
    assert step.kind == "flush" and step.evictions == ("e1",) and step.releases == (Release("a", 5),)
    assert len(s.books[ONE].index) == 0


def test_a_retired_route_takes_its_entries_away_from_every_stage_once_idle_and_is_forgotten():
    s = scheduler()
    admit(s, "x", [1, 2], max_tokens=1)
    run(s, lambda step: step.releases)  # x's answer is kept: one entry
    admit(s, "a", [3, 4], max_tokens=1)
    step = run(s, lambda step: step.kind == "decode")
    s.retire({THREE})  # a new plan: its route is THREE now
    back(s, step)  # a ends; nothing more goes into the prefix cache of a retired route
    step, _ = s.next_step()
    assert step.kind == "flush" and step.releases == (Release("a", 2),)
    step, _ = s.next_step()
    assert step.kind == "flush" and len(step.evictions) == 1  # x's answer goes from every stage
    assert s.next_step() is None and not s.books


def test_routes_through_a_gone_node_and_requests_of_a_gone_entry_are_dropped():
    s = scheduler()
    admit(s, "b", [1, 2, 3])
    s.next_step()  # b's prompt is prefilled
    admit(s, "a", [1, 2, 3], route=THREE)
    assert s.drop_routes_through("b") == [("a", "e")] and list(s.books) == [ONE]
    s.drop_entered_by("e")
    step, _ = s.next_step()
    assert step.kind == "flush" and step.releases == (Release("b", 2),)
    assert s.next_step() is None


def test_a_broken_link_ends_the_attempts_that_cross_it_unsaved_and_their_lanes_with_them():
    s = scheduler()
    for name in ("r0", "r1"):
        admit(s, name, [3], route=THREE)
    admit(s, "other", [3], route=ONE)
    steps = list(iter(s.next_step, None))
    three = [step for step, _ in steps if step.route == THREE]
    (alone,) = [step for step, _ in steps if step.route == ONE]
    assert len(three) == 2  # r0 and r1 in two lanes, on their way
    broken = s.break_attempts(lambda route, entry: "b" in {n for n, _, _ in route} and entry == "e")
    assert sorted(broken) == [("r0", "e"), ("r1", "e")]
    for step in three:
        back(s, step)  # the tokens of the steps thought lost come after all: they find no lane
    nxt, _ = s.next_step()
    assert nxt.route == THREE and nxt.kind == "flush" and not nxt.members
    assert sorted(r.attempt for r in nxt.releases) == ["r0", "r1"] and all(r.save_as == "" for r in nxt.releases)
    back(s, alone)
    after, _ = s.next_step()
    assert [m.attempt for m in after.members] == ["other"]  # the route it does not cross goes on


# ----- admission and preemption (KV_BLOCK = 32: a live cache of n tokens counts n + 32) -----


def test_an_attempt_is_admitted_when_its_prompt_fits_beside_what_is_held_first_come_first_served():
    s = scheduler(context=110, prefix_cache=False)
    admit(s, "a", list(range(1, 41)))  # 40 + 32 held
    admit(s, "b", list(range(1, 11)))  # 10 + 32 more: 114, too many
    admit(s, "c", [1])  # 1 + 32 would fit (105), but b came first
    step, _ = s.next_step()
    assert step.kind == "prefill" and step.members[0].attempt == "a"
    assert [a.id for a in s.books[ONE].waiting] == ["b", "c"] and s.stats.admitted == 1
    step, _ = s.next_step()
    assert step.kind == "decode" and [m.attempt for m in step.members] == ["a"]
    s.cancel("a", failed=False)  # a ends: its room is free
    step, _ = s.next_step()
    assert step.releases == (Release("a", 40),) and s.stats.admitted == 3 and not s.books[ONE].waiting


def test_an_attempt_alone_is_admitted_however_long_its_prompt():
    s = scheduler(context=64, prefix_cache=False)
    admit(s, "a", list(range(1, 201)))
    step, _ = s.next_step()
    assert step.kind == "prefill" and step.members[0].attempt == "a" and s.stats.admitted == 1


def test_a_prompt_that_does_not_fit_evicts_the_least_recently_used_prefix_cache_entries():
    s = scheduler(context=100)
    s.books[ONE] = Book(ONE)
    index = s.books[ONE].index
    index.insert("old", list(range(100, 130)))
    index.insert("used", list(range(200, 230)))
    index.insert("new", list(range(300, 310)))
    index.lookup(list(range(100, 130)), 29)  # "old" was just used: "used" is now the oldest use
    admit(s, "a", list(range(1, 21)))  # 20 + 32 beside 70 of entries: 122 > 100; without "used", 92
    step, _ = s.next_step()
    assert step.evictions == ("used",) and step.members[0].attempt == "a" and step.members[0].origin == Origin()
    assert "old" in index and "new" in index and s.stats.admitted == 1


def test_a_decode_step_that_would_overflow_evicts_entries_then_preempts_the_youngest_attempt():
    s = scheduler(context=100)
    s.books[ONE] = Book(ONE)
    s.books[ONE].index.insert("e1", list(range(100, 110)))  # 10 tokens of prefix cache
    admit(s, "a", [1, 2], max_tokens=200)
    admit(s, "b", [3, 4], max_tokens=200)
    evicted = preempted = None
    for _ in range(100):
        step, _ = s.next_step()
        refused = s.take_refused()
        if step.evictions and evicted is None:
            evicted = step, step.members[0].position  # a's cached tokens before the step
            assert not refused  # the entry goes first
        if refused:
            preempted = refused, step
            break
        if step.kind == "decode":
            back(s, step)
    (step, cached), ((gone,), after) = evicted, preempted
    # a lane of two holds 2 x (a's cache + 32), and grows by 2 a step: beside the entry's 10
    # tokens that passes 100 once a holds 13; without them, once a holds 18
    assert step.evictions == ("e1",) and cached == 13 and after.members[0].position == 18
    assert gone.attempt == "b" and gone.entry == "e" and gone.preempted and "KV room" in gone.reason
    assert s.stats.preempted == 1
    assert [m.attempt for m in after.members] == ["a"]  # the step goes on without it
    for _ in range(100):  # a alone is never held back, past the room too
        back(s, after)
        after, _ = s.next_step()
        assert not s.take_refused()
    assert after.members[0].position > 100
