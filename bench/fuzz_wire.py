"""Fuzzing the wire protocol and its TLS: a seeded campaign of malformed input, and a coverage-guided run.

Each case is of one of four modes.

`frames` (most cases): the campaign builds a valid example of every message type in `wire.TAGS`
(so a new type is covered without touching this file), tensors carrying Admit and Step metas,
and the frames of whole conversations, then feeds, per case, one of:

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
  greetings   wire.version_refusal and peers._check_hello on a decoded Hello or Welcome
  serving     a decoded tensor read as the engine reads it (Admit.from_tensor, Step.from_meta)
  handshake   one side of the real handshake (peers._answer_steps or _dial_steps, under
              peers._handshake, in an event loop) reading the case chunk by chunk, then the end
              of the stream; with or without the secret (a listener with one answers a plain
              Hello with a plain Refuse, a dialer with one speaks TLS); what it writes back must
              be valid frames (or TLS records)

The three TLS modes mutate real TLS 1.3 bytes between two `secure.Session`s of one secret
(recorded once per run, or made live for the case) with the byte-level mutations above and
the record-level ones: a record's length or type or version rewritten, a record dropped,
replayed, swapped with another, cut short, taken from another session, a forged record
injected (noise, a plaintext alert, a ChangeCipherSpec, a second ClientHello), the
plaintext handshake re-fragmented, random bytes opening with 0x16, a chain of these:

  tls_listener  a listener with the secret (peers._answer_steps) fed a mutated first flight (a
                recorded ClientHello, sometimes with the rest of its recorded conversation), or
                a live dialer's ClientHello or second flight (its certificate, Finished and
                sealed Hello) mutated, or its Hello's plaintext replaced by a `frames` input
  tls_dialer    a dialer with the secret (peers._dial_steps) fed a mutated recorded server
                flight, or a live listener's server flight or sealed Welcome mutated, or its
                Welcome's plaintext replaced by a `frames` input
  tls_records   an established pair: the frames of one to six seed messages sealed by one
                end, mutated, fed in random chunks to the other (Session.receive or
                feed/read_into), what comes out fed to a FrameDecoder

The contract: only `ProtocolError` escapes a reader and only `Refused` a handshake, which ends
(the peer's end of stream comes after its last flight; a handshake that hangs until the time
limit is a finding); a changed or replayed flight never completes a handshake with a greeting
other than the one sent, a recorded one never completes one at all; and the plaintext a
session yields is a prefix of what was sealed, and never includes anything of a record at or
after the first changed byte. Anything else, a disagreement between the decoders, an
ill-typed admission or step accepted, or an invalid frame we send is a finding: its seed and
index are printed and the case saved under bench/results/fuzz_wire_crashes/ (replay: --replay
FILE). A `frames` case replays from its bytes and chunks; a TLS case from its seed and index
(the keys are new every run, the mutation is the same; its `data` is the input last fed, to read).

Every ALLOC_EVERY-th `frames` case runs its decoder under tracemalloc: more than
`allocation_bound` (128 bytes per input byte, as msgpack's objects outgrow their encoding,
plus 256 KiB) is a finding too. Fixed probes measure what lying length prefixes and a large
announced payload make the decoder allocate, and the one known way past the bound, which no
mutation reaches: msgpack makes room for part of every array a header claims, 1023 levels
deep at most, so a crafted 1 MiB header costs ~90 MiB for as long as it takes to refuse it.

`--cases` counts cases of all modes (a stream case holds several frames); a case's mode and
mutation come from (seed, index) alone, so `--seed S` reproduces a run.

    python bench/fuzz_wire.py [--cases 1000000] [--seed 1] [--out bench/results/fuzz_wire.json]
    python bench/fuzz_wire.py --replay bench/results/fuzz_wire_crashes/1-12345.json
    python bench/fuzz_wire.py --atheris 200000 [--seed 1]   # coverage-guided (pip install -e '.[fuzz]')
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import copy
import functools
import hashlib
import json
import math
import platform
import random
import re
import resource
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgpack
import numpy as np

from tbmesh.core.generation import Sampling
from tbmesh.net import peers, secure, wire
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

# Field values that the type hints cannot say (the semantic rules in wire._SEMANTIC, and a
# greeting from our own cluster so the handshake gets past its first check).
FIELD_VALUES: dict[str, Any] = {"cluster": ME.cluster, "version": wire.PROTOCOL_VERSION,
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


@functools.lru_cache(maxsize=1)  # made once (a TLS case takes messages from it): read, never change
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
    seeds["listener_conversation"] = (frame_of(messages["hello"]), frame_of(messages["heartbeat"]))
    seeds["dialer_conversation"] = (frame_of(messages["welcome"]), frame_of(messages["link_states"]))
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


# --- TLS mutations: of a flight or of sealed frames, as a tuple of records -------------------------

TLS_RECORD = struct.Struct(">BHH")  # content type, legacy version, length of the body that follows
CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 0x14, 0x15, 0x16, 0x17
TLS_LENGTHS = (0, 1, 16, 17, 2**14, 2**14 + 256, 2**14 + 257, 2**16 - 1)  # 2**14 + 256: TLS 1.3's ciphertext limit
TLS_VERSIONS = (0x0300, 0x0301, 0x0302, 0x0303, 0x0304, 0xFEFD, 0x0000, 0xFFFF)


def tls_records(stream: bytes) -> tuple[bytes, ...]:
    """`stream` cut into TLS records, each with its header (a cut-off tail stays one piece)."""
    records, at = [], 0
    while at < len(stream):
        end = len(stream) if len(stream) - at < TLS_RECORD.size else \
            at + TLS_RECORD.size + TLS_RECORD.unpack_from(stream, at)[2]
        records.append(stream[at:end])
        at = end
    return tuple(records)


def _record(content_type: int, body: bytes, version: int = 0x0303) -> bytes:
    return TLS_RECORD.pack(content_type, version, len(body)) + body


def _record_length(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    records = list(seed)
    i = rng.randrange(len(records))
    if len(records[i]) < TLS_RECORD.size:
        return _truncate(rng, seed, seeds)
    kind, version, length = TLS_RECORD.unpack_from(records[i])
    new = rng.choice(TLS_LENGTHS + (length - 1, length + 1, rng.randrange(2**16)))
    records[i] = TLS_RECORD.pack(kind, version, max(0, min(new, 2**16 - 1))) + records[i][TLS_RECORD.size:]
    return b"".join(records)


def _record_type(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """A record's content type or legacy version rewritten (TLS 1.3 ignores the version alone)."""
    records = list(seed)
    i = rng.randrange(len(records))
    if len(records[i]) < TLS_RECORD.size:
        return _truncate(rng, seed, seeds)
    kind, version, length = TLS_RECORD.unpack_from(records[i])
    if rng.random() < 0.6:
        kind = rng.choice((CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA, 0x18, 0x00, 0xFF, rng.randrange(256)))
    else:
        version = rng.choice(TLS_VERSIONS + (rng.randrange(2**16),))
    records[i] = TLS_RECORD.pack(kind, version, length) + records[i][TLS_RECORD.size:]
    return b"".join(records)


