"""The wire protocol between tbmesh daemons: framing, message schema, handshake, tensors.

Pure protocol logic in the style of h11: no sockets, no asyncio, no clock. The daemon feeds
the bytes it receives into a `FrameDecoder` and writes what `encode` returns with
`transport.writelines(...)`. A peer is untrusted: anything it sends that breaks the rules
below raises `ProtocolError` (never another exception), and the connection is closed.

Frame layout (integers big-endian)::

    +---------------+----------------+-----------------------+---------------------------+
    | header length | payload length | header                | payload                   |
    | u32           | u32            | msgpack map, "t"=type | raw bytes, Tensor only    |
    +---------------+----------------+-----------------------+---------------------------+

The header is a map: "t" names the message type, the other keys are the message's fields
(nested dataclasses are maps, tuples are arrays, bytes are msgpack bin). Every field is
checked on decode: exact types (a bool is not an int), numbers finite and >= 0, strings and
bytes at most `MAX_TEXT`, lists at most `MAX_ITEMS`, no unknown fields (a schema change is a
`PROTOCOL_VERSION` change). Only `Tensor` carries a payload: its data as raw bytes in the
sender's byte order (little-endian on every Mac and Linux machine we run on).

Handshake, on every new connection (D dials, L listens): D -> L Hello, L -> D Welcome (or
Refuse), each naming its node, machine, cluster and the connection's purpose; with a cluster
secret both travel inside TLS 1.3 keyed from the secret, which proves the secret and
authenticates every later byte (tbmesh.net.secure; the steps in tbmesh.net.peers).
Frozen forever, so any two versions can tell each other why they disagree: the frame
prefix, the "t" and "version" keys of hello/welcome, and the refuse message.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgpack
import numpy as np

from tbmesh.core.messages import DatabaseSummary, Goodbye, Heartbeat, LinkStates
from tbmesh.core.types import Stage, omitted

# 2: batched serving (Tokens, Cancel.kind, the steps in Tensor.meta)
# 3: log-probabilities (Sampled.surprisal and .top, logprobs in the sampling of Tensor.meta)
# 4: weights over the cables (Hello.purpose "bulk", Fetch and Part carry weight objects;
#    LinkState.disk and .keep say what each disk holds and keeps)
# 5: TLS 1.3 keyed from the cluster secret replaces the HMAC proofs (no nonce, proof or Auth)
PROTOCOL_VERSION = 5

PREFIX = struct.Struct(">II")  # header length, payload length
MAX_HEADER = 1 << 20  # 1 MiB of msgpack: a link-state database of ~1000 Macs with a plan
MAX_PAYLOAD = 512 << 20  # one tensor; a 1x4096x8192 bfloat16 activation is 64 MiB
MAX_ITEMS = 4096  # any list: nodes, stages, neighbours, summary entries
MAX_TEXT = 64 << 10  # any str or bytes field
MAX_DIMS = 8  # tensor rank
MAX_META_DEPTH = 4  # nesting of Tensor.meta
MAX_PART = 64 << 20  # bytes of an object in one Part frame
MAX_FETCH = 1 << 40  # bytes one Fetch may ask for (answered in Parts of at most MAX_PART)
DIGEST_CHARS = 64  # sha256 in lower-case hex


# Tensor element types and their sizes. bfloat16 has no numpy dtype: it travels as raw bytes
# and becomes an MLX array through a uint16 view (see array_from_tensor).
DTYPES: dict[str, int] = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4,
}


class ProtocolError(Exception):
    """The peer broke the protocol; `str(error)` says how in one line. Close the connection."""


# --- transport-level messages ---------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The dialer's greeting: who it is, and what the connection is for."""

    version: int
    node: str
    incarnation: int
    name: str
    cluster: str
    machine: str
    purpose: Literal["peer", "probe", "bulk"]


@dataclass(frozen=True)
class Welcome(Hello):
    """The listener's answer to a Hello: its own greeting, for the same purpose."""


@dataclass(frozen=True)
class Refuse:
    """Why the sender is about to close the connection, for the other side's log."""

    reason: str


