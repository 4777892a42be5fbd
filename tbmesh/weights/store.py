"""The content-addressed store of weight objects, and what this node can serve.

`Store` keeps objects (see manifest.py) as files named by their sha256, `root/ab/abcdef...`.
An object being received is a partial, `root/ab/abcdef....partial`, written at any offset
(two peers may fill two halves of one big tensor at once) and hashed as its bytes arrive in
order; `Partial.finish()` checks the digest and renames it to its name, so a named object is
always a verified one. Progress survives a cut cable (the Partial stays open) and a restart:
a partial holding only a prefix needs nothing else (its size says how far it got); one with
bytes past a gap keeps the list of ranges it holds in `....partial.ranges`, written before
the first such byte and then from time to time, never claiming a byte not yet written.

Objects are renamed into place without fsync (as downloads by mlx-lm's and Hugging Face's
tools are): the store trusts the kernel to keep what was written through a crash of the
daemon, not through a power cut.

`Local` answers, by digest, where this node can read an object from: a blob in the store, a
tensor still inside one of the model directory's original safetensors files (the object is
then a synthesized header followed by a range of that file), a small file a model needs
(manifest.MODEL_FILES; never any other file of the directory), or, when none holds it any
more, a tensor of a shard it holds in memory (tbmesh.weights.memory).

No MLX here except in `Local.lazy_weights`, and no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tbmesh.core.modelspec import ModelFormatError
from tbmesh.weights.manifest import (
    WEIGHT_NAME,
    FileEntry,
    Manifest,
    TensorEntry,
    canonical_header,
    is_digest,
    is_model_file,
)
from tbmesh.weights.modeldir import read_layout

READ_CHUNK = 16 << 20  # bytes per read when hashing what is already on disk
SAVE_EVERY = 64 << 20  # bytes written past a gap between two saves of a partial's ranges
PARTIAL, RANGES = ".partial", ".partial.ranges"

Entry = TypeVar("Entry", TensorEntry, FileEntry)


class CorruptObject(Exception):
    """Received bytes do not hash to the object's name (the partial was deleted)."""


class Store:
    """Objects by sha256 under `root` (created on first write). One writer per object at a
    time: the fetcher of one daemon."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise ValueError(f"not a sha256 hex digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def partial_size(self, digest: str) -> int:
        """How many bytes from the start of the object a partial holds (0 without one)."""
        ranges = _read_ranges(self._partial(digest))
        return ranges[0][1] if ranges and ranges[0][0] == 0 else 0

    def has_partial(self, digest: str) -> bool:
        return self._partial(digest).exists()

    def open(self, digest: str, size: int) -> Partial:
        """The partial of a `size`-byte object, created or resumed (see Partial)."""
        return Partial(self, digest, size)

    def append(self, digest: str, data: bytes | memoryview) -> None:
        """Write `data` at the end of the object's partial (a simple writer: see `open`)."""
        path = self._partial(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(data)

    def finish(self, digest: str) -> Path:
        """Check the partial's sha256 (reading it all) and give it its name; else delete it
        and raise CorruptObject."""
        path = self._partial(digest)
        digest_now = hashlib.sha256()
        with path.open("rb", buffering=0) as f:
            while chunk := f.read(READ_CHUNK):
                digest_now.update(chunk)
        return self._commit(digest, digest_now.hexdigest())

    def put(self, data: bytes | memoryview) -> str:
        """Store `data` as an object; returns its digest."""
        digest = hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f"{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, final)
        return digest

    def remove(self, digest: str) -> None:
        """Delete the object and any partial of it."""
        for path in (self.path(digest), self._partial(digest), self._ranges(digest)):
            path.unlink(missing_ok=True)

    def digests(self) -> set[str]:
        """The complete objects held."""
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.glob("??/*") if is_digest(p.name) and p.parent.name == p.name[:2]}

    def bytes_on_disk(self) -> int:
        """Bytes of every object and partial (what the store takes, bar the file system's blocks)."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.glob("??/*") if p.is_file())

    def _partial(self, digest: str) -> Path:
        return self.path(digest).with_name(digest + PARTIAL)

    def _ranges(self, digest: str) -> Path:
        return self.path(digest).with_name(digest + RANGES)

    def _commit(self, digest: str, actual: str) -> Path:
        partial = self._partial(digest)
        self._ranges(digest).unlink(missing_ok=True)
        if actual != digest:
            partial.unlink(missing_ok=True)
            raise CorruptObject(f"object {digest[:12]} arrived with sha256 {actual[:12]}: deleted")
        final = self.path(digest)
        os.replace(partial, final)
        return final


def _read_ranges(partial: Path) -> list[tuple[int, int]]:
    """The byte ranges a partial holds: its ranges file's, else [0, its size)."""
    ranges_file = partial.with_name(partial.name[:-len(PARTIAL)] + RANGES)
    try:
        size = partial.stat().st_size
    except FileNotFoundError:
        return []
    try:
        listed = json.loads(ranges_file.read_text())
    except FileNotFoundError:
        return [(0, size)] if size else []
    except (OSError, ValueError):
        return []  # unreadable: start again rather than trust a guess
    if not (isinstance(listed, list) and all(isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
                                             for r in listed)):
        return []
    return _merge([(a, min(b, size)) for a, b in listed if 0 <= a < min(b, size)])


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif start < end:
            merged.append((start, end))
    return merged


