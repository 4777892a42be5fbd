"""The model's tensors this node holds in memory, as weight objects peers can fetch: a Mac
whose model directory is deleted or whose disk is unmounted while it serves has the layers
it loaded on no disk, but still in memory.

An object is a tensor's canonical one-tensor safetensors file (manifest.py): its header,
then its bytes. A loaded shard holds a checkpoint's tensor as it was read unless mlx-lm's
sanitize changed it (renamed, stacked, cast, or dropped it, as a tied lm_head), so an array
stands for a manifest tensor only when its name, dtype and shape match and its bytes, after
the tensor's header, hash to the tensor's digest. Each array is hashed once (`check`,
blocking, the first time it is wanted) and the answer kept while it is held; the peer
verifies what it receives as it does an object read from disk.

No MLX here: arrays are read through the buffer protocol (bfloat16 too), without a copy.
Only evaluated arrays are handed over (a loaded shard's), so reading them from another
thread runs no MLX work.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tbmesh.weights.manifest import TensorEntry, canonical_header
from tbmesh.weights.store import Source

# MLX dtypes (the end of str(array.dtype)) as safetensors and the manifest name them
DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "uint32": "U32",
          "int32": "I32", "uint64": "U64", "int64": "I64", "float16": "F16", "bfloat16": "BF16",
          "float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class _Checked:
    array: Any  # the array hashed (the answer holds while the same one is held)
    data: memoryview | None  # its bytes when they hash to the tensor's digest, else None


class Memory:
    """The arrays of the shards this node holds, by their names in the checkpoint, and which
    of them are a manifest tensor's bytes. Thread-safe: shards change on the event loop,
    checks run in a thread of their own, peers' fetches read from their threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrays: dict[str, Any] = {}  # checkpoint name -> a held shard's array
        self._checked: dict[str, _Checked] = {}  # checkpoint name -> what hashing its array said

    def hold(self, arrays: Mapping[str, Any]) -> None:
        """The arrays held now, by checkpoint name (after a load or a drop): the answers
        about arrays no longer held go with them (and so do the references to them)."""
        with self._lock:
            self._arrays = dict(arrays)
            self._checked = {n: c for n, c in self._checked.items() if self._arrays.get(n) is c.array}

    def holds(self, entry: TensorEntry) -> bool:
        """Whether a held array may be this tensor (its name, dtype and shape), checked or not."""
        with self._lock:
            return self._candidate(entry) is not None

    def unchecked(self, entry: TensorEntry) -> bool:
        """Whether a held array may be this tensor and has not been hashed yet."""
        with self._lock:
            return self._candidate(entry) is not None and entry.name not in self._checked

    def has(self, entry: TensorEntry) -> bool:
        """Whether a held array was hashed and is this tensor's bytes."""
        with self._lock:
            return self._good(entry) is not None

    def check(self, entries: Iterable[TensorEntry]) -> tuple[int, int]:
        """Hash the held arrays of `entries` not hashed yet (blocking); (how many were
        hashed, how many of those are their tensor's bytes)."""
        hashed = good = 0
        for entry in entries:
            with self._lock:
                array = self._candidate(entry)
                if array is None or entry.name in self._checked:
                    continue
            data = _bytes(array)
            if data is not None:
                digest = hashlib.sha256(canonical_header(entry.dtype, entry.shape, entry.nbytes))
                digest.update(data)  # hashlib lets go of the GIL for large buffers
                if digest.hexdigest() != entry.digest:
                    data = None
            hashed, good = hashed + 1, good + (data is not None)
            with self._lock:
                if self._arrays.get(entry.name) is array:  # still held
                    self._checked[entry.name] = _Checked(array, data)
        return hashed, good

    def source(self, entry: TensorEntry) -> Source | None:
        """The object of a tensor whose bytes a held array was found to be, or None."""
        with self._lock:
            checked = self._good(entry)
        if checked is None:
            return None
        return Source(None, 0, entry.nbytes, canonical_header(entry.dtype, entry.shape, entry.nbytes),
                      checked.data)

    def array(self, entry: TensorEntry) -> Any | None:
        """The held array found to be this tensor's bytes (a load takes it as read from disk)."""
        with self._lock:
            checked = self._good(entry)
        return checked.array if checked is not None else None

    def _candidate(self, entry: TensorEntry) -> Any | None:
        array = self._arrays.get(entry.name)
        if array is None or tuple(array.shape) != entry.shape or array.nbytes != entry.nbytes:
            return None
        return array if DTYPES.get(str(array.dtype).rsplit(".", 1)[-1]) == entry.dtype else None

    def _good(self, entry: TensorEntry) -> _Checked | None:
        checked = self._checked.get(entry.name)
        if checked is None or checked.data is None or self._arrays.get(entry.name) is not checked.array:
            return None
        return checked


def _bytes(array: Any) -> memoryview | None:
    """An array's bytes in row-major order, without a copy; None when it is laid out
    otherwise (a transposed view: not the bytes of the file it came from)."""
    try:
        view = memoryview(array)
    except (TypeError, ValueError, BufferError):
        return None
    if not view.c_contiguous:
        return None
    return view.cast("B") if view.nbytes else memoryview(b"")
