"""Fuzzing the wire protocol: a seeded campaign of malformed input, and a coverage-guided run.

The campaign builds a valid example of every message type in `wire.TAGS` (so a new type is
covered without touching this file), tensors carrying Admit and Step metas, and the frames
of whole handshakes, then feeds, per case, one of:

  bitflip, byte_replace, insert, delete, truncate, splice    byte-level mutations of a seed
  length_prefix   a frame's header or payload length rewritten (0, +-1, the limits, 4 GiB...)
  payload_claim   a tensor header made consistent with a huge payload that never fully comes
  header_confusion  one to three values, keys or the type tag inside the msgpack header
                  swapped for another type (None, bools, extreme ints, nan, long strings,
                  bins, ext...) or a meaningful word (a dtype, a tag, "inf")
  random_bytes    noise, sometimes behind a plausible length prefix
  stream          several seeds, some mutated, back to back

to every reader of untrusted bytes, in-process:

  decoder     a FrameDecoder fed the case in random chunk sizes, then end of stream
  decode      wire.decode of the whole case (must agree with the chunked decoder)
  round_trip  every decoded message encodes and decodes back to itself
  proofs      version_refusal / proof_refusal / check_proof on a decoded Hello, Welcome, Auth
  serving     a decoded tensor read as the engine reads it (Admit.from_tensor, Step.from_meta)
  handshake   one side of the real handshake (peers._answer_steps or _dial_steps, under
              peers._handshake, in an event loop) reading the case from a StreamReader; what
              it writes back must itself be valid frames

Only `ProtocolError` may escape the readers (and `Refused` the handshake); anything else, a
disagreement between the decoders, an ill-typed admission or step accepted, or an invalid
frame we send is a finding: its seed and index are printed and the case (bytes, chunking,
handshake side) saved under bench/results/fuzz_wire_crashes/ (replay: --replay FILE).

Every ALLOC_EVERY-th case runs its decoder under tracemalloc: more than `allocation_bound`
(128 bytes per input byte, as msgpack's objects outgrow their encoding, plus 256 KiB) is a
finding too. Fixed probes measure what lying length prefixes and a large announced payload
make the decoder allocate, and the one known way past the bound, which no mutation reaches:
msgpack makes room for part of every array a header claims, 1023 levels deep at most, so a
crafted 1 MiB header costs ~90 MiB for as long as it takes to refuse it.

`--frames` counts cases (a stream case holds several frames); a case's randomness comes from
(seed, index) alone, so `--seed S` reproduces a run.

    python bench/fuzz_wire.py [--frames 1000000] [--seed 1] [--out bench/results/fuzz_wire.json]
    python bench/fuzz_wire.py --replay bench/results/fuzz_wire_crashes/1-12345.json
    python bench/fuzz_wire.py --atheris 200000 [--seed 1]   # coverage-guided (pip install atheris)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import copy
import hashlib
import json
import math
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgpack
import numpy as np

from tbmesh.generation import Sampling
from tbmesh.net import peers, wire
from tbmesh.serving.messages import Admit, Member, Origin, Release, Step

CRASH_DIR = Path("bench/results/fuzz_wire_crashes")
ALLOC_EVERY = 50  # one case in this many runs its decoder under tracemalloc
ALLOC_HEADER_FACTOR = 128  # msgpack objects outgrow their encoding: b"\x80" (1 byte) is a 64-byte dict
ALLOC_SLACK = 256 << 10  # the decoder's own objects, the exception and its message
MAX_SAVED = 20  # crash files written per run, one per kind of finding (all are counted and printed)

# --- valid examples of everything the wire carries ----------------------------------------------

SECRET = b"cluster secret"
ME = peers.Me("me", 1, "my Mac", "home", "machine-me")
ME_WITH_SECRET = peers.Me("me", 1, "my Mac", "home", "machine-me", SECRET)
MY_NONCE, THEIR_NONCE = b"m" * wire.NONCE_BYTES, b"t" * wire.NONCE_BYTES

# Field values that the type hints cannot say (the semantic rules in wire._SEMANTIC, and a
# greeting from our own cluster so the handshake gets past its first check).
FIELD_VALUES: dict[str, Any] = {"nonce": THEIR_NONCE, "proof": b"p" * wire.PROOF_BYTES, "cluster": ME.cluster,
                                "version": wire.PROTOCOL_VERSION,
                                "group": ("node", "member")}  # a Stage's tensor group: its node first
DIGEST = "0123456789abcdef" * 4  # a weight object's name (Fetch, Part)


def example(tp: Any, name: str = "", full: bool = True) -> Any:
    """A valid value of type hint `tp`; `full`: optional fields and tuples filled in, else empty."""
    if name in FIELD_VALUES:
        return FIELD_VALUES[name]
    simple = {str: name or "text", int: 7, float: 0.25, bool: True, bytes: b"\x01\x02"}
    if tp in simple:
        return simple[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType):
        inner = next(a for a in args if a is not type(None))
        return example(inner, name, full) if full else None
    if origin is Literal:
        return args[0]
    if tp is dict or origin is dict:
        return {"k": [1, "v", None]} if full else {}
    if origin is tuple and args[-1] is Ellipsis:
        return tuple(example(args[0], name, full) for _ in range(2 if full else 0))
    if origin is tuple:
        return tuple(example(a, name, full) for a in args)
    if is_dataclass(tp):
        hints = get_type_hints(tp)
        return tp(**{f.name: example(hints[f.name], f.name, full) for f in fields(tp)})
    raise TypeError(f"no example for {tp!r}: teach bench/fuzz_wire.py's example()")


ROUTE = (("me", 0, 4), ("b", 4, 8))
SAMPLING = Sampling(0.7, 0.9, 5)
ADMIT = Admit("q.0", ROUTE, "e", (1, 2, 3), 1, 10, SAMPLING, (9, 11))
STEPS = {
    "decode": Step(ROUTE, 1, "decode", "lane1", (Member("q.0", "e", 3, 9, SAMPLING, Origin("x1", 7)),
                                                 Member("r.0", "e", 0, 12, Sampling())),
                   releases=(Release("s.0", 20, "x2"),), evictions=("x0",), ahead=True),
    "prefill": Step(ROUTE, 1, "prefill", "", (Member("q.0", "e", 0, 0, SAMPLING),), start=0, length=4),
    "flush": Step(ROUTE, 1, "flush", "lane1", releases=(Release("s.0", 20),)),
}


def tensors() -> dict[str, wire.Tensor]:
    """Tensors as the data plane sends them, and the odd shapes a tensor may have."""
    return {
        "tensor_admit": wire.tensor_from_array(np.array(ADMIT.tokens, np.int32), ADMIT.attempt, ADMIT.produced,
                                               ADMIT.meta()),
        "tensor_step_decode": wire.tensor_from_array(np.ones((2, 1, 8), np.float16), "lane1", 0,
                                                     STEPS["decode"].meta()),
        "tensor_step_prefill": wire.Tensor("", 0, "bfloat16", (1, 4, 8), bytes(range(64)), STEPS["prefill"].meta()),
        "tensor_step_flush": wire.tensor_from_array(np.zeros((0,), np.int32), "lane1", 0, STEPS["flush"].meta()),
        "tensor_scalar": wire.tensor_from_array(np.float32(1.5)),
        "tensor_meta": wire.Tensor("r", 3, "uint8", (2, 3), bytes(6), {"a": [1, 2.5, None, b"x", {"b": "c"}]}),
    }


def bulk_messages() -> dict[str, wire.Fetch | wire.Part]:
    """A bulk connection's requests and answers: bytes of a weight object, none, or why not."""
    return {
        "fetch": wire.Fetch(DIGEST, 1 << 30, 64 << 20),
        "fetch_minimal": wire.Fetch(DIGEST, 0, 0),
        "part": wire.Part(DIGEST, 64, 6, "", b"\x00tbm\xff\x01"),
        "part_empty": wire.Part(DIGEST, 0, 0),
        "part_error": wire.Part(DIGEST, 0, 0, "unknown object"),
    }


