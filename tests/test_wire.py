"""The wire protocol: frames, schema checks, handshake messages and tensor frames."""

from __future__ import annotations

import math
import time
import tracemalloc
from dataclasses import fields, is_dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import mlx.core as mx
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbmesh.core import messages
from tbmesh.core.messages import Goodbye, Heartbeat
from tbmesh.core.types import Stage
from tbmesh.net import wire
from tbmesh.net.wire import PREFIX, Fetch, Hello, Part, ProtocolError, Refuse, Tensor

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies, derived from the dataclasses' type hints like the codec itself ---------------

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
            | st.binary(max_size=6))


def _plain(depth: int) -> st.SearchStrategy:
    if depth >= wire.MAX_META_DEPTH:
        return _scalars
    inner = st.deferred(lambda: _plain(depth + 1))
    return _scalars | st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2)


metas = st.dictionaries(st.text(max_size=4), _plain(1), max_size=3)
OVERRIDES: dict[str, Any] = {}


def strategy(tp: Any) -> st.SearchStrategy:
    simple = {
        str: st.text(max_size=10), int: st.integers(0, 2**64 - 1), bool: st.booleans(),
        float: st.floats(min_value=0, allow_nan=False, allow_infinity=False), bytes: st.binary(max_size=8),
    }
    if tp in simple:
        return simple[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        return st.one_of(*(st.none() if a is type(None) else strategy(a) for a in args))
    if origin is Literal:
        return st.sampled_from(args)
    if origin is tuple and args[-1] is Ellipsis:
        return st.lists(strategy(args[0]), max_size=3).map(tuple)
    if origin is tuple:
        return st.tuples(*map(strategy, args))
    if tp is Stage:
        return st.builds(lambda node, a, b, n: Stage(node, min(a, b), max(a, b), n),
                         st.text(max_size=6), st.integers(0, 100), st.integers(0, 100), st.integers(0, 2**40))
    assert is_dataclass(tp), tp
    hints = get_type_hints(tp)
    return st.builds(tp, **{f.name: OVERRIDES.get(f.name, strategy(hints[f.name])) for f in fields(tp)})


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    dtype = draw(st.sampled_from(sorted(wire.DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    size = math.prod(shape) * wire.DTYPES[dtype]
    data = draw(st.binary(min_size=size, max_size=size))
    return Tensor(draw(st.text(max_size=8)), draw(st.integers(0, 2**32)), dtype, shape, data, draw(metas))


digests = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def parts(draw: st.DrawFn) -> Part:
    data = draw(st.binary(max_size=16))
    error = "" if data else draw(st.text(max_size=8))
    return Part(draw(digests), draw(st.integers(0, 2**40)), len(data), error, data)


fetches = st.builds(Fetch, digests, st.integers(0, 2**62), st.integers(0, wire.MAX_FETCH))
SPECIAL = {Tensor: tensors(), Part: parts(), Fetch: fetches}
any_message = st.one_of(*(SPECIAL[cls] if cls in SPECIAL else strategy(cls) for cls in wire.TAGS))


def frame(header: Any, payload: bytes = b"", raw: bytes | None = None) -> bytes:
    packed = raw if raw is not None else msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(packed), len(payload)) + packed + payload


def stream(msgs: list[Any]) -> bytes:
    return b"".join(b"".join(wire.encode(m)) for m in msgs)


def drain(decoder: wire.FrameDecoder) -> list[Any]:
    return list(decoder)


HB = Heartbeat("mac1", 3, 7, 12.5, 12.25, 0.001, 2**64 - 1)
HB_MAP = {"t": "heartbeat", "sender": "mac1", "incarnation": 3, "seq": 7, "sent_at": 12.5}


def hello(kind: type = Hello, version: int = wire.PROTOCOL_VERSION, node: str = "D") -> Hello:
    return kind(version, node, 1, f"{node}'s Mac", "home", "machine-" + node, "peer")


def hello_map(**changes: Any) -> dict:
    m = {"t": "hello", "version": wire.PROTOCOL_VERSION, "node": "D", "incarnation": 1, "name": "n", "cluster": "c",
         "machine": "m", "purpose": "peer"}
    return m | changes


# --- round trips ------------------------------------------------------------------------------


def test_every_core_message_has_a_wire_type():
    assert set(get_args(messages.Message)) <= set(wire.TAGS)


@FAST
@given(any_message)
def test_every_message_round_trips(message):
    assert wire.decode(b"".join(wire.encode(message))) == message


@settings(max_examples=40, deadline=None)
@given(st.lists(any_message, min_size=1, max_size=4), st.data())
def test_any_chunking_gives_the_same_messages(msgs, data):
    raw = stream(msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    decoder, got = wire.FrameDecoder(), []
    for a, b in zip([0, *cuts], [*cuts, len(raw)]):
        decoder.feed(raw[a:b])
        got += drain(decoder)
    assert got == msgs


def test_byte_by_byte_gives_the_same_messages():
    hidden = wire.tensor_from_array(np.arange(2048, dtype=np.float32).reshape(1, 1, 2048), "req", 4)
    msgs = [HB, hidden, Goodbye("mac1", 3), hidden]
    decoder, got = wire.FrameDecoder(), []
    for i, byte in enumerate(stream(msgs)):
        decoder.feed(bytes([byte]))
        got += drain(decoder)
    assert got == msgs
    assert len(decoder._buf) == 0  # consumed bytes do not pile up


def test_floats_may_arrive_as_integers():
    assert wire.decode(frame(HB_MAP | {"sent_at": 12})).sent_at == 12.0


def test_an_adjacency_without_rdma_is_sent_as_before_rdma():
    info = messages.NodeInfo("a", "a")

    def sent(*adjacencies: messages.Adjacency) -> bytes:
        state = messages.LinkState("a", 1, 1, info, adjacencies)
        return b"".join(bytes(x) for x in wire.encode(messages.LinkStates("a", (state,))))

    plain = sent(messages.Adjacency("b", rtt_s=1e-4))
    assert b"rdma" not in plain  # what a Mac without RDMA (or Linux) sends, byte for byte as before
    with_device = sent(messages.Adjacency("b", rtt_s=1e-4, rdma="rdma_en2"))
    assert wire.decode(with_device).states[0].neighbours[0].rdma == "rdma_en2"
    assert wire.decode(plain).states[0].neighbours[0].rdma == ""


# --- violations -------------------------------------------------------------------------------


def refused(data: bytes, match: str, **limits: int) -> ProtocolError:
    decoder = wire.FrameDecoder(**limits)
    decoder.feed(data)
    decoder.feed_eof()
    with pytest.raises(ProtocolError, match=match) as caught:
        drain(decoder)
    assert "\n" not in str(caught.value)
    return caught.value


def test_oversized_length_prefixes_are_refused_before_reading_on():
    refused(PREFIX.pack(wire.MAX_HEADER + 1, 0), "header of 1048577 bytes announced")
    refused(PREFIX.pack(10, wire.MAX_PAYLOAD + 1), "payload of .* announced")
    refused(PREFIX.pack(100, 0), "header of 100 bytes announced, at most 50", max_header=50)


BAD_HEADERS = [
    (msgpack.packb(HB_MAP)[:-3], "bad msgpack header"),
    (msgpack.packb(HB_MAP) + b"\x00", "bad msgpack header"),
    (b"\xc1", "bad msgpack header"),
    (msgpack.packb([1, 2]), "header is a list, not a map"),
    (msgpack.packb({"sender": "a"}), "no string type 't'"),
    (msgpack.packb({"t": 5}), "no string type 't'"),
    (msgpack.packb({"t": "gossip"}), "unknown message type 'gossip'"),
]


@pytest.mark.parametrize("raw, match", BAD_HEADERS)
def test_malformed_headers_are_refused(raw, match):
    refused(frame(None, raw=raw), match)


def _summary(n: int) -> dict:
    return {"t": "db_summary", "sender": "a", "entries": [["n", 1, 2]] * n}


def _link_states(**info: Any) -> dict:
    state = {"origin": "a", "incarnation": 1, "version": 1,
             "info": {"id": "a", "name": "A"} | info, "neighbours": []}
    return {"t": "link_states", "sender": "a", "states": [state]}


BAD_FIELDS = [
    ({k: v for k, v in HB_MAP.items() if k != "seq"}, r"heartbeat: missing field 'seq'"),
    (HB_MAP | {"seq": "7"}, r"heartbeat\.seq: expected an integer, got str"),
    (HB_MAP | {"seq": True}, r"heartbeat\.seq: expected an integer, got bool"),
    (HB_MAP | {"seq": -1}, r"heartbeat\.seq: negative"),
    (HB_MAP | {"seq": 1.0}, r"heartbeat\.seq: expected an integer, got float"),
    (HB_MAP | {"sent_at": float("nan")}, r"heartbeat\.sent_at: not a finite"),
    (HB_MAP | {"sent_at": float("inf")}, r"heartbeat\.sent_at: not a finite"),
    (HB_MAP | {"sent_at": -1.0}, r"heartbeat\.sent_at: not a finite number >= 0"),
    (HB_MAP | {"sender": b"mac1"}, r"heartbeat\.sender: expected str, got bytes"),
    (HB_MAP | {"sender": "x" * (wire.MAX_TEXT + 1)}, r"heartbeat\.sender: 65537 long"),
    (HB_MAP | {"sent_at": msgpack.Timestamp(1)}, r"heartbeat\.sent_at: expected a number, got Timestamp"),
    (HB_MAP | {"extra": 1}, r"heartbeat: unknown field 'extra'"),
    ({"t": "goodbye", "sender": None, "incarnation": 1}, r"goodbye\.sender: expected str, got NoneType"),
    (_summary(wire.MAX_ITEMS + 1), r"db_summary\.entries: 4097 items, at most 4096"),
    (_summary(1) | {"entries": [["n", 1]]}, r"db_summary\.entries\[0\]: expected 3 items, got 2"),
    (_summary(1) | {"entries": [["n", 1, "2"]]}, r"db_summary\.entries\[0\]\[2\]: expected an integer"),
    (_summary(1) | {"entries": "n12"}, r"db_summary\.entries: expected a list, got str"),
    (_link_states(memory_total="lots"), r"link_states\.states\[0\]\.info\.memory_total: expected an integer"),
    (_link_states(flops=float("nan")), r"link_states\.states\[0\]\.info\.flops: not a finite"),
    ({"t": "link_states", "sender": "a", "states": [5]}, r"link_states\.states\[0\]: expected a map, got int"),
    (hello_map(purpose="spy"), r"hello\.purpose: expected one of \['peer', 'probe', 'bulk'\]"),
    (hello_map(nonce=b"x" * 16), r"hello: unknown field 'nonce'"),
    (hello_map(node=b"D"), r"hello\.node: expected str, got bytes"),
    ({"t": "auth", "proof": b"x"}, r"unknown message type 'auth'"),
    ({"t": "refuse"}, r"refuse: missing field 'reason'"),
]


@pytest.mark.parametrize("header, match", BAD_FIELDS)
def test_ill_typed_fields_are_refused(header, match):
    refused(frame(header), match)


def test_plan_stages_must_be_ordered():
    good = wire.decode(frame(_link_states()))
    assert good.states[0].plan is None
    bad = _link_states()
    bad["states"][0]["plan"] = {"term": 1, "epoch": 1, "model": "m",
                                "stages": [{"node": "a", "start": 5, "end": 2, "bytes": 0}]}
    refused(frame(bad), r"link_states\.states\[0\]\.plan\.stages\[0\]: start 5 > end 2")


TENSOR_MAP = {"t": "tensor", "request": "r", "step": 0, "dtype": "float32", "shape": [2, 2], "meta": {}}


@pytest.mark.parametrize("header, payload, match", [
    (TENSOR_MAP | {"dtype": "float64"}, bytes(32), r"tensor: dtype 'float64' is not one of"),
    (TENSOR_MAP | {"shape": [1] * 9}, bytes(4), r"tensor: 9 dimensions, at most 8"),
    (TENSOR_MAP | {"shape": [2, -2]}, bytes(16), r"tensor\.shape\[1\]: negative"),
    (TENSOR_MAP, bytes(15), r"tensor float32\[2, 2\] needs 16 bytes, the frame has 15"),
    (TENSOR_MAP | {"shape": [2**40, 2**40]}, bytes(16), r"needs \d+ bytes, the frame has 16"),
    (TENSOR_MAP | {"meta": {"x": float("nan")}}, bytes(16), r"tensor\.meta\.x: not a finite"),
    (TENSOR_MAP | {"meta": {"a": [[[[1]]]]}}, bytes(16), r"tensor\.meta\.a\[0\]\[0\]\[0\]: nested deeper"),
    (TENSOR_MAP | {"meta": [1]}, bytes(16), r"tensor\.meta: expected a map, got list"),
])
def test_bad_tensor_frames_are_refused(header, payload, match):
    refused(frame(header, payload), match)


def test_a_bad_value_under_long_or_odd_meta_keys_gives_a_short_one_line_error():
    # The keys are the peer's text: whole, two 64 KiB keys made a 128 KiB error (and Refuse).
    long_key = "k" * wire.MAX_TEXT
    error = refused(frame(TENSOR_MAP | {"meta": {long_key: {long_key: float("nan")}}}, bytes(16)), "not a finite")
    assert len(str(error)) < 200
    refused(frame(TENSOR_MAP | {"meta": {"a\nb": {"ok": None, "x y": [float("nan")]}}}, bytes(16)),
            r"^tensor\.meta\['a\\nb'\]\['x y'\]\[0\]: not a finite")  # refused(): and no newline


def test_tensor_meta_keys_must_be_strings():
    raw = msgpack.packb(TENSOR_MAP | {"meta": {b"k": 1}}, use_bin_type=True)
    refused(frame(None, bytes(16), raw=raw), r"tensor\.meta key: expected str, got bytes")


def test_a_payload_on_a_control_message_is_refused_from_its_header():
    packed = msgpack.packb(HB_MAP)
    # Only the prefix and header arrive: the frame is refused without waiting for the payload.
    refused(PREFIX.pack(len(packed), 1000) + packed, r"a heartbeat frame carries no payload, got 1000")


def test_a_hello_from_another_version_names_the_version():
    future = hello_map(version=7, features=["rdma"])
    refused(frame(future), rf"^protocol version 7, we speak {wire.PROTOCOL_VERSION}$")
    refused(frame(hello_map(nonce=b"")), r"hello: unknown field 'nonce'")  # our version: the real fault


def test_truncated_frames_are_an_error_at_end_of_stream():
    raw = b"".join(wire.encode(HB))
    for cut in (3, 8, len(raw) - 1):
        refused(raw[:cut], r"connection closed in the middle of a frame")
    tensor = b"".join(wire.encode(wire.tensor_from_array(np.zeros(4, np.float32))))
    refused(tensor[:-1], r"connection closed in the middle of a frame \(\d+ bytes of it\)")
    decoder = wire.FrameDecoder()
    decoder.feed(raw)
    decoder.feed_eof()
    assert drain(decoder) == [HB]


def test_the_decoder_is_dead_after_an_error():
    decoder = wire.FrameDecoder()
    good = b"".join(wire.encode(HB))
    decoder.feed(good + frame({"t": "gossip"}) + good)
    assert decoder.next_message() == HB  # decoded before the fault: still delivered
    with pytest.raises(ProtocolError, match="gossip"):
        decoder.next_message()
    with pytest.raises(ProtocolError, match="gossip"):
        decoder.feed(good)
    with pytest.raises(ProtocolError, match="gossip"):
        decoder.next_message()


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_give_only_protocol_errors(data):
    decoder = wire.FrameDecoder()
    try:
        decoder.feed(data)
        drain(decoder)
        decoder.feed_eof()
        drain(decoder)
    except ProtocolError:
        pass


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=200))
def test_random_frames_give_only_protocol_errors(header_len, payload_len, data):
    decoder = wire.FrameDecoder()
    try:
        decoder.feed(PREFIX.pack(header_len, payload_len) + data)
        drain(decoder)
        decoder.feed_eof()
        drain(decoder)
    except ProtocolError:
        pass
    assert decoder._payload is None or len(decoder._payload) <= min(len(data), payload_len)  # only what arrived


_values = st.recursive(_scalars, lambda ch: st.lists(ch, max_size=3)
                       | st.dictionaries(st.text(max_size=4) | st.binary(max_size=2), ch, max_size=3),
                       max_leaves=6)


@FAST
@given(any_message, st.data())
def test_random_field_values_give_a_message_or_a_protocol_error(message, data):
    parts = wire.encode(message)
    head = parts[0][PREFIX.size:]
    header = msgpack.unpackb(head, raw=False)
    key = data.draw(st.sampled_from(sorted(header.keys() - {"t"})))
    header[key] = data.draw(_values)
    payload = bytes(parts[1]) if len(parts) > 1 else b""
    try:
        got = wire.decode(frame(header, payload))
    except ProtocolError:
        return
    assert type(got) is type(message)


@FAST
@given(any_message, st.data())
def test_corrupted_frames_give_a_message_or_a_protocol_error(message, data):
    raw = bytearray(stream([message]))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    decoder = wire.FrameDecoder()
    try:
        decoder.feed(bytes(raw))
        decoder.feed_eof()
        drain(decoder)
    except ProtocolError:
        pass


def test_an_announced_payload_is_not_allocated_before_its_header_is_valid():
    tracemalloc.start()
    try:
        garbage = msgpack.packb(list(range(20)))  # an array, not a map
        refused(PREFIX.pack(len(garbage), 400 << 20) + garbage, "not a map")
        decoder = wire.FrameDecoder()
        decoder.feed(PREFIX.pack(wire.MAX_HEADER, 0) + bytes(100))  # a header that never comes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < wire.MAX_HEADER // 2  # neither 400 MiB nor the 1 MiB header was reserved


def test_a_valid_header_announcing_the_largest_payload_costs_only_what_arrives():
    # A stranger's first frame, before any handshake: 60 bytes once made the decoder allocate
    # (and zero) MAX_PAYLOAD, held until the handshake timed out, on every connection.
    header = msgpack.packb(TENSOR_MAP | {"dtype": "uint8", "shape": [wire.MAX_PAYLOAD]})
    arrived = PREFIX.pack(len(header), wire.MAX_PAYLOAD) + header + bytes(1 << 20)
    tracemalloc.start()
    try:
        decoder = wire.FrameDecoder()
        for i in range(0, len(arrived), 64 << 10):
            decoder.feed(arrived[i:i + (64 << 10)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoder.next_message() is None
    assert peak < 1.5 * len(arrived)  # the payload so far (CPython over-allocates it by 1/8), not 512 MiB


def test_a_large_payload_fills_one_buffer_in_linear_time():
    array = np.random.default_rng(0).standard_normal(2 * 2**20, dtype=np.float32)  # 8 MiB
    raw = stream([wire.tensor_from_array(array, "r", 1)])
    decoder = wire.FrameDecoder()
    start = time.perf_counter()
    for i in range(0, len(raw), 4096):  # 2048 small reads: a quadratic buffer would crawl
        decoder.feed(raw[i:i + 4096])
    elapsed = time.perf_counter() - start
    (t,) = drain(decoder)
    assert type(t.data.obj) is bytearray and len(t.data.obj) == array.nbytes
    assert np.array_equal(wire.array_from_tensor(t, "numpy"), array)
    assert elapsed < 2.0


# --- handshake --------------------------------------------------------------------------------


def test_a_wrong_version_is_refused_with_both_versions():
    future = wire.decode(frame(hello_map(version=7)))  # fits our schema: decodes, then refused
    assert wire.version_refusal(future) == f"refused: protocol version 7, we speak {wire.PROTOCOL_VERSION}"
    assert wire.version_refusal(hello()) is None


def test_refuse_round_trips():
    reason = "refused: this cluster has a secret"
    assert wire.decode(b"".join(wire.encode(Refuse(reason)))) == Refuse(reason)


# --- tensors ----------------------------------------------------------------------------------


def through_the_wire(t: Tensor) -> Tensor:
    decoder = wire.FrameDecoder()
    for piece in wire.encode(t):
        decoder.feed(piece)
    return decoder.next_message()


def raw_bytes(array: Any) -> bytes:
    return bytes(memoryview(array).cast("B")) if array.size else b""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16, mx.int32, mx.uint32])
def test_mlx_arrays_round_trip_exactly(dtype):
    array = (mx.random.normal((1, 3, 7), key=mx.random.key(1)) * 1000).astype(dtype)
    t = wire.tensor_from_array(array, "req", 9, {"pos": 3})
    back = wire.array_from_tensor(through_the_wire(t))
    assert back.dtype == array.dtype and back.shape == array.shape
    assert raw_bytes(back) == raw_bytes(array)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "uint32", "int8", "bool", "uint64"])
