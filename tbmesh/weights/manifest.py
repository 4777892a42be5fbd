"""What a model directory holds, by content: the manifest that lets Macs share weights.

A manifest lists the small files of a model directory (config, tokenizer, chat template) and
every tensor of its safetensors weights, each with the sha256 of its *object*:

- a file's object is the file;
- a tensor's object is its canonical single-tensor safetensors file: `canonical_header`
  (made only from dtype and shape, under the fixed key "tensor") followed by its data bytes.
  So a tensor's digest does not depend on which file of the checkpoint holds it or on its
  name, identical tensors are one object, and every object in the store is a file that
  `mx.load(path, format="safetensors")["tensor"]` reads.

The manifest itself is an object too (`Manifest.to_bytes()`, named by `Manifest.digest`): a
Mac that holds only part of a model gets it from a peer, which is why `Manifest.from_bytes`
treats its input as untrusted and raises nothing but `ManifestError`.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tbmesh.core.modelspec import ModelFormatError, stage_wants, tensor_part
from tbmesh.weights.modeldir import (
    INDEX_FILE,
    Slot,
    read_index,
    read_layout,
    weight_files,
)

FORMAT = "tbmesh-manifest/1"
# safetensors dtypes and their sizes in bytes (sub-byte types such as F4 are not listed: a
# model that uses them cannot be described here yet).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
WEIGHT_NAME = re.compile(r"model.*\.safetensors")  # what mlx-lm loads as weights
# The small files a model needs besides its weights: what mlx-lm reads to build the model and
# its tokenizer (transformers' AutoTokenizer, without remote code), and the chat template.
# Only these are listed in a manifest and served to peers: nothing else in a model directory
# (a README, notes, credentials.txt) ever leaves the Mac. The index is not one of them: its
# tensors are listed instead.
MODEL_FILES = (
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "tiktoken.model", "*.tiktoken", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")

# Bounds on a manifest from a peer. Kimi-K2's mlx checkpoints hold ~100k tensors (~15 MB of
# manifest); an unconverted DeepSeek-style checkpoint with one tensor per expert ~1M.
MAX_MANIFEST_BYTES = 256 << 20
MAX_ENTRIES = 2_000_000
MAX_NAME = 1024  # characters of a tensor or file name
MAX_DIMS = 8
MAX_FILE_BYTES = 1 << 30  # a "small file" (tokenizer.json is ~10 MB)
MAX_TENSOR_BYTES = 1 << 40
HASH_CHUNK = 16 << 20  # bytes read per hash update: few syscalls, one buffer reused


class ManifestError(ValueError):
    """A manifest (from a peer, or a model directory) is not valid; one line says why."""


class NotHashed(Exception):
    """A weight file the digest cache does not know as it is now: only hashing it says what it holds."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # as safetensors spells it: "F32", "BF16", "U32", ...
    shape: tuple[int, ...]
    nbytes: int  # data bytes (the object is canonical_header(...) + these)
    digest: str  # sha256 hex of the object
    layer: int | None  # model layer index (parsed from the name), None for the rest

    @property
    def object_size(self) -> int:
        return len(canonical_header(self.dtype, self.shape, self.nbytes)) + self.nbytes


@dataclass(frozen=True)
class FileEntry:
    name: str  # a plain file name in the model directory
    nbytes: int
    digest: str  # sha256 hex of the file

    @property
    def object_size(self) -> int:
        return self.nbytes


@dataclass(frozen=True)
class ObjectRef:
    """An object known only by digest and size (the manifest itself, before it is fetched)."""

    digest: str
    object_size: int


def layer_of(name: str) -> int | None:
    """The layer a tensor belongs to (core.modelspec.tensor_part), None for the ends."""
    part = tensor_part(name)
    return part if isinstance(part, int) else None