def seed_messages() -> dict[str, Any]:
    """One or more valid messages of every type in wire.TAGS, by name; each round-trips."""
    messages: dict[str, Any] = {}
    for cls, tag in wire.TAGS.items():
        if cls is wire.Tensor:
            messages |= tensors()
            continue
        if cls in (wire.Fetch, wire.Part):
            messages |= {k: m for k, m in bulk_messages().items() if type(m) is cls}
            continue
        messages[tag] = example(cls)
        messages[f"{tag}_minimal"] = example(cls, full=False)
    messages["auth_empty"] = wire.Auth(b"")
    messages["welcome_no_proof"] = wire.Welcome(**(asdict(messages["welcome"]) | {"proof": b""}))
    for name, message in messages.items():
        back = wire.decode(b"".join(wire.encode(message)))
        if back != message:
            raise AssertionError(f"the example {name} does not round-trip: fix example() for it")
    return messages


def frame_of(message: Any) -> bytes:
    return b"".join(wire.encode(message))


def seed_frames() -> dict[str, tuple[bytes, ...]]:
    """Seeds to mutate: one frame per example message, and whole handshakes (several frames)."""
    messages = seed_messages()
    seeds = {name: (frame_of(m),) for name, m in messages.items()}
    seeds["listener_conversation"] = (frame_of(messages["hello"]), frame_of(messages["auth_empty"]))
    seeds["listener_conversation_proof"] = (frame_of(messages["hello"]), frame_of(messages["auth"]))
    seeds["dialer_conversation"] = (frame_of(messages["welcome_no_proof"]), frame_of(messages["heartbeat"]))
    return seeds