class Partial:
    """An object being received: write(offset, data) at any offset, finish() when complete.

    Its sha256 advances over the bytes held from the start: bytes written right at that point
    are hashed from the caller's buffer as they are written, bytes written past a gap are
    read back (from the page cache) once the gap is filled, and a resumed partial re-reads
    what it held before. Thread-safe: two peers' threads may write disjoint ranges at once.
    """

    def __init__(self, store: Store, digest: str, size: int) -> None:
        self.store, self.digest, self.size = store, digest, size
        self.path = store._partial(digest)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.done = _read_ranges(self.path)
        if self.done and self.done[-1][1] > size:  # not this object's partial: start again
            self.done = []
        if not self.done:
            self.store._ranges(digest).unlink(missing_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | (0 if self.done else os.O_TRUNC), 0o644)
        self._sha = hashlib.sha256()
        self._hashed = 0
        self._unsaved = 0  # bytes written past a gap since the ranges were last saved
        self._ranges_saved = self.store._ranges(digest).exists()
        with self._lock:
            self._advance(None, 0)  # re-hash what a resumed partial holds from its start

    @property
    def held(self) -> int:
        """Bytes held, whatever their place."""
        with self._lock:
            return sum(b - a for a, b in self.done)

    def missing(self) -> list[tuple[int, int]]:
        """The byte ranges still to receive, in order."""
        with self._lock:
            gaps, at = [], 0
            for start, end in self.done:
                if start > at:
                    gaps.append((at, start))
                at = end
            if at < self.size:
                gaps.append((at, self.size))
            return gaps

    @property
    def complete(self) -> bool:
        with self._lock:
            return self.done == [(0, self.size)] or self.size == 0

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Put `data` at `offset` (within the object); the bytes are held once this returns."""
        view = memoryview(data)
        if offset < 0 or offset + view.nbytes > self.size:
            raise ValueError(f"bytes [{offset}, {offset + view.nbytes}) are outside the object's {self.size}")
        with self._lock:
            if offset > self._prefix_end() and not self._ranges_saved:
                self._save()  # before the first byte past a gap: the file's size no longer says
        written = 0
        while written < view.nbytes:
            written += os.pwrite(self._fd, view[written:], offset + written)
        with self._lock:
            self.done = _merge([*self.done, (offset, offset + view.nbytes)])
            self._advance(view, offset)
            if self._ranges_saved:
                self._unsaved += view.nbytes
                if self._unsaved >= SAVE_EVERY:
                    self._save()

    def finish(self) -> Path:
        """Verify and name the complete object; CorruptObject (partial deleted) if it is not it."""
        with self._lock:
            if self.done != [(0, self.size)] and self.size:
                raise ValueError(f"object {self.digest[:12]} is incomplete: {self.done} of {self.size} bytes")
            self._close()
            return self.store._commit(self.digest, self._sha.hexdigest())

    def close(self) -> None:
        """Keep the partial for later (saving its ranges if it has gaps)."""
        with self._lock:
            if self._fd >= 0 and self._ranges_saved:
                self._save()
            self._close()

    def discard(self) -> None:
        with self._lock:
            self._close()
            self.store.remove(self.digest)

    def _prefix_end(self) -> int:
        return self.done[0][1] if self.done and self.done[0][0] == 0 else 0

    def _advance(self, view: memoryview | None, offset: int) -> None:
        """Hash from _hashed up to the end of the prefix held (lock held)."""
        end = self._prefix_end()
        if view is not None and offset <= self._hashed < offset + view.nbytes:
            take = min(end, offset + view.nbytes) - self._hashed
            self._sha.update(view[self._hashed - offset:self._hashed - offset + take])
            self._hashed += take
        while self._hashed < end:  # bytes that arrived past a gap, now joined to the prefix
            chunk = os.pread(self._fd, min(READ_CHUNK, end - self._hashed), self._hashed)
            if not chunk:
                raise CorruptObject(f"object {self.digest[:12]}: its partial is shorter than recorded")
            self._sha.update(chunk)
            self._hashed += len(chunk)

    def _save(self) -> None:
        ranges = self.store._ranges(self.digest)
        tmp = ranges.with_name(ranges.name + ".tmp")
        tmp.write_text(json.dumps([list(r) for r in self.done]))
        os.replace(tmp, ranges)
        self._ranges_saved, self._unsaved = True, 0

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- what this node holds ------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """How to produce an object's bytes: `prefix`, then `length` bytes of `path` from `offset`
    (or of `data`, bytes in memory, when there is no file)."""

    path: Path | None
    offset: int
    length: int
    prefix: bytes = b""
    data: memoryview | None = None

    @property
    def size(self) -> int:
        return len(self.prefix) + self.length


class HeldTensors(Protocol):
    """Tensors of the shards a node holds loaded, as objects (tbmesh.weights.memory.Memory)."""

    def has(self, entry: TensorEntry) -> bool: ...

    def source(self, entry: TensorEntry) -> Source | None: ...

    def array(self, entry: TensorEntry) -> Any | None: ...


class MissingWeights(LookupError):
    """Tensors a stage needs are neither in the model directory nor in the store."""


class Local:
    """The objects of `manifest` this node holds, by digest: blobs in `store`, tensors and
    files of the original model directory `model_dir` (which may hold only some of the
    weight files, or be None), and tensors `memory` holds. The manifest itself is put in the
    store, so peers can fetch it.

    A tensor of model_dir is taken for the manifest's when its name, dtype and shape match
    (hashing 600 GB at every start is what the manifest's digest cache avoids); a file when
    its name and size do. A peer verifies whatever it receives. Files of model_dir that
    vanish (deleted, a disk unmounted) are seen by `refresh`."""

    def __init__(self, manifest: Manifest, model_dir: Path | None, store: Store,
                 memory: HeldTensors | None = None) -> None:
        self.manifest = manifest
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.store = store
        self.memory = memory
        self.gone: frozenset[Path] = frozenset()  # files of model_dir missing at the last refresh
        self._by_name: dict[str, tuple[Path, str]] = {}  # tensor name -> (file, name in it)
        self._sources: dict[str, Source] = {}  # digest -> where model_dir holds it
        self._in_dir: dict[str, tuple[Path, str]] = {}  # digest -> (file, tensor name)
        self._tensors: dict[str, list[TensorEntry]] = {}  # digest -> the tensors it is
        self._withheld: dict[str, str] = {}  # digest -> a file the manifest lists that no model needs
        for t in manifest.tensors:
            self._tensors.setdefault(t.digest, []).append(t)
        if not store.has(manifest.digest):
            store.put(manifest.to_bytes())
        if self.model_dir is not None:
            self._scan(self.model_dir)

    def _scan(self, root: Path) -> None:
        tensors = {t.name: t for t in self.manifest.tensors}
        for file in sorted(root.glob("model*.safetensors")):
            if not WEIGHT_NAME.fullmatch(file.name):
                continue
            try:
                slots = read_layout(file)
            except ModelFormatError:
                continue  # a damaged file holds nothing we can serve
            for name, slot in slots.items():
                entry = tensors.get(name)
                if entry is None or (entry.dtype, entry.shape, entry.nbytes) != (slot.dtype, slot.shape,
                                                                               slot.end - slot.start):
                    continue
                self._by_name[name] = (file, name)
                self._in_dir.setdefault(entry.digest, (file, name))
                header = canonical_header(entry.dtype, entry.shape, entry.nbytes)
                self._sources.setdefault(entry.digest, Source(file, slot.start, entry.nbytes, header))
        for entry in self.manifest.files:
            path = root / entry.name
            if not is_model_file(entry.name):  # a manifest made before MODEL_FILES, or by hand
                self._withheld.setdefault(entry.digest, entry.name)
            elif path.is_file() and path.stat().st_size == entry.nbytes:
                self._sources.setdefault(entry.digest, Source(path, 0, entry.nbytes))

    def refresh(self) -> None:
        """Look again at which of model_dir's files are there (a stat of each)."""
        files = {s.path for s in self._sources.values()} | {f for f, _ in self._by_name.values()}
        self.gone = frozenset(f for f in files if not f.is_file())

    def locate(self, digest: str) -> Source | None:
        """Where to read the object `digest` from, or None when this node does not hold it:
        a file of model_dir (looked at now), the store, or memory."""
        source = self._sources.get(digest)
        if source is not None and source.path.is_file():
            return source
        if not is_digest(digest) or digest in self._withheld:  # not even a copy kept in the store
            return None
        size = self.store.size(digest)
        if size is not None:
            return Source(self.store.path(digest), 0, size)
        if self.memory is None:
            return None
        return next((s for t in self._tensors.get(digest, ()) if (s := self.memory.source(t)) is not None), None)

    def refusal(self, digest: str) -> str:
        """Why `locate` found nothing for `digest`: what a peer that asked is told."""
        name = self._withheld.get(digest)
        return "unknown object" if name is None else f"not served: {name[:60]!r} is not a file a model needs"

    def on_disk(self, digest: str) -> bool:
        """Whether our disk holds the object (model_dir's files as of the last refresh)."""
        source = self._sources.get(digest)
        if source is not None and source.path not in self.gone:
            return True
        return is_digest(digest) and self.store.has(digest)

    def has(self, digest: str) -> bool:
        """Whether we hold the object: on disk, or in memory."""
        if self.on_disk(digest):
            return True
        return self.memory is not None and any(self.memory.has(t) for t in self._tensors.get(digest, ()))

    def missing(self, entries: Iterable[Entry]) -> list[Entry]:
        """The entries this node does not hold, in their order."""
        return [e for e in entries if not self.has(e.digest)]

    def lazy_weights(self, entries: Sequence[TensorEntry]) -> dict[str, Any]:
        """{name: mx.array} of `entries`, lazily (nothing is read until evaluated): see
        `places` and `load_places`; a tensor in neither is the array memory holds (a held
        shard's: the load takes its layers from that shard anyway). Raises MissingWeights."""
        held = {e.name: a for e in entries if self._place(e) is None and not self.store.has(e.digest)
                and (a := self._held_array(e)) is not None}
        return load_places(self.places([e for e in entries if e.name not in held])) | held

    def places(self, entries: Sequence[TensorEntry]) -> dict[str, tuple[str, str]]:
        """Where each tensor of `entries` is: {name: (safetensors file, its name in the file)},
        in the original weight files of model_dir where they are, else the store's blobs (a
        one-tensor file whose tensor is named "tensor"). Raises MissingWeights."""
        found: dict[str, tuple[str, str]] = {}
        absent = []
        for entry in entries:
            place = self._place(entry)
            if place is not None:
                found[entry.name] = (str(place[0]), place[1])
            elif self.store.has(entry.digest):
                found[entry.name] = (str(self.store.path(entry.digest)), "tensor")
            else:
                absent.append(entry)
        if absent:
            raise MissingWeights(f"{len(absent)} tensors ({sum(e.nbytes for e in absent)} bytes) are neither in "
                                 f"{self.model_dir} nor in the store {self.store.root}, e.g. {absent[0].name}")
        return found

    def _place(self, entry: TensorEntry) -> tuple[Path, str] | None:
        """The tensor in a weight file of model_dir still there (as of the last refresh)."""
        places = (self._by_name.get(entry.name), self._in_dir.get(entry.digest))
        return next((p for p in places if p is not None and p[0] not in self.gone), None)

    def _held_array(self, entry: TensorEntry) -> Any | None:
        """An array memory holds with the bytes of this tensor (or of an identical one)."""
        if self.memory is None:
            return None
        return next((a for t in self._tensors.get(entry.digest, ()) if (a := self.memory.array(t)) is not None), None)


def load_places(places: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """{name: mx.array} of the tensors at `places` (Local.places), lazily. A weight file of the
    model brings every tensor in it (extra ones are harmless: the loader takes what it needs)."""
    import mlx.core as mx

    loaded: dict[str, dict[str, Any]] = {}
    weights: dict[str, Any] = {}
    for name, (file, key) in places.items():
        if file not in loaded:
            loaded[file] = mx.load(file, format="safetensors")
            if key != "tensor":
                weights.update(loaded[file])
        weights[name] = loaded[file][key]
    return weights