def canonical_header(dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """The bytes before the data in a tensor's object: safetensors' u64 little-endian header
    length, then compact JSON padded with spaces to a multiple of 8 (as safetensors writes)."""
    text = json.dumps({"tensor": {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}},
                      separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@dataclass(frozen=True)
class Manifest:
    name: str
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]

    def to_bytes(self) -> bytes:
        """Canonical JSON: files and tensors sorted by name, keys sorted, no spaces."""
        document = {
            "format": FORMAT,
            "name": self.name,
            "files": [[f.name, f.nbytes, f.digest] for f in sorted(self.files, key=lambda f: f.name)],
            "tensors": [[t.name, t.dtype, list(t.shape), t.nbytes, t.digest]
                        for t in sorted(self.tensors, key=lambda t: t.name)],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()  # ASCII: \u escapes

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """The manifest in `data` (untrusted): raises ManifestError, and nothing else, unless
        it is exactly what `to_bytes` makes of a valid manifest."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ManifestError(f"a manifest is bytes, not {type(data).__name__}")
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {len(data)} bytes, at most {MAX_MANIFEST_BYTES}")
        try:
            document = json.loads(bytes(data).decode())
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ManifestError(f"manifest is not JSON: {_one_line(error)}") from None
        manifest = _parse(document)
        if manifest.to_bytes() != data:
            raise ManifestError("manifest is not in canonical form (sorted, compact JSON)")
        return manifest

    def objects(self) -> dict[str, TensorEntry | FileEntry]:
        """Every object the manifest names, by digest (identical tensors: the first by name)."""
        found: dict[str, TensorEntry | FileEntry] = {}
        for entry in (*self.files, *self.tensors):
            found.setdefault(entry.digest, entry)
        return found

    def needed(self, start: int, end: int, num_layers: int) -> list[TensorEntry]:
        """The tensors a pipeline stage of layers [start, end) loads, in the order it reads
        them: the embedding (and anything else outside the layers) on the first stage, the
        final norm and head on the last (with tied embeddings, the embedding too: it is the
        head), then its layers in order. Layers past `num_layers` (DeepSeek's MTP layer) are
        never needed."""
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"layers [{start}, {end}) are not a range of {num_layers} layers")
        wanted = stage_wants([t.name for t in self.tensors], num_layers, start, end)
        chosen = [t for t in self.tensors if wanted(t.name)]
        return sorted(chosen, key=lambda t: (-1 if t.layer is None else t.layer, t.name))

    def stage_bytes(self, start: int, end: int, num_layers: int) -> int:
        return sum(t.nbytes for t in self.needed(start, end, num_layers))


# --- validation of a manifest from a peer ------------------------------------------------------


def _parse(document: Any) -> Manifest:
    if type(document) is not dict or set(document) != {"format", "name", "files", "tensors"}:
        raise ManifestError("manifest is not an object with format, name, files and tensors")
    if document["format"] != FORMAT:
        raise ManifestError(f"manifest format {str(document['format'])[:40]!r}, expected {FORMAT!r}")
    name = _text(document["name"], "name")
    files, tensors = document["files"], document["tensors"]
    if type(files) is not list or type(tensors) is not list:
        raise ManifestError("manifest files and tensors must be lists")
    if len(files) + len(tensors) > MAX_ENTRIES:
        raise ManifestError(f"manifest of {len(files) + len(tensors)} entries, at most {MAX_ENTRIES}")
    return Manifest(name, tuple(_file(f, i) for i, f in enumerate(files)),
                    tuple(_tensor(t, i) for i, t in enumerate(tensors)))


def _file(item: Any, i: int) -> FileEntry:
    if type(item) is not list or len(item) != 3:
        raise ManifestError(f"file {i} is not [name, nbytes, digest]")
    name = _text(item[0], f"file {i} name")
    if name in (".", "..") or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ManifestError(f"file {i} name {name[:60]!r} is not a plain file name")
    if WEIGHT_NAME.fullmatch(name) or name == INDEX_FILE:
        raise ManifestError(f"file {i} name {name[:60]!r} is a weight file: its tensors are listed instead")
    entry = FileEntry(name, _count(item[1], MAX_FILE_BYTES, f"file {i} nbytes"), _digest(item[2], f"file {i}"))
    if not is_model_file(name):
        raise ManifestError(f"file {i} name {name[:60]!r} is not a file a model needs (see MODEL_FILES)")
    return entry


def _tensor(item: Any, i: int) -> TensorEntry:
    if type(item) is not list or len(item) != 5:
        raise ManifestError(f"tensor {i} is not [name, dtype, shape, nbytes, digest]")
    name = _text(item[0], f"tensor {i} name")
    dtype, shape = item[1], item[2]
    if type(dtype) is not str or dtype not in DTYPE_SIZES:
        raise ManifestError(f"tensor {name[:60]!r}: dtype {str(dtype)[:20]!r} is not a safetensors dtype we know")
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise ManifestError(f"tensor {name[:60]!r}: shape is not a list of at most {MAX_DIMS} sizes")
    dims = tuple(_count(d, MAX_TENSOR_BYTES, f"tensor {name[:60]!r} shape") for d in shape)
    nbytes = _count(item[3], MAX_TENSOR_BYTES, f"tensor {name[:60]!r} nbytes")
    if math.prod(dims) * DTYPE_SIZES[dtype] != nbytes:
        raise ManifestError(f"tensor {name[:60]!r}: {dtype}{list(dims)} is not {nbytes} bytes")
    return TensorEntry(name, dtype, dims, nbytes, _digest(item[4], f"tensor {name[:60]!r}"), layer_of(name))


def _text(value: Any, what: str) -> str:
    if type(value) is not str or not 0 < len(value) <= MAX_NAME:
        raise ManifestError(f"manifest {what} is not a string of 1 to {MAX_NAME} characters")
    return value


def _count(value: Any, limit: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise ManifestError(f"{what} is not an integer in [0, {limit}]")
    return value


def _digest(value: Any, what: str) -> str:
    if not is_digest(value):
        raise ManifestError(f"{what}: digest is not 64 lower-case hex digits")
    return value


def is_model_file(name: str) -> bool:
    """Whether a file of a model directory is one a model needs (MODEL_FILES): only those are
    listed in a manifest and served to peers."""
    return "/" not in name and not name.startswith(".") and any(fnmatch.fnmatchcase(name, p) for p in MODEL_FILES)


def is_digest(value: Any) -> bool:
    return type(value) is str and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


# --- building a manifest from a model directory -----------------------------------------------


def build_part(model_dir: str | Path, cache: Path | None = None, name: str | None = None) -> Manifest:
    """The manifest of the part of a split model that `model_dir` holds: the tensors of the
    weight files its index lists that are here (a Mac that pulled only its stage's files).
    Parts of every Mac together make the whole manifest (`union`). Raises ManifestError
    without an index (then the directory cannot say what the whole is) or without weights."""
    root = Path(model_dir)
    weight_map = read_index(root)
    if weight_map is None:
        raise ManifestError(f"{root} has no {INDEX_FILE}: a part of a model is described by its index")
    held = [root / f for f in sorted(set(weight_map.values())) if (root / f).is_file()]
    if not held:
        raise ManifestError(f"{root} holds none of the weight files its index lists")
    return _describe(root, held, cache, name)


def union(parts: Sequence[Manifest], names: Iterable[str]) -> Manifest | None:
    """The whole manifest from the parts several Macs hold, once they hold every tensor of
    `names` (the index's); None until then. Raises ManifestError when two parts disagree
    about a tensor or a file (one of the copies is not the same model)."""
    tensors: dict[str, TensorEntry] = {}
    files: dict[str, FileEntry] = {}
    for part in parts:
        for t in part.tensors:
            if tensors.setdefault(t.name, t) != t:
                raise ManifestError(f"two Macs' copies of {part.name} differ in {t.name}")
        for f in part.files:
            if files.setdefault(f.name, f) != f:
                raise ManifestError(f"two Macs' copies of {part.name} differ in {f.name}")
    if not parts or set(names) - set(tensors):
        return None
    return Manifest(parts[0].name, tuple(files[n] for n in sorted(files)), tuple(tensors[n] for n in sorted(tensors)))


def build_manifest(model_dir: str | Path, cache: Path | None = None, name: str | None = None) -> Manifest:
    """The manifest of the model in `model_dir`, named after the directory unless `name`.

    Every tensor's object is hashed (the canonical header, then its data streamed from the
    file): minutes for a 600 GB model. With `cache` (a JSON file, e.g. in the state
    directory) the digests of each file are kept under its path and stat (_DigestCache), so a
    restart hashes only what changed. Needs all the weights: a Mac with part of a model gets the
    manifest from a peer. Raises ManifestError (one line) when the directory is incomplete
    or not a model.
    """
    root = Path(model_dir)
    try:
        weights = weight_files(root)
    except ModelFormatError as error:
        raise ManifestError(f"cannot build a manifest of {root}: {error} (building needs all the weights; "
                            f"a Mac holding part of a model gets its manifest from a peer)") from None
    _check_complete(root, weights)
    return _describe(root, weights, cache, name)


def describe_cached(model_dir: str | Path, cache: Path, name: str | None = None) -> Manifest | None:
    """What `model_dir` holds now, as build_manifest (or for part of a split model, build_part)
    describes it, without hashing a weight file: a stat and a header read of each, its
    digests from `cache`; the small files are hashed where the cache does not know them.
    None when a weight file changed since it was hashed, or is not in the cache. What is
    checked against a manifest kept from an earlier run before it is taken on trust."""
    root = Path(model_dir)
    try:
        weights = weight_files(root)
    except ModelFormatError:  # part of a split model (or none): the index's files that are here
        try:
            index = read_index(root) if root.is_dir() else None
        except ModelFormatError:
            return None
        weights = [root / f for f in sorted(set(index.values())) if (root / f).is_file()] if index else []
    try:
        return _describe(root, weights, cache, name, hash_weights=False)
    except (NotHashed, ManifestError, OSError):
        return None


def _describe(root: Path, weights: list[Path], cache: Path | None, name: str | None,
              hash_weights: bool = True) -> Manifest:
    """The manifest of the small files of `root` and the tensors of `weights`, hashed (without
    `hash_weights`, a weight file the cache does not know raises NotHashed)."""
    digests = _DigestCache(cache)
    files = []
    for path in sorted(p for p in root.iterdir() if _is_small_file(p)):
        digest = digests.get(path, lambda p: {"": _hash_ranges(p, b"", 0, p.stat().st_size)})[""]
        files.append(FileEntry(path.name, path.stat().st_size, digest))
    tensors: dict[str, TensorEntry] = {}
    for path in weights:
        try:
            slots = read_layout(path)
        except ModelFormatError as error:
            raise ManifestError(f"cannot build a manifest of {root}: {error}") from None
        for tensor, slot in slots.items():
            _check_slot(path, tensor, slot)
        found = digests.get(path, functools.partial(_hash_tensors, slots=slots) if hash_weights else _not_hashed)
        digests.save()  # after each weight file: an interrupted build keeps what it hashed
        for tensor, slot in slots.items():
            if tensor in tensors:
                raise ManifestError(f"cannot build a manifest of {root}: {tensor} is in two weight files")
            tensors[tensor] = TensorEntry(tensor, slot.dtype, slot.shape, slot.end - slot.start,
                                          found[tensor], layer_of(tensor))
    digests.save()
    return Manifest(name or root.name, tuple(files), tuple(tensors.values()))


def _is_small_file(path: Path) -> bool:
    """The files of a model directory a model needs besides its weights (MODEL_FILES: config,
    tokenizer, chat template; top level only)."""
    return is_model_file(path.name) and path.is_file()


def _check_complete(root: Path, weights: list[Path]) -> None:
    """Without an index, sharded weights name their count (model-00001-of-00005): all there?"""
    counts = {int(m.group(2)) for p in weights if (m := SHARD_NAME.fullmatch(p.name))}
    have = {int(m.group(1)) for p in weights if (m := SHARD_NAME.fullmatch(p.name))}
    for total in counts:
        missing = sorted(set(range(1, total + 1)) - have)
        if missing:
            raise ManifestError(f"cannot build a manifest of {root}: model-{missing[0]:05d}-of-{total:05d}"
                                f".safetensors is missing (building needs all the weights; a Mac holding "
                                f"part of a model gets its manifest from a peer)")


def _check_slot(path: Path, tensor: str, slot: Slot) -> None:
    size = DTYPE_SIZES.get(slot.dtype)
    if size is None:
        raise ManifestError(f"{path.name}: {tensor} has dtype {slot.dtype}, which tbmesh cannot share yet")
    if len(slot.shape) > MAX_DIMS or math.prod(slot.shape) * size != slot.end - slot.start:
        raise ManifestError(f"{path.name}: {tensor} is {slot.dtype}{list(slot.shape)} but holds "
                            f"{slot.end - slot.start} bytes")
    if len(tensor) > MAX_NAME:
        raise ManifestError(f"{path.name}: a tensor name longer than {MAX_NAME} characters")


def _not_hashed(path: Path) -> dict[str, str]:
    raise NotHashed(f"{path} changed since it was hashed")


def _hash_tensors(path: Path, slots: dict[str, Slot]) -> dict[str, str]:
    return {tensor: _hash_ranges(path, canonical_header(s.dtype, s.shape, s.end - s.start), s.start, s.end)
            for tensor, s in slots.items()}


def _hash_ranges(path: Path, prefix: bytes, start: int, end: int) -> str:
    """sha256 of `prefix` then bytes [start, end) of the file, read in HASH_CHUNK pieces."""
    digest = hashlib.sha256(prefix)
    buffer = bytearray(min(HASH_CHUNK, max(end - start, 1)))
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        f.seek(start)
        left = end - start
        while left:
            n = f.readinto(view[:min(left, len(buffer))])
            if not n:
                raise ManifestError(f"{path.name} is shorter than its header says")
            digest.update(view[:n])
            left -= n
    return digest.hexdigest()


class _DigestCache:
    """Digests of files already hashed, in a JSON file: {path: [size, mtime_ns, ctime_ns, inode,
    {key: digest}]}.

    A file whose size, mtime, ctime or inode changed is hashed again: a file replaced by
    another, even one copied with its size and mtime kept (cp -p, rsync -a), gets a new inode
    and ctime, which no one can set back. A cache that cannot be read is ignored (it only
    saves time); `save` writes it atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        self.dirty = False
        if path is not None:
            try:
                entries = json.loads(path.read_text())
                self.entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError):
                pass

    def get(self, file: Path, compute: Callable[[Path], dict[str, str]]) -> dict[str, str]:
        stat = file.stat()
        key = str(file.resolve())
        known = self.entries.get(key)
        seen = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        if (isinstance(known, list) and len(known) == 5 and known[:4] == seen
                and isinstance(known[4], dict) and all(is_digest(d) for d in known[4].values())):
            return known[4]
        digests = compute(file)
        self.entries[key] = [*seen, digests]
        self.dirty = True
        return digests

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries, sort_keys=True))
        os.replace(tmp, self.path)
