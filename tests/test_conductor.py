"""The entry's conductor (serving/conductor.py), driven directly: events and the time in,
actions out. No process, no MLX."""

from __future__ import annotations

import itertools

from tbmesh.core.generation import Sampling, Unavailable
from tbmesh.serving.conductor import MAX_FAILURES, Conductor, Emit, Fail, Finish, Resumed, SendAdmit, SendCancel

ROUTE = (("a", 0, 4), ("b", 4, 8))
OTHER = (("c", 0, 8),)
ENDS = (9,)


def conductor(resume_wait: float = 5.0) -> Conductor:
    ids = itertools.count()
    return Conductor("e", resume_wait, lambda: f"q{next(ids)}")


def admits(actions) -> list:
    return [a.admit for a in actions if isinstance(a, SendAdmit)]


def test_a_request_is_admitted_at_stage_0_streams_its_tokens_and_ends_at_an_end_token():
    c = conductor()
    request, actions = c.submit([1, 2, 3], 10, Sampling(), ENDS, 0.0, (ROUTE, 1))
    (admit,) = admits(actions)
    assert admit.route == ROUTE and admit.to == "a" and admit.tokens == (1, 2, 3) and admit.produced == 0
    assert admit.sampling.seed is not None  # fixed once: every attempt draws the same tokens
    assert c.on_tokens([(admit.attempt, 0, 5), (admit.attempt, 1, 6)], 0.1) == [Emit(request, 5), Emit(request, 6)]
    assert c.on_tokens([(admit.attempt, 1, 6)], 0.2) == []  # a token it had already
    assert c.on_tokens([(admit.attempt, 2, 9)], 0.3) == [SendCancel(admit.attempt, "a"), Finish(request)]
    assert not c.requests and c.close(request) == []


def test_max_tokens_ends_a_request_and_the_client_leaving_cancels_it_at_stage_0():
    c = conductor()
    request, actions = c.submit([1], 2, Sampling(), ENDS, 0.0, (ROUTE, 1))
    (admit,) = admits(actions)
    assert c.on_tokens([(admit.attempt, 0, 5), (admit.attempt, 1, 6)], 0.1)[-1] == Finish(request)
    other, actions = c.submit([1], 20, Sampling(), ENDS, 0.0, (ROUTE, 1))
    (admit,) = admits(actions)
    assert c.close(other) == [SendCancel(admit.attempt, "a")]


def test_a_broken_route_starts_a_new_attempt_with_the_prompt_and_the_tokens_so_far():
    c = conductor()
    request, actions = c.submit([1, 2], 10, Sampling(0.7, 1.0, 42), ENDS, 0.0, (ROUTE, 1))
    (first,) = admits(actions)
    c.on_tokens([(first.attempt, 0, 5), (first.attempt, 1, 6)], 0.1)
    actions = c.on_node_trouble("b", 0.2, (OTHER, 2))
    # stage 0 hears the attempt is over (it keeps its caches as a prefix-cache entry) ...
    assert actions[0] == SendCancel(first.attempt, "a")
    assert isinstance(actions[1], Resumed) and actions[1].tokens == 2
    # ... and the new plan gets the prompt and both tokens, step numbers going on, the same seed
    (second,) = admits(actions)
    assert second.route == OTHER and second.tokens == (1, 2, 5, 6) and second.produced == 2
    assert second.sampling == first.sampling and second.attempt != first.attempt
    assert c.on_tokens([(first.attempt, 2, 7)], 0.3) == []  # the old attempt is over
    assert c.on_tokens([(second.attempt, 2, 7)], 0.3) == [Emit(request, 7)]


def test_a_broken_link_restarts_the_attempts_crossing_it_at_once_on_the_same_route_and_is_no_failure():
    c = conductor()
    request, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, (ROUTE, 1))
    attempt = admits(actions)[0].attempt
    other, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, (OTHER, 1))
    untouched = admits(actions)[0].attempt

    def crosses(route, entry):  # the link e-b: the tokens b sends to its entry
        nodes = {n for n, _, _ in route} | {entry}
        return {"e", "b"} <= nodes

    for _ in range(2 * MAX_FAILURES):
        actions = c.on_link_trouble(crosses, "the link e-b broke", 0.0, (ROUTE, 1))
        assert actions[0] == SendCancel(attempt, "a")
        (admit,) = admits(actions)
        assert admit.route == ROUTE
        attempt = admit.attempt
    assert request in c.requests and c.on_tokens([(untouched, 0, 5)], 0.1) == [Emit(other, 5)]