# --- mutations ----------------------------------------------------------------------------------

Seed = tuple[bytes, ...]
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7, 0xCA, 0xCB, 0xCF, 0xD3,
                     0xD4, 0xD9, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0xA0, 0xE0)
INTERESTING_LENGTHS = (0, 1, 2, 7, 8, wire.MAX_HEADER, wire.MAX_HEADER + 1, wire.MAX_PAYLOAD, wire.MAX_PAYLOAD + 1,
                       2**31 - 1, 2**31, 2**32 - 1)


def _flat(seed: Seed) -> bytes:
    return b"".join(seed)


def _bitflip(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    data = bytearray(_flat(seed))
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        i = rng.randrange(len(data) * 8)
        data[i // 8] ^= 1 << (i % 8)
    return bytes(data)


def _byte_replace(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    data = bytearray(_flat(seed))
    for _ in range(rng.choice((1, 1, 2, 3, 6))):
        data[rng.randrange(len(data))] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.6 else rng.randrange(256)
    return bytes(data)


def _insert(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    data = _flat(seed)
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        piece = rng.randbytes(rng.choice((1, 1, 2, 4, 16, 64)))
    else:  # a piece of another frame
        other = _flat(rng.choice(seeds))
        start = rng.randrange(len(other))
        piece = other[start:start + rng.randint(1, 64)]
    return data[:at] + piece + data[at:]


def _delete(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    data = _flat(seed)
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.choice((1, 1, 2, 4, 16, 64)):]


def _truncate(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    data = _flat(seed)
    return data[:rng.randrange(len(data))]


def _splice(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    a, b = _flat(seed), _flat(rng.choice(seeds))
    return a[:rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1):]


def _length_prefix(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    frames = list(seed)
    i = rng.randrange(len(frames))
    header_len, payload_len = wire.PREFIX.unpack_from(frames[i])
    lengths = [header_len, payload_len]
    which = rng.randrange(2)
    current = lengths[which]
    lengths[which] = rng.choice(INTERESTING_LENGTHS + (current - 1, current + 1, current * 2, rng.randrange(2**32)))
    lengths[which] = max(0, min(lengths[which], 2**32 - 1))
    frames[i] = wire.PREFIX.pack(*lengths) + frames[i][wire.PREFIX.size:]
    return b"".join(frames)


def _split(frame: bytes) -> tuple[Any, bytes]:
    header_len, _ = wire.PREFIX.unpack_from(frame)
    return msgpack.unpackb(frame[wire.PREFIX.size:wire.PREFIX.size + header_len], raw=False), \
        frame[wire.PREFIX.size + header_len:]


def _pack(header: Any, payload: bytes, payload_len: int | None = None, bin_type: bool = True) -> bytes:
    packed = msgpack.packb(header, use_bin_type=bin_type)
    return wire.PREFIX.pack(len(packed), len(payload) if payload_len is None else payload_len) + packed + payload


def _payload_claim(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """A tensor whose header is valid for a large payload, of which only a little arrives."""
    claim = rng.choice((wire.MAX_PAYLOAD, wire.MAX_PAYLOAD - 1, 64 << 20, 1 << 20, rng.randrange(1, wire.MAX_PAYLOAD)))
    header = {"t": "tensor", "request": "r", "step": 0, "dtype": "uint8", "shape": [claim], "meta": {}}
    if rng.random() < 0.5:  # the same bytes claimed as a 2-D float16 tensor
        header |= {"dtype": "float16", "shape": [2, claim // 4]}
        claim = claim // 4 * 4
    arrived = rng.randbytes(rng.choice((0, 1, 100, 4096, 65536)))
    return _pack(header, arrived, payload_len=claim)


# Strings that mean something to some field: tags, dtypes, the choices of Literal fields, ids.
WORDS = sorted(set(wire.TAGS.values()) | set(wire.DTYPES) | {"peer", "probe", "bulk", "end", "fail", "preempt", "admit",
                                                             "decode", "prefill", "flush", ME.node, ME.cluster,
                                                             "0.5", "inf", "nan", "-1"})


PLAIN_VALUES = (None, True, False, 0, -1, 1, 2, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -(2**63), 0.5, -0.0, -1.5, 1e300,
                5e-324, float("nan"), float("inf"), "", b"", [], {}, msgpack.Timestamp(2**32 - 1, 999_999_999))


def _palette(rng: random.Random) -> Any:
    """A msgpack value of any type, often one a field does not expect."""
    kind = rng.randrange(8)
    if kind <= 2:
        return copy.deepcopy(rng.choice(PLAIN_VALUES))  # a fresh [] or {}: later changes must not share it
    if kind == 3:
        return rng.choice(WORDS)
    if kind == 4:
        return "é" * rng.randint(1, 40) if rng.random() < 0.5 else b"x" * rng.choice((15, 16, 31, 32, 33))
    if kind == 5:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.choice((0, 4, 8, 12))))
    if kind == 6:
        return _long_value(rng)
    return [copy.deepcopy(rng.choice(PLAIN_VALUES)) for _ in range(rng.randint(1, 4))]


def _long_value(rng: random.Random) -> Any:
    """A value at or just past a limit: a long string, a long list, a deep nesting."""
    kind = rng.randrange(4)
    if kind == 0:
        return "x" * (wire.MAX_TEXT + rng.randint(-1, 1))
    if kind == 1:
        return list(range(wire.MAX_ITEMS + rng.randint(-1, 1)))
    if kind == 2:
        value: Any = 1
        for _ in range(rng.randint(2, 40)):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    return b"\x00" * (wire.MAX_TEXT + rng.randint(-1, 1))


def _slots(value: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) inside a decoded header."""
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((value, key))
            _slots(item, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append((value, i))
            _slots(item, out)
    return out


FIELD_NAMES = sorted({f.name for cls in wire.TAGS for f in fields(cls)} | {"t", "extra", ""})


def _confuse(rng: random.Random, header: Any) -> Any:
    """`header` (a decoded msgpack header) with one thing inside it changed."""
    op = rng.randrange(10)
    slots = _slots(header, [])
    if op == 0 and isinstance(header, dict):  # another message's type tag over these fields
        header["t"] = rng.choice(list(wire.TAGS.values()) + ["", "x" * 100])
    elif op == 1 or not slots:  # the whole header another type
        return _palette(rng)
    else:
        container, key = rng.choice(slots)
        if op == 6 and isinstance(container, dict):
            del container[key]
        elif op == 7 and isinstance(container, dict):  # a key of another type or name
            item = container.pop(key)
            new_key = rng.choice(FIELD_NAMES + ["x" * wire.MAX_TEXT, "é" * 30]) if rng.random() < 0.8 else rng.choice(
                (1, b"k", None, 2.5))
            container[new_key] = item
        elif op == 8 and isinstance(container, list) and container:  # an item more or one less
            if rng.random() < 0.5:
                container.pop()
            else:
                container.append(container[key])
        else:
            container[key] = _palette(rng)
    return header


def _header_confusion(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    frames = list(seed)
    i = rng.randrange(len(frames))
    header, payload = _split(frames[i])
    for _ in range(rng.choice((1, 1, 2, 3))):
        header = _confuse(rng, header)
    frames[i] = _pack(header, payload, bin_type=rng.random() < 0.9)  # bin_type=False: bytes packed as str
    return b"".join(frames)


def _random_bytes(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    size = int(2 ** rng.uniform(0, 10))
    noise = rng.randbytes(size)
    if rng.random() < 0.5:  # past the prefix: noise as a header
        return wire.PREFIX.pack(size, rng.choice((0, 0, 1, rng.randrange(2**32)))) + noise
    return noise


def _stream(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    parts = []
    for _ in range(rng.randint(2, 6)):
        one = rng.choice(seeds)
        if rng.random() < 1 / 3:
            mutate = MUTATIONS[rng.choice([k for k in MUTATIONS if k not in ("stream", "payload_claim")])]
            parts.append(mutate(rng, one, seeds))
        else:
            parts.append(_flat(one))
    return b"".join(parts)


MUTATIONS: dict[str, Callable[[random.Random, Seed, list[Seed]], bytes]] = {
    "bitflip": _bitflip, "byte_replace": _byte_replace, "insert": _insert, "delete": _delete,
    "truncate": _truncate, "splice": _splice, "length_prefix": _length_prefix, "payload_claim": _payload_claim,
    "header_confusion": _header_confusion, "random_bytes": _random_bytes, "stream": _stream,
}


# --- one case, through every reader --------------------------------------------------------------


@dataclass
class Case:
    """One input and how it is delivered: the decoder's chunk sizes, the handshake side."""

    data: bytes
    chunks: list[int]
    side: Literal["listener", "dialer"]
    secret: bool
    kind: str = ""
    seed: int = 0
    index: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"data": base64.b64encode(self.data).decode()}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Case:
        known = {f.name for f in fields(cls)}  # a saved case also says what it found then
        return cls(**{k: v for k, v in saved.items() if k in known} | {"data": base64.b64decode(saved["data"])})


class Finding(Exception):
    """A reader broke its contract: `target` says which, the message how."""

    def __init__(self, target: str, what: str) -> None:
        super().__init__(f"{target}: {what}")
        self.target = target


def chunk_sizes(rng: random.Random, size: int) -> list[int]:
    """How a socket might deliver `size` bytes: at once, byte by byte, or in random pieces."""
    mode = rng.random()
    if size == 0 or mode < 0.25:
        return [size] if size else []
    if mode < 0.35 and size <= 512:
        return [1] * size
    sizes = []
    while size:
        piece = min(size, int(2 ** rng.uniform(0, math.log2(size + 1))))
        sizes.append(piece)
        size -= piece
    return sizes


def make_case(seed: int, index: int, seeds: list[Seed]) -> Case:
    rng = random.Random(f"{seed}:{index}")  # a case depends on nothing but its seed and index
    kind = rng.choice(list(MUTATIONS))
    data = MUTATIONS[kind](rng, rng.choice(seeds), seeds)
    return Case(data, chunk_sizes(rng, len(data)), rng.choice(("listener", "dialer")), rng.random() < 0.5,
                kind, seed, index)


def read_frames(data: bytes, chunks: list[int]) -> tuple[list[Any], wire.ProtocolError | None]:
    """What a FrameDecoder makes of `data` delivered in `chunks`, then end of stream."""
    decoder = wire.FrameDecoder()
    messages: list[Any] = []
    view, at = memoryview(data), 0
    try:
        for size in chunks:
            decoder.feed(view[at:at + size])
            at += size
            messages.extend(decoder)
        decoder.feed_eof()
        messages.extend(decoder)
    except wire.ProtocolError as error:
        return messages, error
    return messages, None


def check_decoders(case: Case) -> tuple[list[Any], wire.ProtocolError | None]:
    """The chunked decoder and wire.decode agree; what the chunked one made of the case."""
    try:
        messages, error = read_frames(case.data, case.chunks)
    except Exception as error:
        raise Finding("decoder", f"{type(error).__name__}: {error}") from error
    try:
        single = wire.decode(case.data)
    except wire.ProtocolError:
        single = None
    except Exception as error:
        raise Finding("decode", f"{type(error).__name__}: {error}") from error
    if single is not None and (error is not None or messages != [single]):
        raise Finding("decode", f"decode gave a {type(single).__name__}, the chunked decoder {messages} {error}")
    if single is None and error is None and len(messages) == 1:
        raise Finding("decode", "decode refused what the chunked decoder read as one message")
    return messages, error


def check_round_trip(message: Any) -> None:
    """What we accept we can send on (link states are flooded onward as they came)."""
    try:
        back = wire.decode(frame_of(message))
    except Exception as error:
        raise Finding("round_trip", f"{type(message).__name__} re-encoded: {type(error).__name__}: {error}") from error
    if back != message:
        raise Finding("round_trip", f"{type(message).__name__} came back different")


def check_proofs(message: Any) -> None:
    """The handshake's checking functions on a greeting or an Auth as it arrived."""
    try:
        if isinstance(message, wire.Hello):  # Welcome too
            wire.version_refusal(message)
            wire.proof_refusal(SECRET, message.proof, message.nonce, MY_NONCE, "peer@m", "me@m", "listener")
            wire.check_proof(SECRET, message.proof, message.nonce, MY_NONCE, message.node, "me", "listener")
        elif isinstance(message, wire.Auth):
            wire.proof_refusal(SECRET, message.proof, THEIR_NONCE, MY_NONCE, "peer@m", "me@m", "dialer")
            wire.proof_refusal(None, message.proof, THEIR_NONCE, MY_NONCE, "peer@m", "me@m", "dialer")
    except Exception as error:
        raise Finding("proofs", f"{type(error).__name__}: {error}") from error


def read_as_engine(tensor: wire.Tensor) -> Admit | Step:
    """A tensor read as serving.engine.Engine.receive reads one addressed to us."""
    if tensor.meta.get("kind") == "admit":
        return Admit.from_tensor(tensor)
    return Step.from_meta(tensor.meta)


def ill_typed(read: Admit | Step) -> str | None:
    """What an accepted admission or step holds that its sender could not have meant."""
    if isinstance(read, Admit) and not all(type(t) is int and t >= 0 for t in read.tokens):
        return f"tokens {read.tokens!r:.80}"
    samplings = [read.sampling] if isinstance(read, Admit) else [m.sampling for m in read.members]
    for s in samplings:
        if not all(type(x) is float and math.isfinite(x) for x in (s.temperature, s.top_p)):
            return f"sampling {s}"
    return None


def check_serving(message: Any) -> str | None:
    if not isinstance(message, wire.Tensor):
        return None
    try:
        read = read_as_engine(message)
    except wire.ProtocolError:
        return "refused"
    except Exception as error:
        raise Finding("serving", f"{type(error).__name__}: {error}") from error
    if why := ill_typed(read):
        raise Finding("serving", f"accepted a {type(read).__name__} with {why}")
    return "read"


class HandshakeWriter:
    """The part of a StreamWriter the handshake uses; keeps what it writes."""

    def __init__(self) -> None:
        self.sent = bytearray()
        self.closed = False

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        for part in parts:
            self.sent += part

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_loop: asyncio.AbstractEventLoop | None = None  # the handshakes', made on first use


def handshake_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


def close_handshake_loop() -> None:
    if _loop is not None:
        _loop.close()


def check_handshake(case: Case) -> str:
    """One side of the real handshake reading the case; 'accepted' or 'refused'."""
    loop = handshake_loop()
    reader = asyncio.StreamReader(loop=loop)
    view, at = memoryview(case.data), 0
    for size in case.chunks:
        reader.feed_data(bytes(view[at:at + size]))
        at += size
    reader.feed_eof()
    writer = HandshakeWriter()
    me = ME_WITH_SECRET if case.secret else ME
    if case.side == "listener":
        steps = peers._answer_steps(reader, writer, wire.FrameDecoder(), me)
    else:
        steps = peers._dial_steps(reader, writer, wire.FrameDecoder(), me, "peer")
    try:
        loop.run_until_complete(peers._handshake(steps, writer))
        outcome = "accepted"
    except peers.Refused:
        outcome = "refused"
    except Exception as error:
        raise Finding("handshake", f"{type(error).__name__}: {error}") from error
    sent, sent_error = read_frames(bytes(writer.sent), [len(writer.sent)])
    if sent_error is not None:
        raise Finding("handshake", f"we sent an invalid frame: {sent_error}"[:300])
    if any(type(m) not in (wire.Hello, wire.Welcome, wire.Auth, wire.Refuse) for m in sent):
        raise Finding("handshake", f"we sent {[type(m).__name__ for m in sent]}")
    return outcome


def allocation_bound(size: int) -> int:
    """What decoding `size` bytes may allocate: msgpack objects for header bytes, at most as much
    again for payload bytes that arrived, and a constant."""
    return ALLOC_HEADER_FACTOR * size + ALLOC_SLACK


def check_allocation(case: Case) -> int:
    """The decoder's peak traced allocation on the case; a Finding past allocation_bound."""
    tracemalloc.start()
    try:
        read_frames(case.data, case.chunks)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if peak > allocation_bound(len(case.data)):
        raise Finding("allocation", f"{peak} bytes traced decoding {len(case.data)} bytes")
    return peak


def run_case(case: Case, measure: bool = False) -> dict[str, Any]:
    """Every reader on one case; what happened (raises Finding on a broken contract)."""
    messages, error = check_decoders(case)
    served = []
    for message in messages:
        check_round_trip(message)
        check_proofs(message)
        served.append(check_serving(message))
    outcome = "protocol error" if not messages else "decoded, then protocol error" if error else "decoded ok"
    # which check refused it: the error's text up to its first colon, numbers left out
    refusal = re.sub(r"\d+", "N", str(error).partition(":")[0])[:60] if error else None
    return {"outcome": outcome, "refusal": refusal, "handshake": check_handshake(case),
            "serving": [s for s in served if s], "peak": check_allocation(case) if measure else None}


# --- allocation probes ---------------------------------------------------------------------------


def traced_peak(action: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _feed(data: bytes, chunk: int = 64 << 10) -> wire.FrameDecoder:
    decoder = wire.FrameDecoder()
    try:
        for at in range(0, len(data), chunk):
            decoder.feed(data[at:at + chunk])
    except wire.ProtocolError:
        pass
    return decoder


def allocation_probes() -> dict[str, dict[str, int]]:
    """Peak traced bytes when a peer lies about lengths, against what actually arrived."""
    tensor_header = msgpack.packb({"t": "tensor", "request": "r", "step": 0, "dtype": "uint8",
                                   "shape": [wire.MAX_PAYLOAD], "meta": {}})
    big_claim = wire.PREFIX.pack(len(tensor_header), wire.MAX_PAYLOAD) + tensor_header
    # An array32 claiming 2**20 - 1 items, 1023 deep (msgpack's stack ends at 1024 levels), padded to
    # MAX_HEADER: msgpack allocates a list for part of each claim before it finds the input short.
    nesting = (b"\xdd" + (2**20 - 1).to_bytes(4, "big")) * 1023
    probes = {
        "header_claims_4GiB": wire.PREFIX.pack(2**32 - 1, 0) + bytes(1000),
        "payload_claims_4GiB": wire.PREFIX.pack(10, 2**32 - 1) + bytes(1000),
        "header_claims_MAX_HEADER": wire.PREFIX.pack(wire.MAX_HEADER, 0) + bytes(100_000),
        "tensor_claims_MAX_PAYLOAD_header_only": big_claim,
        "tensor_claims_MAX_PAYLOAD_1MiB_arrived": big_claim + bytes(1 << 20),
        "msgpack_nesting_1023_arrays": wire.PREFIX.pack(wire.MAX_HEADER, 0) + nesting.ljust(wire.MAX_HEADER, b"\xc0"),
    }
    figures = {}
    for name, data in probes.items():
        figures[name] = {"arrived": len(data), "peak_traced": traced_peak(lambda data=data: _feed(data))}
    return figures


# --- the campaign --------------------------------------------------------------------------------


def save_case(case: Case, error: BaseException, directory: Path = CRASH_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"atheris-{hashlib.sha256(case.data).hexdigest()[:12]}" if case.kind == "atheris" else \
        f"{case.seed}-{case.index}"
    path = directory / f"{name}.json"
    path.write_text(json.dumps(case.to_json() | {"finding": str(error)[:500]}, indent=1) + "\n")
    return path


def campaign(frames: int, seed: int, save: bool = True, quiet: bool = False) -> dict[str, Any]:
    seeds = list(seed_frames().values())
    by_kind: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    handshakes: collections.Counter[str] = collections.Counter()
    serving: collections.Counter[str] = collections.Counter()
    refusals: collections.Counter[str] = collections.Counter()
    findings: list[dict[str, Any]] = []
    signatures: set[str] = set()  # of the findings saved: one case of each
    peaks: list[tuple[int, int]] = []  # (peak, size) of the measured cases
    start = time.perf_counter()
    for index in range(frames):
        case = make_case(seed, index, seeds)
        by_kind[case.kind] += 1
        try:
            result = run_case(case, measure=index % ALLOC_EVERY == 0)
        except Finding as finding:
            outcomes[f"finding ({finding.target})"] += 1
            signature = re.sub(r"[\d\s,()-]+", " ", str(finding))[:60]  # the same fault, other numbers
            where = None
            if save and signature not in signatures and len(signatures) < MAX_SAVED:
                signatures.add(signature)
                where = save_case(case, finding)
            findings.append({"seed": seed, "index": index, "kind": case.kind, "finding": str(finding)[:500],
                             "saved": str(where) if where else None})
            if not quiet:
                print(f"FINDING seed {seed} index {index} ({case.kind}): {finding}"[:400], flush=True)
            continue
        outcomes[result["outcome"]] += 1
        if result["refusal"]:
            refusals[result["refusal"]] += 1
        handshakes[result["handshake"]] += 1
        serving.update(result["serving"])
        if result["peak"] is not None:
            peaks.append((result["peak"], len(case.data)))
        if not quiet and (index + 1) % 100_000 == 0:
            print(f"  {index + 1} cases, {(index + 1) / (time.perf_counter() - start):.0f}/s", flush=True)
    elapsed = time.perf_counter() - start
    close_handshake_loop()
    peak, peak_size = max(peaks) if peaks else (0, 0)
    closest = max((p / allocation_bound(size) for p, size in peaks), default=0.0)
    return {
        "frames": frames, "seed": seed, "seconds": round(elapsed, 1), "frames_per_s": round(frames / elapsed),
        "seeds": len(seeds), "by_kind": dict(sorted(by_kind.items())), "by_outcome": dict(sorted(outcomes.items())),
        "handshake": dict(handshakes), "serving": dict(serving), "distinct_refusals": len(refusals),
        "top_refusals": dict(refusals.most_common(15)),
        "findings_total": len(findings), "findings": findings,
        "allocation": {"measured_cases": len(peaks), "peak_traced": peak, "peak_case_bytes": peak_size,
                       "closest_to_bound": round(closest, 3),
                       "bound": f"{ALLOC_HEADER_FACTOR} x input bytes + {ALLOC_SLACK}"},
    }


def replay(paths: list[str]) -> int:
    failed = 0
    for path in paths:
        case = Case.from_json(json.loads(Path(path).read_text()))
        try:
            result = run_case(case, measure=True)
            print(f"{path}: no finding now ({result})")
        except Finding:
            failed += 1
            print(f"{path}: still a finding")
            traceback.print_exc()
    close_handshake_loop()
    return 1 if failed else 0


# --- coverage-guided (atheris) -------------------------------------------------------------------


def atheris_case(data: bytes, seed: int = 0) -> Case:
    """An atheris input as a case: its first byte picks the handshake side, the secret and the
    decoder's chunk size; the rest is the bytes."""
    head, body = (data[0], data[1:]) if data else (0, b"")
    chunk = 1 << (head >> 2) % 13  # 1 to 4096 bytes
    return Case(body, [min(chunk, len(body) - at) for at in range(0, len(body), chunk)],
                "listener" if head & 1 else "dialer", bool(head & 2), "atheris", seed)


def run_atheris(runs: int, seed: int) -> dict[str, Any]:
    """bench/atheris_wire.py for `runs` inputs from the seed frames, in a child process (libFuzzer
    exits when done); its figures, parsed from libFuzzer's report."""
    with tempfile.TemporaryDirectory(prefix="fuzz_wire_atheris_") as work:
        corpus = Path(work, "corpus")
        corpus.mkdir()
        for name, frames in seed_frames().items():
            (corpus / name).write_bytes(bytes([12 << 2 | 1]) + b"".join(frames))  # listener, 4 KiB chunks
        start = time.perf_counter()
        child = subprocess.run([sys.executable, str(Path(__file__).with_name("atheris_wire.py")), str(corpus),
                                f"-runs={runs}", f"-seed={seed}", "-max_len=4096", "-print_final_stats=1",
                                f"-artifact_prefix={work}/"], capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
    log = child.stderr + child.stdout
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    crashed = child.returncode != 0 or "Uncaught Python exception" in log
    result = {"runs": runs, "seed": seed, "seconds": round(elapsed, 1), "returncode": child.returncode,
              "crashed": crashed, "stats": {k: int(v) for k, v in stats.items()}}
    if done:
        executions, edges, features, corpus_size = map(int, done[-1])
        result |= {"executions": executions, "coverage_edges": edges, "features": features, "corpus": corpus_size}
    if crashed:
        result["log_tail"] = log[-3000:]
    return result


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/fuzz_wire.json")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run saved cases again")
    parser.add_argument("--atheris", type=int, metavar="RUNS", help="a coverage-guided run of RUNS inputs")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results |= {"python": platform.python_version(), "machine": platform.machine(), "msgpack": msgpack.version}
    if args.atheris:
        figures = run_atheris(args.atheris, args.seed)
        results["atheris"] = figures
        print(f"atheris: {figures.get('executions')} inputs in {figures['seconds']} s "
              f"({figures['stats'].get('average_exec_per_sec')}/s once started), coverage {figures.get('coverage_edges')} "
              f"edges, {figures.get('features')} features, corpus {figures.get('corpus')}, crashed: {figures['crashed']}")
    else:
        figures = campaign(args.frames, args.seed)
        figures["allocation"]["probes"] = allocation_probes()
        figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        results["campaign"] = figures
        print(f"{figures['frames']} frames in {figures['seconds']} s ({figures['frames_per_s']}/s), seed {args.seed}")
        print("by kind:   ", figures["by_kind"])
        print("by outcome:", figures["by_outcome"], "| findings (other exceptions...):", figures["findings_total"])
        print("handshake: ", figures["handshake"], "| serving reads:", figures["serving"])
        print(f"refusals:   {figures['distinct_refusals']} distinct; most often:", dict(list(figures["top_refusals"].items())[:6]))
        alloc = figures["allocation"]
        print(f"allocation: {alloc['measured_cases']} cases measured, peak {alloc['peak_traced']} B "
              f"(a {alloc['peak_case_bytes']}-byte case); the closest case reached {alloc['closest_to_bound']:.1%} "
              f"of its bound ({alloc['bound']})")
        for name, probe in alloc["probes"].items():
            print(f"  {name:40} {probe['arrived']:>9} B arrived, peak traced {probe['peak_traced']:>11} B")
        print(f"peak RSS {figures['peak_rss_mib']} MiB")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    found = results["atheris"]["crashed"] if args.atheris else results["campaign"]["findings_total"]
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