def test_numpy_arrays_round_trip_exactly(dtype):
    array = (np.random.default_rng(2).standard_normal((2, 3, 4)) * 100).astype(dtype)
    back = wire.array_from_tensor(through_the_wire(wire.tensor_from_array(array)), "numpy")
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()


def test_encode_sends_the_arrays_own_memory():
    array = np.arange(2048, dtype=np.float32).reshape(1, 1, 2048)
    payload = wire.encode(wire.tensor_from_array(array))[-1]
    assert np.shares_memory(np.frombuffer(payload, np.uint8), array)
    hidden = mx.arange(2048, dtype=mx.float32).reshape(1, 1, 2048).astype(mx.bfloat16)
    payload = wire.encode(wire.tensor_from_array(hidden))[-1]
    assert np.frombuffer(payload, np.uint8).ctypes.data == np.frombuffer(
        memoryview(hidden).cast("B"), np.uint8).ctypes.data


def test_a_decoded_numpy_array_views_the_received_buffer():
    t = through_the_wire(wire.tensor_from_array(np.ones(16, np.float32)))
    assert np.shares_memory(wire.array_from_tensor(t, "numpy"), np.frombuffer(t.data, np.uint8))


def test_non_contiguous_arrays_are_sent_in_row_major_order():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = wire.array_from_tensor(through_the_wire(wire.tensor_from_array(array.T)), "numpy")
    assert np.array_equal(back, array.T)
    big_endian = np.arange(4, dtype=">i4")
    back = wire.array_from_tensor(through_the_wire(wire.tensor_from_array(big_endian)), "numpy")
    assert np.array_equal(back, big_endian)
    m = mx.arange(12, dtype=mx.float32).reshape(3, 4).T
    assert mx.array_equal(wire.array_from_tensor(through_the_wire(wire.tensor_from_array(m))), m)