def _record_drop(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    records = list(seed)
    del records[rng.randrange(len(records))]
    return b"".join(records)


def _record_replay(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """A record sent again, right after itself or later."""
    records = list(seed)
    i = rng.randrange(len(records))
    records.insert(rng.randint(i + 1, len(records)), records[i])
    return b"".join(records)


def _record_swap(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """Two records reordered (the next one, or any other)."""
    records = list(seed)
    if len(records) < 2:
        return _record_replay(rng, seed, seeds)
    i = rng.randrange(len(records) - 1)
    j = i + 1 if rng.random() < 0.5 else rng.randrange(i + 1, len(records))
    records[i], records[j] = records[j], records[i]
    return b"".join(records)


def _record_foreign(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """A record of another session (other keys) in place of one, or between two."""
    records, other = list(seed), rng.choice(seeds)
    piece = other[rng.randrange(len(other))]
    i = rng.randrange(len(records))
    if rng.random() < 0.5:
        records[i] = piece
    else:
        records.insert(i + rng.randrange(2), piece)
    return b"".join(records)


def _record_cut(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """A record's body cut short, its length made to match."""
    records = list(seed)
    i = rng.randrange(len(records))
    if len(records[i]) <= TLS_RECORD.size:
        return _record_drop(rng, seed, seeds)
    kind, version, _ = TLS_RECORD.unpack_from(records[i])
    body = records[i][TLS_RECORD.size:]
    keep = rng.choice((0, 1, len(body) - 1, len(body) - 16, rng.randrange(len(body))))
    records[i] = _record(kind, body[:max(0, keep)], version)
    return b"".join(records)


def _record_inject(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """A forged record between two: noise sealed by no one, a plaintext alert (a close_notify
    would end the stream early), a ChangeCipherSpec, a plaintext handshake message (a second
    ClientHello, a KeyUpdate, a HelloRequest), an empty record."""
    records = list(seed)
    choice = rng.randrange(6)
    if choice == 0:
        forged = _record(APPLICATION_DATA, rng.randbytes(rng.choice((1, 16, 17, 18, 64, 300))))
    elif choice == 1:
        forged = _record(ALERT, bytes((rng.choice((1, 2)), rng.choice((0, 10, 20, 40, 42, 90, rng.randrange(256))))))
    elif choice == 2:
        forged = _record(CHANGE_CIPHER_SPEC, rng.choice((b"\x01", b"\x00", b"\x01\x01", b"")))
    elif choice == 3:
        other = rng.choice(seeds)
        forged = other[0] if other[0][:1] == bytes((HANDSHAKE,)) else _record(HANDSHAKE, b"\x01\x00\x00\x00")
    elif choice == 4:
        forged = _record(HANDSHAKE, rng.choice((b"\x18\x00\x00\x01\x00", b"\x18\x00\x00\x01\x01", b"\x00\x00\x00\x00")))
    else:
        forged = _record(rng.choice((HANDSHAKE, APPLICATION_DATA, ALERT)), b"")
    records.insert(rng.randint(0, len(records)), forged)
    return b"".join(records)


def _refragment(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """The plaintext handshake records cut into records of other sizes: still valid TLS, a path
    of the record layer the recorded flights never take."""
    records = list(seed)
    plain = [i for i, r in enumerate(records) if r[:1] == bytes((HANDSHAKE,)) and len(r) > TLS_RECORD.size]
    if not plain:
        return _record_cut(rng, seed, seeds)
    i = rng.choice(plain)
    _, version, _ = TLS_RECORD.unpack_from(records[i])
    body, pieces = records[i][TLS_RECORD.size:], []
    for size in chunk_sizes(rng, len(body)):
        pieces.append(_record(HANDSHAKE, body[:size], version))
        body = body[size:]
    records[i] = b"".join(pieces)
    return b"".join(records)


def _random_tls(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """Noise that opens like TLS: 0x16 and noise, a handshake record header and noise, a
    ClientHello header claiming a length, or noise after a real first record."""
    noise = rng.randbytes(int(2 ** rng.uniform(0, 11)))
    choice = rng.randrange(4)
    if choice == 0:
        return bytes((HANDSHAKE,)) + noise
    if choice == 1:
        return TLS_RECORD.pack(HANDSHAKE, rng.choice((0x0301, 0x0303)), rng.choice(TLS_LENGTHS + (len(noise),))) + noise
    if choice == 2:
        hello = b"\x01" + max(0, len(noise) + rng.randint(-2, 2)).to_bytes(3, "big") + noise
        return _record(HANDSHAKE, hello[:2**16 - 1], 0x0301)
    return seed[0] + noise


def _tls_chain(rng: random.Random, seed: Seed, seeds: list[Seed]) -> bytes:
    """Two or three of the others, one after the other."""
    data = _flat(seed)
    for _ in range(rng.randint(2, 3)):
        name = rng.choice([k for k in TLS_MUTATIONS if k != "tls_chain"])
        data = TLS_MUTATIONS[name](rng, tls_records(data) or (b"",), seeds) if data else data
    return data


TLS_MUTATIONS: dict[str, Callable[[random.Random, Seed, list[Seed]], bytes]] = {
    "bitflip": _bitflip, "byte_replace": _byte_replace, "insert": _insert, "delete": _delete,
    "truncate": _truncate, "splice": _splice, "record_length": _record_length, "record_type": _record_type,
    "record_drop": _record_drop, "record_replay": _record_replay, "record_swap": _record_swap,
    "record_foreign": _record_foreign, "record_cut": _record_cut, "record_inject": _record_inject,
    "refragment": _refragment, "random_tls": _random_tls, "tls_chain": _tls_chain,
}


# --- one case, through every reader --------------------------------------------------------------


# The share of cases of each mode. A TLS case costs ten times a `frames` one (a handshake
# is ~1 ms of public-key work), so fewer of them, and still tens of thousands in a full run.
MODES: dict[str, float] = {"frames": 0.85, "tls_listener": 0.05, "tls_dialer": 0.05, "tls_records": 0.05}


@dataclass
class Case:
    """One input and how it is delivered: the decoder's chunk sizes, the handshake side (in
    tls_records: the end that receives), whether our side holds the secret; the mode."""

    data: bytes
    chunks: list[int]
    side: Literal["listener", "dialer"]
    secret: bool
    kind: str = ""
    seed: int = 0
    index: int = 0
    mode: str = "frames"  # saved before the TLS modes: frames

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


def make_case(seed: int, index: int, seeds: list[Seed], modes: dict[str, float] = MODES) -> Case:
    """Case `index` of the run `seed`. A TLS case is only its mode, mutation and side here: its
    bytes come from sessions made when it runs (run_tls_case)."""
    rng = random.Random(f"{seed}:{index}")  # a case depends on nothing but its seed and index
    mode = rng.choices(list(modes), list(modes.values()))[0]
    side = rng.choice(("listener", "dialer"))
    if mode != "frames":
        side = {"tls_listener": "listener", "tls_dialer": "dialer"}.get(mode, side)
        return Case(b"", [], side, True, rng.choice(list(TLS_MUTATIONS)), seed, index, mode)
    kind = rng.choice(list(MUTATIONS))
    data = MUTATIONS[kind](rng, rng.choice(seeds), seeds)
    return Case(data, chunk_sizes(rng, len(data)), side, rng.random() < 0.5, kind, seed, index)


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


def check_greeting(message: Any) -> None:
    """The handshake's checks on a Hello or Welcome as it arrived: Refused, or nothing."""
    if not isinstance(message, wire.Hello):  # Welcome too
        return
    try:
        wire.version_refusal(message)
        for me in (ME, ME_WITH_SECRET):
            with contextlib.suppress(peers.Refused):
                peers._check_hello(me, message)
    except Exception as error:
        raise Finding("greetings", f"{type(error).__name__}: {error}") from error


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
        self.taken = 0  # how much of `sent` the other end has read (take)
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        for part in parts:
            self.sent += part

    def take(self) -> bytes:
        """What was written since the last take."""
        new, self.taken = bytes(self.sent[self.taken:]), len(self.sent)
        return new

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


PeerStep = bytes | Callable[[bytes], bytes]


class ScriptedReader:
    """The part of a StreamReader the handshake uses (read), playing the other end: each step is
    bytes, or a function of what we wrote since the step before (a live peer's answer), cut
    into the chunks `chunking` gives for its size; then the end of the stream, so no handshake
    has anything to wait for."""

    def __init__(self, steps: list[PeerStep], writer: HandshakeWriter,
                 chunking: Callable[[int], list[int]]) -> None:
        self._steps = collections.deque(steps)
        self._writer = writer
        self._chunking = chunking
        self._chunks: collections.deque[bytes] = collections.deque()
        self.fed = bytearray()  # what the handshake read, in the sizes it read it
        self.sizes: list[int] = []

    async def read(self, n: int = -1) -> bytes:
        while not self._chunks and self._steps:
            step = self._steps.popleft()
            data = step(self._writer.take()) if callable(step) else step
            at = 0
            for size in self._chunking(len(data)):
                self._chunks.append(data[at:at + size])
                at += size
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        if 0 < n < len(chunk):
            self._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self.fed += chunk
        self.sizes.append(len(chunk))
        return chunk


_loop: asyncio.AbstractEventLoop | None = None  # the handshakes', made on first use
# Every input ends with the end of its stream, so a handshake has nothing to wait for: one that
# runs into this limit hangs (the daemon's limit, peers.HANDSHAKE_TIMEOUT, is 5 s).
FUZZ_HANDSHAKE_TIMEOUT = 2.0
EXPECT = "node"  # the node the example greetings name: a dialer expects it half the time


def handshake_loop() -> asyncio.AbstractEventLoop:
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop


def close_handshake_loop() -> None:
    if _loop is not None:
        _loop.close()


def handshake_steps(side: str, reader: ScriptedReader, writer: HandshakeWriter, me: peers.Me,
                    expect: str | None) -> Any:
    if side == "listener":
        return peers._answer_steps(reader, writer, me)
    return peers._dial_steps(reader, writer, me, "peer", expect)


def run_handshake(steps: Any, writer: HandshakeWriter, target: str) -> tuple[peers.Channel | None, str]:
    """One side's steps under peers._handshake: (the channel, "") or (None, why it was refused)."""
    saved, peers.HANDSHAKE_TIMEOUT = peers.HANDSHAKE_TIMEOUT, FUZZ_HANDSHAKE_TIMEOUT
    try:
        return handshake_loop().run_until_complete(peers._handshake(steps, writer)), ""
    except peers.Refused as refused:
        if str(refused) == "handshake timed out":
            raise Finding(target, "hung until the handshake's time limit, its input ended") from None
        return None, str(refused)
    except Exception as error:
        raise Finding(target, f"{type(error).__name__}: {error}") from error
    finally:
        peers.HANDSHAKE_TIMEOUT = saved


TLS_TYPES = (CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA)


def check_sent(sent: bytes, tls: bool, target: str, allowed: tuple[type, ...]) -> None:
    """What our side wrote: whole TLS records of the types TLS 1.3 sends, or valid frames of
    the `allowed` types."""
    if tls:
        for record in tls_records(sent):
            if len(record) < TLS_RECORD.size or record[0] not in TLS_TYPES \
                    or len(record) != TLS_RECORD.size + TLS_RECORD.unpack_from(record)[2]:
                raise Finding(target, f"we sent a malformed TLS record {record[:8].hex()}")
        return
    messages, error = read_frames(sent, [len(sent)])
    if error is not None:
        raise Finding(target, f"we sent an invalid frame: {error}"[:300])
    if any(type(m) not in allowed for m in messages):
        raise Finding(target, f"we sent {[type(m).__name__ for m in messages]}")


def check_handshake(case: Case) -> str:
    """One side of the real handshake reading a `frames` case; 'accepted' or 'refused'."""
    writer = HandshakeWriter()
    reader = ScriptedReader([case.data], writer, lambda size: case.chunks)
    me = ME_WITH_SECRET if case.secret else ME
    expect = EXPECT if case.index % 2 else None
    channel, _ = run_handshake(handshake_steps(case.side, reader, writer, me, expect), writer, "handshake")
    # a dialer with the secret speaks TLS first; a listener with it, to TLS only
    tls = case.secret and (case.side == "dialer" or secure.looks_like_tls(case.data[:1]))
    check_sent(bytes(writer.sent), tls, "handshake", (wire.Hello, wire.Welcome, wire.Refuse))
    return "accepted" if channel is not None else "refused"


# --- TLS cases: the handshake with the secret, and sealed frames ---------------------------------

TLS_OVERHEAD = 17  # of an application record's body: its inner content type and AEAD tag (OpenSSL pads none)
LIVE_SHARE = 0.4  # of the handshake cases, those with a live other end (the rest replay recorded flights)
LARGE_PART = wire.Part(DIGEST, 0, 40_000, "", bytes(range(256)) * 156 + bytes(64))  # three TLS records


def new_session(side: str) -> secure.Session:
    tls = ME_WITH_SECRET.tls()
    return secure.Session(tls.server if side == "listener" else tls.client, server_side=side == "listener")


def sealed(session: secure.Session, messages: Iterable[Any]) -> bytes:
    """Messages sealed as Channel.write seals them: each buffer of a frame on its own."""
    return b"".join(b"".join(session.seal(wire.encode(m))) for m in messages)


def established_pair() -> tuple[secure.Session, secure.Session]:
    """A dialer's and a listener's session of one secret, through their handshake."""
    client, server = new_session("dialer"), new_session("listener")
    server.handshake(client.handshake(server.handshake(client.handshake())))
    if not (client.established and server.established):
        raise RuntimeError("two sessions of one secret did not complete their handshake")
    return client, server


@dataclass(frozen=True)
class Recording:
    """One real conversation between two sessions of our secret, as each end sent it."""

    client_hello: bytes  # the dialer's first flight
    server_flight: bytes  # the listener's: ServerHello to its Finished
    client_flight: bytes  # the dialer's second: its certificate, CertificateVerify, Finished
    sealed_hello: bytes  # the dialer's Hello, sealed
    sealed_welcome: bytes  # the listener's Welcome, sealed
    sealed_frames: bytes  # the dialer's frames of every seed message, sealed (records to splice)


@functools.lru_cache(maxsize=1)
def recordings() -> tuple[Recording, ...]:
    messages = seed_messages()
    made = []
    for _ in range(4):
        client, server = new_session("dialer"), new_session("listener")
        hello = client.handshake()
        server_flight = server.handshake(hello)
        client_flight = client.handshake(server_flight)
        server.handshake(client_flight)
        made.append(Recording(hello, server_flight, client_flight, sealed(client, [messages["hello"]]),
                              sealed(server, [messages["welcome"]]), sealed(client, messages.values())))
    return tuple(made)


@functools.lru_cache(maxsize=1)
def foreign_records() -> list[Seed]:
    """Recorded flights and sealed frames as records: splices and records of another session."""
    return [tls_records(getattr(r, f.name)) for r in recordings() for f in fields(Recording)]


@functools.lru_cache(maxsize=1)
def frame_seeds() -> list[Seed]:
    return list(seed_frames().values())


class LivePeer:
    """The other end of a live TLS case: a real session of our secret answering what the fuzzed
    side wrote, a flight at a time (1: the ClientHello, or the listener's flight; 2: the rest
    of the handshake and the sealed greeting). Flight `mutated` goes out mutated (0: none); a
    failure of its own (the fuzzed side refused it) ends its stream."""

    def __init__(self, side: str, greeting: bytes, mutate: Callable[[bytes], bytes], mutated: int) -> None:
        self.session = new_session(side)
        self.greeting, self.mutate, self.mutated = greeting, mutate, mutated
        self.flights = 0
        self.failed = False
        self.received = bytearray()  # the plaintext the fuzzed side sent

    def answer(self, data: bytes) -> bytes:
        if self.failed:
            return b""
        try:
            if self.session.established:
                self.received += self.session.receive(data)
                return b""
            out = self.session.handshake(data)
            if self.session.established:
                self.received += self.session.receive(b"")
                out += b"".join(self.session.seal([self.greeting]))
        except wire.ProtocolError:
            self.failed = True
            return b""
        self.flights += 1
        return self.mutate(out) if self.flights == self.mutated and out else out


def check_tls_handshake(case: Case, rng: random.Random) -> tuple[str, str]:
    """A listener (tls_listener) or dialer (tls_dialer) with the secret fed a mutated flight:
    recorded (a stranger replaying it), or a live peer's; (outcome, why refused)."""
    target, seeds = case.mode, foreign_records()
    fuzzed = "listener" if case.mode == "tls_listener" else "dialer"
    other = "dialer" if fuzzed == "listener" else "listener"
    genuine = seed_messages()["hello" if other == "dialer" else "welcome"]

    def mutate(data: bytes) -> bytes:
        return TLS_MUTATIONS[case.kind](rng, tls_records(data), seeds)

    writer, peer = HandshakeWriter(), None
    if rng.random() < LIVE_SHARE:
        variant = rng.choice(("first", "second", "plaintext"))
        greeting = frame_of(genuine)
        if variant == "plaintext":  # authenticated bytes from a holder of the secret, not a greeting
            greeting = MUTATIONS[rng.choice(list(MUTATIONS))](rng, rng.choice(frame_seeds()), frame_seeds())
        peer = LivePeer(other, greeting, mutate, {"first": 1, "second": 2}.get(variant, 0))
        steps: list[PeerStep] = [peer.answer, peer.answer]
    else:
        variant = "recorded"
        recording = rng.choice(recordings())
        whole = rng.random() < 0.25  # the rest of that conversation too
        if fuzzed == "listener":
            flight = recording.client_hello + (recording.client_flight + recording.sealed_hello if whole else b"")
        else:
            flight = recording.server_flight + (recording.sealed_welcome if whole else b"")
        steps = [mutate(flight)]
    reader = ScriptedReader(steps, writer, lambda size: chunk_sizes(rng, size))
    expect = EXPECT if rng.random() < 0.5 else None
    channel, why = run_handshake(handshake_steps(fuzzed, reader, writer, ME_WITH_SECRET, expect), writer, target)
    case.data, case.chunks = bytes(reader.fed), reader.sizes  # what it read, for a saved case
    # a listener answers a first byte other than TLS's with a plain Refuse
    tls = fuzzed == "dialer" or secure.looks_like_tls(case.data[:1])
    ours = wire.Welcome if fuzzed == "listener" else wire.Hello
    check_sent(bytes(writer.sent), tls, target, (wire.Refuse,))
    if peer is not None:
        peer.answer(writer.take())  # what the fuzzed side sealed after the peer's last flight
        if not peer.failed:
            check_sent(bytes(peer.received), False, target, (ours, wire.Refuse))
    if channel is not None:
        if peer is None:
            raise Finding(target, f"a recorded flight completed a handshake ({channel.peer})")
        try:
            extra = channel.unread()
        except wire.ProtocolError as error:
            extra = str(error).encode()
        if variant != "plaintext" and (channel.peer != genuine or extra):
            raise Finding(target, f"a changed flight gave a greeting other than the one sent: "
                                  f"{channel.peer} and {len(extra)} bytes more")
    return f"{variant} {'accepted' if channel is not None else 'refused'}", why


def common_prefix(a: bytes, b: bytes) -> int:
    """How many bytes `a` and `b` share from the start (by halving: slices compare at C speed)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def check_tls_records(case: Case, rng: random.Random) -> tuple[str, str]:
    """The frames of one to six messages sealed by one end of an established pair, mutated,
    fed to the other: what comes out is a prefix of what was sealed, nothing of a record at or
    after the first changed byte, and decodes to a prefix of the messages; (outcome, error)."""
    target = case.mode
    client, server = established_pair()
    sender, receiver = (client, server) if case.side == "listener" else (server, client)
    sent = rng.choices(list(seed_messages().values()) + [LARGE_PART], k=rng.randint(1, 6))
    plain = b"".join(frame_of(m) for m in sent)
    stream = b"".join(sender.seal([plain])) if rng.random() < 0.2 else sealed(sender, sent)
    records = tls_records(stream)
    carried = [len(r) - TLS_RECORD.size - TLS_OVERHEAD for r in records]
    if sum(carried) != len(plain):
        raise RuntimeError(f"{len(plain)} bytes sealed in records carrying {sum(carried)}: fix TLS_OVERHEAD")
    mutated = TLS_MUTATIONS[case.kind](rng, records, foreign_records())
    # the first changed byte; the plaintext of the records wholly before it may come out
    first_change = common_prefix(stream, mutated)
    allowed, end = 0, 0
    for record, size in zip(records, carried):
        end += len(record)
        if end > first_change:
            break
        allowed += size
    chunks = chunk_sizes(rng, len(mutated))
    case.data, case.chunks = mutated, chunks
    out, error, at = bytearray(), None, 0
    buffer = memoryview(bytearray(secure.RECORD))
    use_read_into = rng.random() < 0.5  # as a detached bulk connection reads
    try:
        for size in chunks:
            piece, at = mutated[at:at + size], at + size
            if use_read_into:
                receiver.feed(piece)
                while n := receiver.read_into(buffer):
                    out += buffer[:n]
            else:
                out += receiver.receive(piece)
    except wire.ProtocolError as protocol_error:
        error = protocol_error
    except Exception as other:
        raise Finding(target, f"{type(other).__name__}: {other}") from other
    if out != plain[:len(out)]:
        raise Finding(target, f"{len(out)} bytes of plaintext came out that were never sealed")
    if len(out) > allowed:
        raise Finding(target, f"a changed record gave plaintext: {len(out)} bytes, {allowed} before byte {first_change}")
    if mutated == stream and out != plain:
        raise Finding(target, f"the records as sealed gave {len(out)} of {len(plain)} bytes ({error})")
    if error is not None:
        try:
            receiver.seal([b"after the fault"])  # as Channel.send would, on a connection TLS gave up
        except wire.ProtocolError:
            pass
        except Exception as other:
            raise Finding(target, f"sealing after a fault: {type(other).__name__}: {other}") from other
    try:
        messages, _ = read_frames(bytes(out), chunk_sizes(rng, len(out)))
    except Exception as other:
        raise Finding(target, f"decoder: {type(other).__name__}: {other}") from other
    if messages != sent[:len(messages)]:
        raise Finding(target, "decoded messages that were not sent")
    outcome = "refused" if error else "whole" if out == plain else "ended" if receiver.ended else "cut short"
    return outcome, str(error or "")


def run_tls_case(case: Case) -> dict[str, Any]:
    rng = random.Random(f"{case.seed}:{case.index}:{case.mode}")  # the case's, again, for its bytes
    check = check_tls_records if case.mode == "tls_records" else check_tls_handshake
    outcome, why = check(case, rng)
    return {"outcome": outcome, "refusal": re.sub(r"\d+", "N", why.partition("(")[0])[:60] if why else None}


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
    if case.mode != "frames":
        return run_tls_case(case)
    messages, error = check_decoders(case)
    served = []
    for message in messages:
        check_round_trip(message)
        check_greeting(message)
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


def campaign(cases: int, seed: int, save: bool = True, quiet: bool = False,
             modes: dict[str, float] = MODES) -> dict[str, Any]:
    seeds = list(seed_frames().values())
    by_mode: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    by_kind = {mode: collections.Counter() for mode in modes}
    outcomes = {mode: collections.Counter() for mode in modes}
    refusals = {mode: collections.Counter() for mode in modes}
    handshakes: collections.Counter[str] = collections.Counter()
    serving: collections.Counter[str] = collections.Counter()
    findings: list[dict[str, Any]] = []
    signatures: set[str] = set()  # of the findings saved: one case of each
    peaks: list[tuple[int, int]] = []  # (peak, size) of the measured cases
    start = time.perf_counter()
    for index in range(cases):
        case = make_case(seed, index, seeds, modes)
        mode = case.mode
        by_mode[mode] += 1
        by_kind[mode][case.kind] += 1
        began = time.perf_counter()
        try:
            result = run_case(case, measure=index % ALLOC_EVERY == 0)
        except Finding as finding:
            outcomes[mode][f"finding ({finding.target})"] += 1
            signature = re.sub(r"[\d\s,()-]+", " ", str(finding))[:60]  # the same fault, other numbers
            where = None
            if save and signature not in signatures and len(signatures) < MAX_SAVED:
                signatures.add(signature)
                where = save_case(case, finding)
            cause = finding.__cause__  # an exception that escaped, as opposed to a broken check
            findings.append({"seed": seed, "index": index, "mode": mode, "kind": case.kind,
                             "exception": type(cause).__name__ if cause is not None else None,
                             "finding": str(finding)[:500], "saved": str(where) if where else None})
            if not quiet:
                print(f"FINDING seed {seed} index {index} ({mode}, {case.kind}): {finding}"[:400], flush=True)
            continue
        finally:
            seconds[mode] += time.perf_counter() - began
        outcomes[mode][result["outcome"]] += 1
        if result["refusal"]:
            refusals[mode][result["refusal"]] += 1
        if mode == "frames":
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
    per_mode = {mode: {"cases": by_mode[mode], "seconds": round(seconds[mode], 1),
                       "by_kind": dict(sorted(by_kind[mode].items())),
                       "by_outcome": dict(sorted(outcomes[mode].items())),
                       "distinct_refusals": len(refusals[mode]), "top_refusals": dict(refusals[mode].most_common(12))}
                for mode in modes if by_mode[mode]}
    per_mode.get("frames", {}).update({"handshake": dict(handshakes), "serving": dict(serving)})
    return {
        "cases": cases, "seed": seed, "seconds": round(elapsed, 1), "cases_per_s": round(cases / elapsed),
        "seeds": len(seeds), "tls_recordings": len(recordings()), "by_mode": dict(by_mode), "modes": per_mode,
        "findings_total": len(findings), "other_exceptions": sum(1 for f in findings if f["exception"]),
        "findings": findings,
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


def git_commit() -> str | None:
    """The checked-out commit, with "+changes" if the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", "--frames", type=int, default=1_000_000, help="cases of all modes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/fuzz_wire.json")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run saved cases again")
    parser.add_argument("--atheris", type=int, metavar="RUNS", help="a coverage-guided run of RUNS inputs")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results |= {"python": platform.python_version(), "machine": platform.machine(), "msgpack": msgpack.version,
                "openssl": ssl.OPENSSL_VERSION}
    run = {"command": " ".join(["python", *sys.argv]), "commit": git_commit()}  # what made these figures
    if args.atheris:
        figures = run_atheris(args.atheris, args.seed)
        results["atheris"] = run | figures
        print(f"atheris: {figures.get('executions')} inputs in {figures['seconds']} s "
              f"({figures['stats'].get('average_exec_per_sec')}/s once started), coverage {figures.get('coverage_edges')} "
              f"edges, {figures.get('features')} features, corpus {figures.get('corpus')}, crashed: {figures['crashed']}")
    else:
        figures = campaign(args.cases, args.seed)
        figures["allocation"]["probes"] = allocation_probes()
        figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        results["campaign"] = run | figures
        print(f"{figures['cases']} cases in {figures['seconds']} s ({figures['cases_per_s']}/s), seed {args.seed}")
        print(f"findings: {figures['findings_total']}, of them exceptions other than the protocol error: "
              f"{figures['other_exceptions']}")
        for mode, one in figures["modes"].items():
            print(f"{mode}: {one['cases']} cases in {one['seconds']} s; by outcome: {one['by_outcome']}")
            print(f"  {one['distinct_refusals']} distinct refusals; most often:", dict(list(one["top_refusals"].items())[:5]))
        frames = figures["modes"].get("frames", {})
        print("frames handshake:", frames.get("handshake"), "| serving reads:", frames.get("serving"))
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