@dataclass(frozen=True)
class Tensor:
    """An array between pipeline stages. `data` holds shape-product * itemsize raw bytes.

    `meta` is free-form (str keys; None, bool, int, float, str, bytes, lists and maps inside);
    tuples in it come back as lists.
    """

    request: str
    step: int
    dtype: str
    shape: tuple[int, ...]
    data: memoryview | bytes = field(repr=False)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype]


@dataclass(frozen=True)
class Sampled:
    """Token `token`, step `step` of attempt `attempt`; with its surprisal (minus its
    log-probability: wire numbers are >= 0) and the likeliest tokens of the step (id, surprisal)
    when the attempt asked for them."""

    attempt: str
    step: int
    token: int
    surprisal: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Tokens:
    """What the last stage sampled in one step of lane `lane`, on its way to node `to`: the
    route's stage 0 (which feeds them back) or an entry (which streams its requests')."""

    to: str
    lane: str
    tokens: tuple[Sampled, ...]


@dataclass(frozen=True)
class Cancel:
    """An attempt is over, for node `to`. `end`: its entry ended it (to stage 0: keep its
    caches as a prefix-cache entry); `fail`: a stage could not run it (to its entry and
    stage 0: `reason` says why); `preempt`: stage 0 gave it up though its route is sound (it
    needed the KV room, or a link the attempt crossed broke): to its entry, start it again
    at once, it is no failure."""

    request: str
    to: str
    reason: str = ""
    kind: Literal["end", "fail", "preempt"] = "fail"


# --- bulk connections: weight objects (see tbmesh.weights.bulk) --------------------------------


@dataclass(frozen=True)
class Fetch:
    """Send bytes [offset, offset + length) of the object named `digest` (its sha256)."""

    digest: str
    offset: int
    length: int


@dataclass(frozen=True)
class Part:
    """Bytes [offset, offset + length) of object `digest`, as the payload (`data`), or why
    not (`error`, with no bytes). A Fetch is answered by Parts of at most MAX_PART bytes, in
    order; the sender writes the payload itself (os.sendfile) after `encode_head(part)`."""

    digest: str
    offset: int
    length: int
    error: str = ""
    data: memoryview | bytes = field(default=b"", repr=False)


WireMessage = (Hello | Welcome | Refuse | Heartbeat | LinkStates | DatabaseSummary | Goodbye
               | Tensor | Tokens | Cancel | Fetch | Part)

TAGS: dict[type, str] = {
    Hello: "hello", Welcome: "welcome", Refuse: "refuse",
    Heartbeat: "heartbeat", LinkStates: "link_states", DatabaseSummary: "db_summary",
    Goodbye: "goodbye", Tensor: "tensor", Tokens: "tokens", Cancel: "cancel",
    Fetch: "fetch", Part: "part",
}
# The one field of a message that travels as the frame's payload.
PAYLOAD_FIELD: dict[type, str] = {Tensor: "data", Part: "data"}


# --- handshake ---------------------------------------------------------------------------------


def version_refusal(greeting: Hello) -> str | None:
    """Why to refuse a Hello or Welcome for its protocol version, or None."""
    if greeting.version != PROTOCOL_VERSION:
        return f"refused: protocol version {greeting.version}, we speak {PROTOCOL_VERSION}"
    return None


# --- schema: dataclass <-> msgpack value, validated on the way in ----------------------------

Check = Callable[[Any], Any]  # wire value -> python value; raises _Bad