def test_empty_and_scalar_arrays_round_trip():
    for array in (np.zeros((0, 3), np.float32), np.float32(2.5)):
        back = wire.array_from_tensor(through_the_wire(wire.tensor_from_array(array)), "numpy")
        assert back.shape == array.shape and np.array_equal(back, array)


def test_unsupported_tensors_are_refused_on_the_sending_side():
    with pytest.raises(ValueError, match="float64 cannot travel"):
        wire.tensor_from_array(np.zeros(2))
    with pytest.raises(TypeError, match="numpy has no bfloat16"):
        wire.array_from_tensor(wire.tensor_from_array(mx.zeros(2, dtype=mx.bfloat16)), "numpy")
    with pytest.raises(ValueError, match="needs 16 bytes, data has 15"):
        wire.encode(Tensor("r", 0, "float32", (4,), bytes(15)))
    with pytest.raises(ValueError, match="dtype 'complex64'"):
        wire.encode(Tensor("r", 0, "complex64", (1,), bytes(8)))
    with pytest.raises(TypeError, match="not a wire message"):
        wire.encode(object())


# --- bulk connections: Fetch and Part ------------------------------------------------------------

DIGEST = "ab" * 32


@pytest.mark.parametrize("header, payload, match", [
    ({"t": "fetch", "digest": "AB" * 32, "offset": 0, "length": 1}, b"", r"fetch: digest 'ABAB.*' is not 64"),
    ({"t": "fetch", "digest": "ab" * 31, "offset": 0, "length": 1}, b"", r"fetch: digest .* is not 64"),
    ({"t": "fetch", "digest": DIGEST, "offset": 0, "length": wire.MAX_FETCH + 1}, b"", "fetch of .* at most"),
    ({"t": "fetch", "digest": DIGEST, "offset": -1, "length": 1}, b"", r"fetch\.offset: negative"),
    ({"t": "fetch", "digest": DIGEST, "offset": 0, "length": 1}, b"x", "a fetch frame carries no payload"),
    ({"t": "part", "digest": DIGEST, "offset": 0, "length": 3}, b"xy", "part of 3 bytes, the frame has 2"),
    ({"t": "part", "digest": DIGEST, "offset": 0, "length": 2, "error": "gone"}, b"xy", "an error carries no bytes"),
    ({"t": "part", "digest": DIGEST, "offset": 0, "length": wire.MAX_PART + 1}, b"", "part of .* at most"),
])
def test_bad_bulk_frames_are_refused(header, payload, match):
    refused(frame(header, payload), match)