def test_the_route_that_just_failed_is_retried_after_a_back_off_that_doubles():
    c = conductor()
    request, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, (ROUTE, 1))
    attempt = admits(actions)[0].attempt
    now = 0.0
    for failure in range(1, MAX_FAILURES + 1):
        actions = c.on_failed(attempt, "a stage failed", False, now, (ROUTE, 1))
        assert not admits(actions)  # not at once
        assert not admits(c.tick(now + 0.05 * 2 ** failure - 0.001, (ROUTE, 1)))
        actions = c.tick(now + 0.05 * 2 ** failure, (ROUTE, 1))
        (admit,) = admits(actions)
        attempt, now = admit.attempt, now + 0.05 * 2 ** failure
    actions = c.on_failed(attempt, "a stage failed", False, now, (ROUTE, 1))
    (fail,) = [a for a in actions if isinstance(a, Fail)]
    assert fail.request == request and "failed 7 times in a row: a stage failed" in str(fail.error)


def test_a_preempted_attempt_starts_again_at_once_and_is_no_failure():
    c = conductor()
    request, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, (ROUTE, 1))
    attempt = admits(actions)[0].attempt
    for _ in range(2 * MAX_FAILURES):
        actions = c.on_failed(attempt, "preempted", True, 0.0, (ROUTE, 1))
        (admit,) = admits(actions)
        attempt = admit.attempt
    assert request in c.requests


def test_a_request_waits_for_a_usable_plan_and_fails_with_the_reason_after_resume_wait():
    c = conductor(resume_wait=2.0)
    request, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, "waiting for b to serve epoch 3")
    assert actions == [] and c.waiting
    assert c.tick(1.9, "waiting for b to serve epoch 3") == []
    (admit,) = admits(c.tick(1.95, (ROUTE, 3)))
    assert admit.route == ROUTE
    c.on_node_trouble("a", 2.0, "a stopped answering")
    assert c.tick(3.9, "a stopped answering") == []
    (fail,) = c.tick(4.0, "a stopped answering")
    assert fail == Fail(request, fail.error) and isinstance(fail.error, Unavailable)
    assert str(fail.error) == "a stopped answering" and not c.requests


def test_a_waiting_request_fails_at_once_when_the_model_does_not_fit_and_waits_otherwise():
    c = conductor(resume_wait=30.0)
    request, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, "no plan yet: waiting for a leader")
    assert actions == [] and c.tick(1.0, "no plan yet: waiting for a leader") == []
    (fail,) = c.tick(2.0, "the model does not fit the cluster: add a Mac", hopeless=True)
    assert fail.request == request and "does not fit" in str(fail.error) and not c.requests


def test_a_request_in_flight_waits_its_resume_wait_even_when_the_model_no_longer_fits():
    c = conductor(resume_wait=30.0)
    request, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, (ROUTE, 1))
    c.on_node_trouble("b", 1.0, "b stopped answering: waiting for a new plan")
    assert c.tick(2.0, "the model does not fit the cluster: add a Mac", hopeless=True) == []
    assert request in c.requests
    (admit,) = admits(c.tick(3.0, (OTHER, 2)))  # a Mac came back: it goes on
    assert admit.route == OTHER


def test_the_next_deadline_is_a_waiting_requests_back_off_then_its_resume_wait():
    c = conductor(resume_wait=2.0)
    assert c.next_deadline() is None  # nothing waits
    _, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, (ROUTE, 1))
    assert c.next_deadline() is None  # in flight: only events move it
    c.on_failed(admits(actions)[0].attempt, "a stage failed", False, 1.0, (ROUTE, 1))
    assert c.next_deadline() == 1.0 + 0.05 * 2  # the back-off of the route that failed
    assert admits(c.tick(c.next_deadline(), (ROUTE, 1)))  # at it, the route is taken again
    assert c.next_deadline() is None


def test_a_back_off_over_while_no_route_is_usable_leaves_only_the_resume_wait():
    c = conductor(resume_wait=2.0)
    _, actions = c.submit([1], 10, Sampling(), ENDS, 0.0, (ROUTE, 1))
    c.on_failed(admits(actions)[0].attempt, "a stage failed", False, 1.0, "b stopped answering")
    assert c.next_deadline() == 1.1
    assert c.tick(1.1, "b stopped answering") == []
    assert c.next_deadline() == 3.0  # never a deadline in the past, which would spin its timer
    (fail,) = c.tick(3.0, "b stopped answering")
    assert isinstance(fail, Fail) and c.next_deadline() is None