class _Bad(Exception):
    """A field's fault; containers add their part of the path as it propagates (so the
    path is only built for a bad field, not for every good one)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.path: list[str] = []  # innermost first

    def at(self, part: str) -> _Bad:
        self.path.append(part)
        return self

    def error(self, root: str) -> ProtocolError:
        return ProtocolError(f"{root}{''.join(reversed(self.path))}: {self.what}")


def _kind(value: Any) -> str:
    return type(value).__name__


def _check_int(value: Any) -> int:
    if type(value) is not int:  # not isinstance: True is not a count
        raise _Bad(f"expected an integer, got {_kind(value)}")
    if value < 0:
        raise _Bad(f"negative ({value})")
    return value


def _check_float(value: Any) -> float:
    if type(value) is int:  # another implementation may write 0 for 0.0
        value = float(value)
    elif type(value) is not float:
        raise _Bad(f"expected a number, got {_kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise _Bad(f"not a finite number >= 0 ({value})")
    return value


def _check_bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _Bad(f"expected a bool, got {_kind(value)}")
    return value


def _sized(kind: type) -> Check:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise _Bad(f"expected {kind.__name__}, got {_kind(value)}")
        if len(value) > MAX_TEXT:
            raise _Bad(f"{len(value)} long, at most {MAX_TEXT}")
        return value
    return check


_check_str = _sized(str)
_check_bytes = _sized(bytes)


def _check_list(value: Any) -> list:
    if type(value) is not list:
        raise _Bad(f"expected a list, got {_kind(value)}")
    if len(value) > MAX_ITEMS:
        raise _Bad(f"{len(value)} items, at most {MAX_ITEMS}")
    return value


def _check_map(value: Any) -> dict:
    if type(value) is not dict:
        raise _Bad(f"expected a map, got {_kind(value)}")
    return _check_plain(value)


def _check_plain(value: Any, depth: int = 0) -> Any:
    """Free-form data (Tensor.meta): msgpack scalars, lists and str-keyed maps, bounded."""
    kind = type(value)
    if value is None or kind is bool or kind is int:
        return value
    if kind is str or kind is bytes:
        return _sized(kind)(value)
    if kind is float:
        if not math.isfinite(value):
            raise _Bad(f"not a finite number ({value})")
        return value
    if kind is not list and kind is not dict:
        raise _Bad(f"unsupported {_kind(value)}")
    if depth >= MAX_META_DEPTH:
        raise _Bad(f"nested deeper than {MAX_META_DEPTH}")
    if len(value) > MAX_ITEMS:
        raise _Bad(f"{len(value)} items, at most {MAX_ITEMS}")
    if kind is list:
        for i, item in enumerate(value):
            try:
                _check_plain(item, depth + 1)
            except _Bad as bad:
                raise bad.at(f"[{i}]") from None
        return value
    for key, item in value.items():
        try:
            _check_str(key)
        except _Bad as bad:
            raise bad.at(" key") from None
        try:
            _check_plain(item, depth + 1)
        except _Bad as bad:
            # The key is the peer's text (up to MAX_TEXT): quoted and cut unless it reads as a
            # name, so the error stays one short line (it goes into logs and our Refuse).
            raise bad.at(f".{key}" if key.isidentifier() and len(key) <= 40 else f"[{key!r:.40}]") from None
    return value


def _checker(tp: Any) -> Check:
    """The validating converter for one type hint of the message dataclasses."""
    simple = {int: _check_int, float: _check_float, bool: _check_bool, str: _check_str,
              bytes: _check_bytes}
    if tp in simple:
        return simple[tp]
    origin, args = get_origin(tp), get_args(tp)
    if tp is dict or origin is dict:
        return _check_map
    if origin in (Union, UnionType) and len(args) == 2 and type(None) in args:
        inner = _checker(next(a for a in args if a is not type(None)))
        return lambda value: None if value is None else inner(value)
    if origin is Literal:
        def check_choice(value: Any) -> Any:
            if type(value) is not str or value not in args:
                raise _Bad(f"expected one of {list(args)}, got {value!r:.40}")
            return value
        return check_choice
    if origin is tuple:
        variadic = len(args) == 2 and args[1] is Ellipsis
        items = [_checker(a) for a in args[:1 if variadic else None]]

        def check_tuple(value: Any) -> tuple:
            _check_list(value)
            if not variadic and len(value) != len(items):
                raise _Bad(f"expected {len(items)} items, got {len(value)}")
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(items[0 if variadic else i](item))
                except _Bad as bad:
                    raise bad.at(f"[{i}]") from None
            return tuple(out)
        return check_tuple
    if is_dataclass(tp):
        return _dataclass_checker(tp)
    raise TypeError(f"no wire form for {tp!r}")


def _dataclass_checker(cls: type) -> Check:
    hints = get_type_hints(cls)
    skip = PAYLOAD_FIELD.get(cls)
    specs = [(f.name, _checker(hints[f.name]), f.default is MISSING and f.default_factory is MISSING)
             for f in fields(cls) if f.name != skip]
    names = {name for name, _, _ in specs}
    extra = _SEMANTIC.get(cls)

    def check(value: Any) -> Any:
        if type(value) is not dict:
            raise _Bad(f"expected a map, got {_kind(value)}")
        if not value.keys() <= names:
            unknown = sorted(map(str, value.keys() - names))[0]
            raise _Bad(f"unknown field {unknown!r:.40}")
        kwargs = {}
        for name, check_field, required in specs:
            if name in value:
                try:
                    kwargs[name] = check_field(value[name])
                except _Bad as bad:
                    raise bad.at(f".{name}") from None
            elif required:
                raise _Bad(f"missing field {name!r}")
        if skip:
            kwargs[skip] = b""  # the payload is attached once it has arrived
        obj = cls(**kwargs)
        if extra and (why := extra(obj)):
            raise _Bad(why)
        return obj
    return check


def _stage_rules(s: Stage) -> str | None:
    if s.start > s.end:
        return f"start {s.start} > end {s.end}"
    if s.group and (s.group[0] != s.node or len(set(s.group)) != len(s.group) or len(s.group) < 2):
        return "a group is two or more different nodes, the stage's node first"
    return None


def _tensor_rules(t: Tensor) -> str | None:
    if t.dtype not in DTYPES:
        return f"dtype {t.dtype!r:.40} is not one of {', '.join(DTYPES)}"
    if len(t.shape) > MAX_DIMS:
        return f"{len(t.shape)} dimensions, at most {MAX_DIMS}"
    return None


def _digest_rule(digest: str) -> str | None:
    if len(digest) != DIGEST_CHARS or digest.strip("0123456789abcdef"):
        return f"digest {digest[:80]!r} is not {DIGEST_CHARS} lower-case hex digits"
    return None


def _fetch_rules(f: Fetch) -> str | None:
    if f.length > MAX_FETCH:
        return f"fetch of {f.length} bytes, at most {MAX_FETCH}"
    return _digest_rule(f.digest)


def _part_rules(p: Part) -> str | None:
    if p.length > MAX_PART:
        return f"part of {p.length} bytes, at most {MAX_PART}"
    if p.error and p.length:
        return "a part with an error carries no bytes"
    return _digest_rule(p.digest)


# Rules across fields, beyond what the type hints say.
_SEMANTIC: dict[type, Callable[[Any], str | None]] = {
    Stage: _stage_rules,
    Tensor: _tensor_rules,
    Fetch: _fetch_rules,
    Part: _part_rules,
}

_DECODERS: dict[str, tuple[type, Check]] = {tag: (cls, _dataclass_checker(cls)) for cls, tag in TAGS.items()}


def _decode_header(header: bytes | memoryview, payload_len: int) -> Any:
    """The message a header describes; a Tensor gets `data=b""` until its payload arrives."""
    try:
        value = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises ValueError and its subclasses, maybe others
        raise ProtocolError(f"bad msgpack header ({type(error).__name__}: {error})".split("\n")[0]) from None
    if type(value) is not dict:
        raise ProtocolError(f"header is a {_kind(value)}, not a map")
    tag = value.pop("t", None)
    if type(tag) is not str:
        raise ProtocolError(f"header has no string type 't' (got {_kind(tag)})")
    if tag not in _DECODERS:
        raise ProtocolError(f"unknown message type {tag!r:.40}")
    cls, check = _DECODERS[tag]
    if payload_len and cls not in PAYLOAD_FIELD:
        raise ProtocolError(f"a {tag} frame carries no payload, got {payload_len} bytes")
    try:
        message = check(value)
    except _Bad as bad:
        version = value.get("version")
        if cls in (Hello, Welcome) and type(version) is int and version != PROTOCOL_VERSION:
            # Another version's greeting may not fit ours; its version is the real reason.
            raise ProtocolError(f"protocol version {version}, we speak {PROTOCOL_VERSION}") from None
        raise bad.error(tag) from None
    if cls is Tensor and message.nbytes != payload_len:
        raise ProtocolError(f"tensor {message.dtype}{list(message.shape)} needs {message.nbytes} "
                            f"bytes, the frame has {payload_len}")
    if cls is Part and message.length != payload_len:
        raise ProtocolError(f"part of {message.length} bytes, the frame has {payload_len}")
    return message


def parse_prefix(data: bytes | bytearray | memoryview, offset: int = 0, max_header: int = MAX_HEADER,
                 max_payload: int = MAX_PAYLOAD) -> tuple[int, int]:
    """(header length, payload length) of the frame prefix at `offset` of `data`, within limits."""
    header_len, payload_len = PREFIX.unpack_from(data, offset)
    if header_len > max_header:
        raise ProtocolError(f"header of {header_len} bytes announced, at most {max_header}")
    if payload_len > max_payload:
        raise ProtocolError(f"payload of {payload_len} bytes announced, at most {max_payload}")
    return header_len, payload_len


def parse_header(header: bytes | bytearray | memoryview, payload_len: int) -> Any:
    """The message of a frame's header, for a reader that takes the payload itself (a bulk
    connection receives a Part's bytes straight into the object): its payload field is empty."""
    return _decode_header(bytes(header), payload_len)