def test_a_part_head_with_its_bytes_sent_apart_is_the_encoded_frame():
    part = Part(DIGEST, 10, 5, "", b"hello")
    head = wire.encode_head(Part(DIGEST, 10, 5))  # data is not looked at
    assert head + b"hello" == b"".join(wire.encode(part))
    header_len, payload_len = wire.parse_prefix(head)
    assert payload_len == 5 and len(head) == PREFIX.size + header_len
    assert wire.parse_header(head[PREFIX.size:], payload_len) == Part(DIGEST, 10, 5)
    with pytest.raises(ProtocolError, match="payload of 5 bytes announced, at most 4"):
        wire.parse_prefix(head, max_payload=4)
    with pytest.raises(ValueError, match="at most"):
        wire.encode_head(Part(DIGEST, 0, wire.MAX_PART + 1))


@settings(max_examples=40, deadline=None)
@given(st.lists(any_message, min_size=1, max_size=4), st.integers(0, 400))
def test_unread_hands_over_what_was_not_taken(msgs, cut):
    raw = stream(msgs)
    decoder = wire.FrameDecoder()
    decoder.feed(raw[:cut])
    taken = [decoder.next_message()] if cut >= len(raw) // 2 else []
    if taken == [None]:
        taken = []
    rest = wire.FrameDecoder()
    rest.feed(decoder.unread() + raw[cut:])
    assert taken + drain(rest) == msgs
