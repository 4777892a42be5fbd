"""The shard keeper (serving/keeper.py), driven directly: which layers a node loads, keeps
and lets go. No process, no MLX."""

from __future__ import annotations

from tbmesh.core.assignment import Assignment
from tbmesh.core.types import Plan, Stage
from tbmesh.serving.keeper import DRAIN_S, LINGER_S, Abandon, Drop, Keeper, Load, Publish, WakeAt


def plan(epoch: int, *stages: tuple[str, int, int]) -> Plan:
    return Plan(1, epoch, "m", tuple(Stage(n, s, e, 1) for n, s, e in stages), frozenset(n for n, _, _ in stages))


RUNNING = plan(1, ("a", 0, 4), ("b", 4, 8))
MOVED = plan(2, ("a", 0, 6), ("b", 6, 8))


def kinds(actions) -> list[type]:
    return [type(a) for a in actions]


def test_a_node_loads_its_stage_publishes_it_and_loads_the_prepared_one_while_serving():
    keeper = Keeper()
    actions = keeper.assign(Assignment.of("a", "m", RUNNING, None), 0.0, set())
    assert actions[0] == Load((0, 4), False)
    assert isinstance(actions[-1], Publish) and actions[-1].state.progress == 0.0
    assert keeper.progressed((0, 4), 0.05) == []  # progress goes out in tenths
    assert keeper.progressed((0, 4), 0.5)[0].state.progress == 0.5
    (published,) = keeper.loaded((0, 4), 1.0, set())
    assert published.state.serving == 1 and published.state.ready
    actions = keeper.assign(Assignment.of("a", "m", RUNNING, MOVED), 2.0, set())
    assert actions[0] == Load((0, 6), False)
    assert actions[-1].state.serving == 1  # still serving the running plan while it loads
    keeper.loaded((0, 6), 3.0, set())
    assert keeper.held == {(0, 4), (0, 6)}
    # committed: the old range goes at once when no request uses it
    actions = keeper.assign(Assignment.of("a", "m", MOVED, None), 4.0, set())
    assert Drop((0, 4)) in actions and keeper.held == {(0, 6)}


def test_layers_that_requests_use_stay_until_they_are_done_or_drain_s_has_passed():
    keeper = Keeper()
    keeper.assign(Assignment.of("a", "m", RUNNING, None), 0.0, set())
    keeper.loaded((0, 4), 0.0, set())
    keeper.assign(Assignment.of("a", "m", MOVED, None), 1.0, {(0, 4)})
    keeper.loaded((0, 6), 1.0, {(0, 4)})
    assert (0, 4) in keeper.held
    actions = keeper.tick(2.0, {(0, 4)})
    assert WakeAt(3.0) in actions and (0, 4) in keeper.held
    assert Drop((0, 4)) in keeper.tick(1.0 + DRAIN_S, {(0, 4)})  # used, but for too long


def test_a_mac_in_no_plan_keeps_its_layers_a_moment_for_the_plan_that_may_want_them():
    keeper = Keeper()
    keeper.assign(Assignment.of("a", "m", RUNNING, None), 0.0, set())
    keeper.loaded((0, 4), 0.0, set())
    keeper.assign(Assignment.of("a", "m", None, None), 1.0, set())
    assert keeper.held == {(0, 4)}
    assert keeper.tick(1.0 + LINGER_S - 0.1, set()) == [WakeAt(1.0 + LINGER_S + 0.9)]
    assert Drop((0, 4)) in keeper.tick(1.0 + LINGER_S, set())


def test_a_tight_node_lets_its_running_stage_go_before_loading():
    keeper = Keeper()
    keeper.assign(Assignment.of("a", "m", RUNNING, None), 0.0, set())
    keeper.loaded((0, 4), 0.0, set())
    tight = Assignment("m", RUNNING.stages[0], 1, MOVED.stages[0], 2, tight=True)
    actions = keeper.assign(tight, 1.0, {(0, 4)})
    assert actions[0] == Load((0, 6), True) and Drop((0, 4)) in actions  # in use, but memory cannot wait
    assert keeper.tight_loads == 1


def test_a_load_that_failed_is_published_and_tried_again_after_the_retry_time():
    keeper = Keeper(retry_s=10.0)
    keeper.assign(Assignment.of("a", "m", RUNNING, None), 0.0, set())
    actions = keeper.load_failed((0, 4), "ShardError: damaged", 1.0, set())
    assert WakeAt(11.0) in actions
    assert [a.state.failed for a in actions if isinstance(a, Publish)] == ["ShardError: damaged"]
    assert not any(isinstance(a, Load) for a in keeper.tick(5.0, set()))
    assert Load((0, 4), False) in keeper.tick(11.0, set())


def test_held_layers_found_damaged_go_and_are_published_as_a_load_that_failed():
    keeper = Keeper(retry_s=10.0)
    keeper.assign(Assignment.of("a", "m", RUNNING, None), 0.0, set())
    keeper.loaded((0, 4), 0.0, set())
    actions = keeper.damaged((0, 4), "NaN in memory", 1.0, {(0, 4)})
    assert Drop((0, 4)) in actions and WakeAt(11.0) in actions and keeper.held == set()
    (published,) = [a.state for a in actions if isinstance(a, Publish)]
    assert published.failed == "NaN in memory" and not published.ready and published.serving == 0
    assert not any(isinstance(a, Load) for a in keeper.tick(5.0, set()))
    assert Load((0, 4), False) in keeper.tick(11.0, set())  # read from disk again, checked as it is read


def test_a_load_for_a_plan_left_behind_is_abandoned():
    keeper = Keeper()
    keeper.assign(Assignment.of("a", "m", RUNNING, MOVED), 0.0, set())
    assert keeper.loading == (0, 6)
    actions = keeper.assign(Assignment.of("a", "m", None, None), 1.0, set())
    assert Abandon() in actions and keeper.loading is None
