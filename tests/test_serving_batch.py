"""Stage 0's scheduler and the stages' batched steps (serving/scheduler.py, serving/stage.py) in
one process, with no network: real MLX on real layers, token for token against mlx-lm.

A small harness plays the transport: each step goes through the stages in order, one stage
per tick, and several steps are on their way at once (stage 0 starts a new one every tick),
as in a real pipeline; the last stage's tokens come back to stage 0 one tick later.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from tbmesh.core.generation import Sampling
from tbmesh.runtime.sampling import make_sampler
from tbmesh.runtime.shard import load_shard
from tbmesh.serving.messages import Admit, Step
from tbmesh.serving.scheduler import Scheduler
from tbmesh.serving.settings import ServingSettings
from tbmesh.serving.stage import StageCaches
from tbmesh.testbed.tiny import make_tiny_model

ENDS = (509, 511)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=6, hidden=128, vocab=512)


@pytest.fixture(scope="module")
def mlx_lm_model(model_dir):
    return load(str(model_dir))


def reference(mlx_lm_model, prompt: list[int], max_tokens: int, sampling: Sampling = Sampling()) -> list[int]:
    model, _ = mlx_lm_model
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=make_sampler(sampling)):
        if token in ENDS:
            break
        out.append(token)
    return out


class Harness:
    """One route over `splits` of the model, every stage in this process."""

    def __init__(self, model_dir: Path, splits: list[tuple[int, int]], settings: ServingSettings) -> None:
        self.shards = [load_shard(model_dir, s, e) for s, e in splits]
        self.route = tuple((f"n{i}", s, e) for i, (s, e) in enumerate(splits))
        self.caches = [StageCaches(f"n{i}", f"n{i}") for i in range(len(splits))]
        ids = itertools.count()
        self.scheduler = Scheduler(settings, lambda: f"x{next(ids)}")
        self.out: dict[str, list[int]] = {}
        self.current: dict[str, str] = {}  # request -> its attempt under way (as the conductor keeps)
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.steps: list[Step] = []
        self.on_the_way: list[deque] = [deque() for _ in splits]  # per stage: (step, input)
        self.tokens_back: deque = deque()
        self.tamper: Callable[[int, Step, mx.array], mx.array] | None = None  # a stage's input on its way
        self.nonfinite: list[int] = []  # stages whose own layers made NaN or inf (Outcome.nonfinite)

    def admit(self, attempt: str, prompt: list[int], max_tokens: int, sampling: Sampling = Sampling(),
              produced: int = 0) -> None:
        self.out.setdefault(attempt.split(".")[0], [])
        self.current[attempt.split(".")[0]] = attempt
        self.scheduler.admit(Admit(attempt, self.route, "entry", tuple(prompt), produced, max_tokens, sampling,
                                   ENDS))

    def tick(self) -> bool:
        """Tokens back to stage 0, every stage one step further, stage 0 a new step; False
        when nothing moved."""
        moved = False
        while self.tokens_back:
            lane, sampled = self.tokens_back.popleft()
            self.scheduler.on_tokens(lane, sampled)
            for attempt, (step, token) in sampled.items():
                request = attempt.split(".")[0]
                if request in self.done or self.current[request] != attempt or step != len(self.out[request]):
                    continue
                if token in ENDS:
                    self.done.add(request)
                else:
                    self.out[request].append(token)
            moved = True
        for i in reversed(range(len(self.shards))):
            if not self.on_the_way[i]:
                continue
            step, x = self.on_the_way[i].popleft()
            if self.tamper is not None and x is not None:
                x = self.tamper(i, step, x)
            outcome = self.caches[i].run(self.shards[i], step, x)
            self.nonfinite += [i] if outcome.nonfinite else []
            for member, why in outcome.failed:
                self.failed.setdefault(member.attempt, why)  # what its entry hears first
                self.scheduler.cancel(member.attempt, failed=True)
            if not step.last:
                following = step.onward(outcome.ran if outcome.out is not None else None)
                self.on_the_way[i + 1].append((following, outcome.out))
            elif step.kind == "decode":
                self.tokens_back.append((step.lane, {m.attempt: (m.step, outcome.tokens[m.attempt])
                                                     for m in outcome.ran}))
            moved = True
        found = self.scheduler.next_step()
        if found is not None:
            step, tokens = found
            self.steps.append(step)
            shape = (len(step.members), 1) if step.kind == "decode" else (1, len(tokens))
            self.on_the_way[0].append((step, mx.array(tokens, dtype=mx.int32).reshape(shape) if tokens else None))
            moved = True
        return moved

    def run(self, arrivals: dict[int, list[tuple]] | None = None, limit: int = 10_000) -> None:
        arrivals = dict(arrivals or {})
        for t in range(limit):
            for args in arrivals.pop(t, []):
                self.admit(*args)
            if not self.tick() and not arrivals:
                return
        raise AssertionError("the harness did not finish")


PROMPTS = [[1] + [(7 * i + 3 * j) % 500 + 4 for j in range(n)] for i, n in enumerate((5, 17, 40, 3, 29, 64, 1, 11))]


@pytest.mark.parametrize("splits", [[(0, 6)], [(0, 3), (3, 6)], [(0, 2), (2, 4), (4, 6)]])
def test_eight_requests_in_batches_give_mlx_lm_tokens_at_temperature_zero(model_dir, mlx_lm_model, splits):
    harness = Harness(model_dir, splits, ServingSettings(prefill_chunk=16))
    budgets = [12, 20, 7, 30, 16, 9, 25, 14]
    # requests arrive while others decode
    arrivals = {3 * i: [(f"r{i}.0", PROMPTS[i], budgets[i])] for i in range(8)}
    harness.run(arrivals)
    for i in range(8):
        assert harness.out[f"r{i}"] == reference(mlx_lm_model, PROMPTS[i], budgets[i]), i
    decodes = [s for s in harness.steps if s.kind == "decode"]
    assert max(len(s.members) for s in decodes) >= 3  # they really ran batched
    assert len({s.lane for s in decodes}) <= len(splits)  # one lane per stage at most
    assert not harness.failed
    # everything was let go everywhere, or kept as prefix-cache entries
    assert all(c.attempts() == 0 for c in harness.caches)


def test_seeded_requests_draw_the_tokens_they_draw_alone(model_dir, mlx_lm_model):
    harness = Harness(model_dir, [(0, 3), (3, 6)], ServingSettings())
    samplings = [Sampling(0.8, 0.9, 7), Sampling(1.0, 1.0, 8), Sampling(), Sampling(0.7, 1.0, 9)]
    arrivals = {i: [(f"r{i}.0", PROMPTS[i], 20, s)] for i, s in enumerate(samplings)}
    harness.run(arrivals)
    for i, sampling in enumerate(samplings):
        assert harness.out[f"r{i}"] == reference(mlx_lm_model, PROMPTS[i], 20, sampling), i
    assert harness.out["r0"] != reference(mlx_lm_model, PROMPTS[0], 20, Sampling(0.8, 0.9, 8))


@pytest.mark.parametrize("splits", [[(0, 6)], [(0, 2), (2, 4), (4, 6)]])  # one stage builds each step ahead
def test_a_prompt_that_starts_like_an_earlier_one_prefills_only_the_rest(model_dir, mlx_lm_model, splits):
    harness = Harness(model_dir, splits, ServingSettings(prefill_chunk=8))
    system = PROMPTS[5]  # 65 tokens said before every question
    harness.run({0: [("a.0", system + [40, 41, 42], 10)]})
    first = harness.out["a"]
    assert first == reference(mlx_lm_model, system + [40, 41, 42], 10)
    prefilled = harness.scheduler.stats.prefilled
    # turn 2: the conversation so far, the answer, one more question
    turn2 = system + [40, 41, 42] + first + [50, 51]
    harness.run({0: [("b.0", turn2, 10)]})
    assert harness.out["b"] == reference(mlx_lm_model, turn2, 10)
    assert harness.scheduler.stats.prefilled - prefilled == 2  # only the new question: [50, 51] (the last runs in decode)
    # another question after the same system prompt: a trimmed copy of the entry
    other = system + [60, 61, 62, 63]
    prefilled = harness.scheduler.stats.prefilled
    harness.run({0: [("c.0", other, 10)]})
    assert harness.out["c"] == reference(mlx_lm_model, other, 10)
    assert harness.scheduler.stats.prefilled - prefilled == 3
    status = harness.scheduler.status()
    assert status.prefix_hits == 2 and status.prefix_lookups == 3


@pytest.mark.parametrize("splits", [[(0, 6)], [(0, 3), (3, 6)]])
def test_a_full_kv_room_makes_requests_wait_and_preempts_the_youngest_but_answers_stay_exact(model_dir, mlx_lm_model,
                                                                                            splits):
    # room for about two requests at a time: the others wait, and one grows into a preemption
    harness = Harness(model_dir, splits, ServingSettings(context=200, prefix_cache=False))
    arrivals = {0: [(f"r{i}.0", PROMPTS[i], 40) for i in (1, 2, 4, 5)]}
    for t in range(10_000):
        for args in arrivals.pop(t, []):
            harness.admit(*args)
        for refused in harness.scheduler.take_refused():  # the entry starts it again, as the conductor does
            assert refused.preempted
            request = refused.attempt.split(".")[0]
            harness.current[request] = ""
            produced = harness.out[request]
            n = int(refused.attempt.split(".")[1]) + 1
            arrivals.setdefault(t + 1, []).append((f"{request}.{n}", PROMPTS[int(request[1:])] + produced, 40,
                                                   Sampling(), len(produced)))
        held = sum(b.held() for b in harness.scheduler.books.values())
        live = sum(1 for b in harness.scheduler.books.values() for _ in b.live())
        assert held <= 200 or live <= 1
        if not harness.tick() and not arrivals:
            break
    for i in (1, 2, 4, 5):
        assert harness.out[f"r{i}"] == reference(mlx_lm_model, PROMPTS[i], 40), i
    assert harness.scheduler.stats.preempted >= 1


def test_an_attempt_started_again_on_the_same_route_starts_from_what_its_caches_kept(model_dir, mlx_lm_model):
    # a stage stopped answering for a moment: the entry ended the attempt (stage 0 keeps its
    # caches as a prefix-cache entry on every stage) and starts it again on the same route
    harness = Harness(model_dir, [(0, 3), (3, 6)], ServingSettings(prefill_chunk=16))
    prompt = PROMPTS[5]
    arrivals = {0: [("a.0", prompt, 40)]}
    for t in range(10_000):
        for args in arrivals.pop(t, []):
            harness.admit(*args)
        if len(harness.out["a"]) == 12 and "a.1" not in harness.current.values():
            harness.scheduler.cancel("a.0", failed=False)  # the entry's Cancel (kind "end")
            harness.current["a"] = ""
            produced = list(harness.out["a"])
            prefilled = harness.scheduler.stats.prefilled
            arrivals[t + 1] = [("a.1", prompt + produced, 40, Sampling(), len(produced))]
        if not harness.tick() and not arrivals:
            break
    assert harness.out["a"] == reference(mlx_lm_model, prompt, 40)
    assert harness.scheduler.stats.prefilled == prefilled  # nothing prefilled again: the last token decodes
    assert harness.scheduler.status().prefix_hits == 1


def test_a_step_built_ahead_is_taken_back_when_the_lane_changes(model_dir, mlx_lm_model):
    # one stage builds each lane step ahead; a row that leaves (here its client goes: the
    # entry's Cancel) takes it back, and what the row's cache keeps is exactly its tokens
    harness = Harness(model_dir, [(0, 6)], ServingSettings())
    arrivals = {0: [(f"r{i}.0", PROMPTS[i], 30) for i in (0, 1, 2)]}
    left = None
    for t in range(10_000):
        for args in arrivals.pop(t, []):
            harness.admit(*args)
        lanes = [lane for caches in harness.caches for lane in caches.lanes.values()]
        if left is None and len(harness.out["r1"]) == 10 and any(lane.ahead is not None for lane in lanes):
            harness.scheduler.cancel("r1.0", failed=False)  # kept as a prefix-cache entry
            harness.current["r1"] = ""
            left = list(harness.out["r1"])
            arrivals[t + 1] = [("c.0", PROMPTS[1] + left, 20)]  # the same conversation, again
        if not harness.tick() and not arrivals:
            break
    assert left is not None
    assert harness.out["r0"] == reference(mlx_lm_model, PROMPTS[0], 30)
    assert harness.out["r2"] == reference(mlx_lm_model, PROMPTS[2], 30)
    assert harness.out["c"] == reference(mlx_lm_model, PROMPTS[1] + left, 20)  # from the entry, exact
    assert harness.scheduler.status().prefix_hits == 1


# ----- values that are not finite never spread (issue 20, item 7) ----------------------------------

def run_restarting(harness: Harness, arrivals: dict[int, list[tuple]], prompts: dict[str, list[int]],
                   max_tokens: int) -> list[str]:
    """Run, starting a failed attempt again as its entry would (prompt + tokens so far, on
    the same route); returns why each failed."""
    seen: list[str] = []
    for t in range(10_000):
        for args in arrivals.pop(t, []):
            harness.admit(*args)
        for attempt in [a for a in harness.failed if a not in seen]:
            seen.append(attempt)
            request, n = attempt.split(".")
            produced = list(harness.out[request])
            arrivals.setdefault(t + 1, []).append((f"{request}.{int(n) + 1}", prompts[request] + produced,
                                                   max_tokens, Sampling(), len(produced)))
        if not harness.tick() and not arrivals:
            return [harness.failed[a] for a in seen]
    raise AssertionError("the harness did not finish")


def finite_caches(harness: Harness) -> bool:
    """Every KV cache the stages hold (prefix-cache entries, lanes, prompts being prefilled) is finite."""
    caches = [entry.cache for c in harness.caches for entry in c.entries.values()]
    caches += [lane.cache for c in harness.caches for lane in c.lanes.values() if lane.cache is not None]
    caches += [alone.cache for c in harness.caches for alone in c.alone.values()]
    return all(mx.isfinite(a).all().item() for cache in caches for layer in cache for a in layer.state)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_activations_that_are_not_finite_are_refused_and_nothing_of_them_is_cached(model_dir, mlx_lm_model, kind):
    # stage 1 receives NaN for one row of one step (a member's poisoned activations): it
    # refuses the row, the entry starts it again, and every answer is mlx-lm's; no cache
    # anywhere holds a NaN, and the same prompt again starts from a clean prefix-cache entry
    harness = Harness(model_dir, [(0, 2), (2, 4), (4, 6)], ServingSettings(prefill_chunk=16))
    poisoned: list[Step] = []

    def tamper(stage: int, step: Step, x: mx.array) -> mx.array:
        if stage != 1 or poisoned or step.kind != kind or "a.0" not in [m.attempt for m in step.members]:
            return x
        if kind == "decode" and (len(harness.out["a"]) < 5 or len(step.members) < 2):
            return x  # a row of a batch, some tokens in
        poisoned.append(step)
        row = [m.attempt for m in step.members].index("a.0")
        return mx.where(mx.arange(x.shape[0])[:, None, None] == row, mx.array(float("nan"), x.dtype), x)

    harness.tamper = tamper
    prompts = {r: PROMPTS[i] for r, i in zip("abcdef", (5, 2, 4, 0, 3, 7))}
    arrivals = {2 * i: [(f"{r}.0", prompt, 20)] for i, (r, prompt) in enumerate(prompts.items())}
    failures = run_restarting(harness, arrivals, prompts, 20)
    assert poisoned and len(failures) == 1
    assert failures[0] == "n1 refused activations that are not finite (NaN or inf) from n0 for layers 2-3"
    if kind == "decode":
        assert len(poisoned[0].members) > 1  # the others in the batch went on
    for request, prompt in prompts.items():
        assert harness.out[request] == reference(mlx_lm_model, prompt, 20), request
    assert finite_caches(harness) and all(c.entries for c in harness.caches)
    assert not harness.nonfinite  # not the refusing stage's own doing
    harness.run({0: [("again.0", prompts["a"], 20)]})
    assert harness.out["again"] == reference(mlx_lm_model, prompts["a"], 20)
    assert harness.scheduler.status().prefix_hits >= 1 and finite_caches(harness)


def test_a_stage_whose_weights_turned_nan_refuses_its_own_outputs_and_names_the_weight(model_dir, mlx_lm_model):
    harness = Harness(model_dir, [(0, 3), (3, 6)], ServingSettings(prefill_chunk=16))
    harness.run({0: [("a.0", PROMPTS[1], 8)]})
    assert harness.out["a"] == reference(mlx_lm_model, PROMPTS[1], 8)
    assert harness.shards[0].damaged() is None
    mlp = harness.shards[0].layer(1).mlp  # a bit flipped in memory: one weight is NaN now
    mlp.down_proj.weight = mlp.down_proj.weight.at[0, 0].add(float("nan"))
    assert harness.shards[0].damaged() == "model.layers.1.mlp.down_proj.weight"
    harness.run({0: [("b.0", PROMPTS[3], 8)]})
    assert harness.failed["b.0"] == "n0 computed values that are not finite (NaN or inf) in layers 0-2"
    assert harness.nonfinite == [0] and harness.out["b"] == [] and finite_caches(harness)