# --- encoding ---------------------------------------------------------------------------------


def _as_map(obj: Any) -> dict[str, Any]:
    """msgpack's fallback for nested dataclasses (tuples it packs as arrays by itself); a
    field marked OMIT_DEFAULT is left out while it holds its default, as in their JSON form
    (tbmesh.core.jsonform)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in fields(obj) if not omitted(obj, f)}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def encode(message: Any) -> list[bytes | memoryview]:
    """The frame for `message`, in pieces for `transport.writelines`: prefix + header, and for
    a Tensor its data as a flat memoryview of the caller's buffer (not copied here; keep the
    array unchanged until the transport has sent it). asyncio before Python 3.12 joins the
    pieces of `writelines` (one copy there); 3.12+ sends them with sendmsg, uncopied."""
    tag = TAGS.get(type(message))
    if tag is None:
        raise TypeError(f"not a wire message: {type(message).__name__}")
    skip = PAYLOAD_FIELD.get(type(message))
    if type(message) is Tensor:
        payload = _tensor_payload(message)
    elif type(message) is Part:
        payload = _part_payload(message)
    else:
        payload = memoryview(b"")
    head = _head(message, tag, skip, payload.nbytes)
    return [head, payload] if payload.nbytes else [head]


def encode_head(part: Part) -> bytes:
    """Prefix and header of `part`'s frame, for a sender that writes its `part.length` bytes
    of payload itself (os.sendfile); `part.data` is not looked at."""
    if why := _part_rules(part):
        raise ValueError(why)
    return _head(part, TAGS[Part], PAYLOAD_FIELD[Part], part.length)


def _head(message: Any, tag: str, skip: str | None, payload_len: int) -> bytes:
    header = {"t": tag} | {f.name: getattr(message, f.name) for f in fields(message)
                           if f.name != skip and not omitted(message, f)}
    packed = msgpack.packb(header, default=_as_map, use_bin_type=True)
    if len(packed) > MAX_HEADER:
        raise ValueError(f"{tag} header of {len(packed)} bytes exceeds {MAX_HEADER}")
    return PREFIX.pack(len(packed), payload_len) + packed


def _part_payload(p: Part) -> memoryview:
    if why := _part_rules(p):
        raise ValueError(why)
    view = memoryview(p.data).cast("B") if memoryview(p.data).nbytes else memoryview(b"")
    if view.nbytes != p.length:
        raise ValueError(f"part of {p.length} bytes, data has {view.nbytes}")
    return view


def _tensor_payload(t: Tensor) -> memoryview:
    if why := _tensor_rules(t):
        raise ValueError(why)
    view = memoryview(t.data)
    if view.nbytes != t.nbytes:
        raise ValueError(f"tensor {t.dtype}{list(t.shape)} needs {t.nbytes} bytes, data has {view.nbytes}")
    if view.nbytes > MAX_PAYLOAD:
        raise ValueError(f"tensor of {view.nbytes} bytes exceeds {MAX_PAYLOAD}")
    if not view.nbytes or (view.format == "B" and view.ndim == 1):
        return view
    return view.cast("B")  # a flat view of the same memory; needs C order (tensor_from_array)


# --- decoding ---------------------------------------------------------------------------------


class FrameDecoder:
    """Turns a byte stream into messages: `feed(data)`, then `next_message()` until None.

    Header bytes collect in one bytearray consumed by an offset (amortised linear, however the
    stream is chunked). A payload, once its header has been validated, goes into a bytearray
    that grows as its bytes arrive (never by what the header merely announces: a peer that
    claims 512 MiB and sends 50 bytes costs 50 bytes) and that the Tensor's `data` then views:
    the copy in `feed` (from the caller's `data` into that buffer) is the one copy this module
    makes of a tensor (growing it is a realloc, amortised: CPython over-allocates by 1/8, and
    the C library usually moves a large block by remapping its pages, not copying them).
    Payload bytes that arrive in the same chunk as their header are copied twice (into the
    header buffer, then into the payload buffer), at most one read's worth.

    After a ProtocolError the decoder is dead: `next_message` returns the messages decoded
    before the fault, then raises the error, as does every later `feed`.
    """

    def __init__(self, max_header: int = MAX_HEADER, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_header = max_header
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._lengths: tuple[int, int] | None = None  # the current frame's, once its prefix is in
        self._pending: Tensor | Part | None = None  # a decoded header waiting for its payload
        self._payload: bytearray | None = None  # its bytes so far, toward _payload_len
        self._payload_len = 0
        self._ready: deque[Any] = deque()
        self._error: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if self._payload is not None:
            view = view[self._fill(view):]
        if view.nbytes:
            self._buf += view
            try:
                self._parse()
            except ProtocolError as error:
                self._error = error
            self._compact()

    def feed_eof(self) -> None:
        """The peer closed the connection: an unfinished frame is a truncated one."""
        if self._error is None and (self._lengths is not None or self._payload is not None
                                    or self._pos < len(self._buf)):
            have = len(self._buf) - self._pos + len(self._payload or b"")
            self._error = ProtocolError(f"connection closed in the middle of a frame ({have} bytes of it)")

    def next_message(self) -> Any | None:
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def unread(self) -> bytes:
        """What was fed and not yet returned by `next_message`, as frames (messages decoded
        and waiting are encoded again), so that another reader can take the stream over."""
        if self._error is not None:
            raise self._error
        pieces = [b"".join(encode(message)) for message in self._ready]
        if self._pending is not None and self._payload is not None:
            cls = type(self._pending)
            pieces += [_head(self._pending, TAGS[cls], PAYLOAD_FIELD[cls], self._payload_len), bytes(self._payload)]
        if self._lengths is not None:
            pieces.append(PREFIX.pack(*self._lengths))
        pieces.append(bytes(self._buf[self._pos:]))
        return b"".join(pieces)

    def __iter__(self) -> Iterator[Any]:
        while (message := self.next_message()) is not None:
            yield message

    def _parse(self) -> None:
        buf = self._buf
        while self._payload is None:
            available = len(buf) - self._pos
            if self._lengths is None:
                if available < PREFIX.size:
                    return
                self._lengths = parse_prefix(buf, self._pos, self.max_header, self.max_payload)
                self._pos += PREFIX.size
                continue
            header_len, payload_len = self._lengths
            if available < header_len:
                return
            # A copy (small): a view into _buf would pin it (no resizing) as long as an
            # exception's traceback holds it.
            message = _decode_header(buf[self._pos:self._pos + header_len], payload_len)
            self._pos += header_len
            self._lengths = None
            if not payload_len:
                self._ready.append(message)
                continue
            self._pending, self._payload, self._payload_len = message, bytearray(), payload_len
            with memoryview(buf) as whole, whole[self._pos:] as rest:  # released at once
                self._pos += self._fill(rest)

    def _fill(self, view: memoryview) -> int:
        """Copy the start of `view` into the pending payload; return how many bytes it took."""
        assert self._payload is not None and self._pending is not None
        take = min(self._payload_len - len(self._payload), view.nbytes)
        self._payload += view[:take]
        if len(self._payload) == self._payload_len:
            # The pending Tensor is ours alone: attach the payload in place (as dataclasses'
            # own __init__ does for frozen classes) instead of building a copy with replace().
            object.__setattr__(self._pending, "data", memoryview(self._payload))
            self._ready.append(self._pending)
            self._pending = self._payload = None
        return take

    def _compact(self) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > len(self._buf) // 2:  # moving the smaller half keeps it linear
            del self._buf[:self._pos]
            self._pos = 0


def decode(frame: bytes | bytearray | memoryview) -> Any:
    """The one message in a complete frame (for tests and tools)."""
    decoder = FrameDecoder()
    decoder.feed(frame)
    decoder.feed_eof()
    messages = list(decoder)
    if len(messages) != 1:
        raise ProtocolError(f"expected one message, got {len(messages)}")
    return messages[0]


# --- tensors <-> arrays -------------------------------------------------------------------------


_NUMPY_NAMES = {np.dtype(name): name for name in DTYPES if name != "bfloat16"}  # native order


def tensor_from_array(array: Any, request: str = "", step: int = 0,
                      meta: dict[str, Any] | None = None) -> Tensor:
    """A Tensor viewing a numpy or MLX array's own memory (no copy when it is C-contiguous).

    An MLX array is evaluated (its lazy graph computed) by taking the view; a non-contiguous
    one (a transpose, a strided slice) is first copied into row-major order.
    """
    if isinstance(array, np.generic):  # a numpy scalar
        array = np.asarray(array)
    shape = tuple(int(d) for d in array.shape)
    if isinstance(array, np.ndarray):
        dtype = _NUMPY_NAMES.get(array.dtype)  # a dict lookup: dtype.name costs 2 us
        if dtype is None:
            dtype = array.dtype.name
            if dtype in DTYPES and not array.dtype.isnative:
                array = array.astype(array.dtype.newbyteorder("="))
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        view = memoryview(array)
    elif type(array).__module__.startswith("mlx"):
        import mlx.core as mx

        dtype = str(array.dtype).rpartition(".")[2]  # "mlx.core.bfloat16" -> "bfloat16"
        view = memoryview(array)
        if not view.c_contiguous:
            view = memoryview(mx.contiguous(array))
    else:
        raise TypeError(f"not a numpy or mlx array: {type(array).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot travel; use one of {', '.join(DTYPES)}")
    flat = view.cast("B") if view.nbytes else memoryview(b"")
    return Tensor(request, step, dtype, shape, flat, dict(meta or {}))


def array_from_tensor(t: Tensor, lib: Literal["mlx", "numpy"] = "mlx") -> Any:
    """The tensor as an array. numpy: a zero-copy view of `t.data` (no bfloat16 in numpy).
    mlx: one copy into MLX-owned memory (MLX cannot adopt a foreign buffer); bfloat16 goes
    through a uint16 view, then a same-size `view` to bfloat16, which copies nothing."""
    raw = t.dtype == "bfloat16"
    if raw and lib == "numpy":
        raise TypeError("numpy has no bfloat16; use lib='mlx' or np.frombuffer(t.data, np.uint16)")
    flat = np.frombuffer(t.data, dtype=np.uint16 if raw else np.dtype(t.dtype))
    if lib == "numpy":
        return flat.reshape(t.shape)
    import mlx.core as mx

    array = mx.array(flat.reshape(t.shape))
    return array.view(mx.bfloat16) if raw else array
