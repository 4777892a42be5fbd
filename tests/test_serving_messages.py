"""The data plane's descriptions (serving/messages.py): a round trip through Tensor.meta, and
untrusted metas that only ever raise the protocol error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbmesh.core.generation import Sampling
from tbmesh.net import wire
from tbmesh.serving.messages import Admit, Member, Origin, Release, Step

ROUTE = (("a", 0, 4), ("b", 4, 8))
STEP = Step(ROUTE, 1, "decode", "lane1", (Member("q.0", "e", 3, 9, Sampling(0.7, 0.9, 5, logprobs=3), Origin("x1", 7)),
                                         Member("r.0", "e", 0, 12, Sampling())),
            releases=(Release("s.0", 20, "x2"),), evictions=("x0",), ahead=True)
ADMIT = Admit("q.0", ROUTE, "e", (1, 2, 3), 1, 10, Sampling(0.5, 1.0, 42, logprobs=0), (9, 11), use_cache=False)


def test_steps_and_admits_travel_in_a_tensor_and_come_back_the_same():
    tensor = wire.decode(b"".join(wire.encode(wire.tensor_from_array(__import__("numpy").zeros((2, 1, 4), "float32"),
                                                                     "lane1", 0, STEP.meta()))))
    assert Step.from_meta(tensor.meta) == STEP
    assert Admit.from_meta("q.0", [1, 2, 3], ADMIT.meta()) == ADMIT
    assert STEP.onward(None) == Step(ROUTE, 2, "flush", "lane1", (), releases=STEP.releases,
                                     evictions=STEP.evictions, ahead=True)


def admit_tensor(tokens: np.ndarray, meta: dict | None = None) -> wire.Tensor:
    return wire.decode(b"".join(wire.encode(wire.tensor_from_array(tokens, "q.0", 1, meta or ADMIT.meta()))))


def test_an_admit_is_read_from_its_tensor_as_the_entry_sends_it():
    assert Admit.from_tensor(admit_tensor(np.array(ADMIT.tokens, np.int32))) == ADMIT


@pytest.mark.parametrize("tokens, match", [
    (np.array([1, -5, 3], np.int32), "token id -5"),  # an embedding lookup out of range: a crash in MLX
    (np.array([1.0, 2.0, 3.0], np.float32), r"tokens as float32\[3\]"),  # read as ints, they were tiny floats
    (np.array([[1, 2, 3]], np.int32), r"tokens as int32\[1, 3\]"),
    (np.array([1, 2, 3], np.int64), "tokens as int64"),
])
def test_admit_tokens_must_be_what_the_entry_sends(tokens, match):
    with pytest.raises(wire.ProtocolError, match=match):
        Admit.from_tensor(admit_tensor(tokens))


def test_an_admit_of_bfloat16_tokens_is_a_protocol_error_not_a_type_error():
    raw = wire.Tensor("q.0", 1, "bfloat16", (2,), bytes(4), ADMIT.meta())
    with pytest.raises(wire.ProtocolError, match="tokens as bfloat16"):
        Admit.from_tensor(wire.decode(b"".join(wire.encode(raw))))


@pytest.mark.parametrize("temperature", ["inf", "0.5", b"0.5", True, None])
def test_sampling_numbers_must_be_numbers(temperature):
    # float() would have read "inf" as an infinite temperature, and True as 1.0
    with pytest.raises(wire.ProtocolError, match="expected a finite number"):
        Admit.from_meta("q.0", [1], ADMIT.meta() | {"temperature": temperature})
    member = STEP.meta()["members"][0]
    with pytest.raises(wire.ProtocolError, match="expected a finite number"):
        Step.from_meta(STEP.meta() | {"members": [member[:4] + [temperature] + member[5:]]})


values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                      | st.text(max_size=5), lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)


def mutated(data: st.DataObject, meta: dict) -> dict:
    """The meta with one field (or an item inside it) replaced by anything, or removed."""
    changed = copy.deepcopy(meta)
    target, where = changed, data.draw(st.sampled_from(sorted(changed)))
    while isinstance(target[where], list) and target[where] and data.draw(st.booleans()):
        target, where = target[where], data.draw(st.integers(0, len(target[where]) - 1))
    if isinstance(target, dict) and data.draw(st.booleans()):
        del target[where]
    else:
        target[where] = data.draw(values)
    return changed


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_a_malformed_step_or_admit_is_only_ever_a_protocol_error(data):
    for meta, read in ((STEP.meta(), Step.from_meta), (ADMIT.meta(), lambda m: Admit.from_meta("q.0", [1, 2], m))):
        bad = mutated(data, meta)
        try:
            read(bad)
        except wire.ProtocolError:
            pass
