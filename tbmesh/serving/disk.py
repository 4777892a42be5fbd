"""The model's weights on this node's disk: what it can load, serve to its peers, and must
fetch from them first.

A node started with `--model DIR` holding the whole model describes it from DIR at once and
hashes its tensors into a manifest in a thread (tbmesh.weights.manifest; cached in the state
directory, so a restart hashes nothing); until then it loads from DIR but serves no peer.
A node whose DIR holds part of a split model (the files of its stage) hashes that part; the
parts of several Macs make the manifest once they cover every tensor of the index. A node
whose DIR lacks weights, or that was given only the model's name, takes the manifest from a
peer that publishes one under the same name, fetches the small files (config, tokenizer)
into its model directory, and from then on knows the model as well as any.

Layers a plan gives it that are not on its disk are fetched (the engine loads each run of
layers as it arrives) from the peers whose disks hold them, over bulk connections
(tbmesh.weights.bulk), into the content-addressed store in the state directory; the loader
reads them from there. What is on disk is published (DiskState): peers fetch from us, the
leader plans only when every layer is on some member's disk, and asks for copies
(tbmesh.core.replicas), which we fetch while no stage's fetch needs the cables; beyond
`slack`, what no stage or copy needs goes.

When our disk loses layers we hold loaded (the model directory deleted, a disk unmounted:
`refresh` looks every few seconds), their tensors are checked against the manifest in
memory (tbmesh.weights.memory) and published as `DiskState.memory`: peers fetch them from
our memory, the leader still plans, and a new stage of ours takes them from the held shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tbmesh.core.messages import ENDS, FIRST, LAST, DiskState, Fetching, KeepOnDisk
from tbmesh.core.modelspec import ModelFormatError, describe_model
from tbmesh.core.types import ModelSpec, ranges_of
from tbmesh.serving.host import Host
from tbmesh.serving.settings import DISK_RESERVE
from tbmesh.weights import bulk
from tbmesh.weights.manifest import (
    Manifest,
    ManifestError,
    ObjectRef,
    TensorEntry,
    build_manifest,
    build_part,
    describe_cached,
    union,
)
from tbmesh.weights.memory import Memory
from tbmesh.weights.modeldir import (
    describe_model_dir,
    read_config,
    read_index,
    weight_files,
)
from tbmesh.weights.store import Local, Store

log = logging.getLogger(__name__)


class Disk:
    def __init__(self, host: Host, name: str, model_dir: Path, state_dir: Path,
                 slack: int | None = None) -> None:
        self.host = host
        self.slack = slack  # bytes kept beyond our stage (copies for the cluster); None: as the disk allows
        self.name = name
        self.model_dir = model_dir
        self.store = Store(state_dir / "weights")
        self._pointer = state_dir / "weights" / f"{name}.manifest"  # the manifest's digest, across restarts
        self._digests = state_dir / "weights" / "digests.json"  # build_manifest's cache
        self.spec: ModelSpec | None = None
        self.whole = False  # model_dir holds every weight of the model
        self.manifest: Manifest | None = None
        self.local: Local | None = None
        self.fetching: Fetching | None = None
        self.part: Manifest | None = None  # without the manifest: that of the part we hold
        self._part_local: Local | None = None  # what we serve of that part meanwhile
        self._parts_of: dict[str, set[int | str]] = {}  # digest -> the layers (and ends) whose tensor it is
        self._end_tensors: dict[str, list[TensorEntry]] = {end: [] for end in ENDS}  # FIRST, LAST
        self._part_tensors: dict[int | str, list[TensorEntry]] = {}  # each layer's and end's tensors
        self.memory = Memory()  # the arrays of the shards we hold
        self._checking = False  # a check of held arrays runs in a thread
        self._check_lock = threading.Lock()
        self._seen: tuple[frozenset, frozenset] | None = None  # what refresh saw last
        self._manifest_bytes = 0
        self._files: set[str] = set()  # digests of the manifest's small files
        self._fetch_lock = threading.Lock()  # one fetch at a time writes the store's partials
        self._urgent = 0  # stage fetches waiting or running: a fetch of copies gives way
        self._urgent_lock = threading.Lock()

    # ----- what we hold --------------------------------------------------------------------

    def open(self) -> None:
        """Describe what is on disk now (at start: quick, no weight file is hashed). Raises
        ModelFormatError for a model directory that is there but broken."""
        if (self.model_dir / "config.json").is_file():
            try:
                weight_files(self.model_dir)
                self.whole = True
            except ModelFormatError:
                pass  # without its weights, or some of them: the rest come from peers
            if self.whole:
                self.spec = describe_model_dir(self.model_dir, self.name)
        try:
            digest = self._pointer.read_text().strip()
            kept = Manifest.from_bytes(self.store.path(digest).read_bytes())
        except (OSError, ValueError):
            return  # none yet (or its files are gone): hashed from our files, or taken from a peer
        if not self._describes_dir(kept):
            log.warning("the manifest of %s kept from an earlier run (%s) does not describe %s any more: "
                        "%s", self.name, kept.digest[:12], self.model_dir,
                        "hashing what changed" if self.whole else "taking it from a peer again")
            return
        try:
            self._adopt(kept)
        except (OSError, ValueError):  # its small files are gone: taken from a peer again
            self.manifest = self.local = None

    def _describes_dir(self, manifest: Manifest) -> bool:
        """Whether `manifest` (kept from an earlier run) is what model_dir holds now: the whole
        model exactly, or of a part (or of the small files alone) every file and tensor. Weight
        files are not hashed again (describe_cached: their size, times and inode must be as
        when they were hashed); one that changed makes it false, and build() hashes it."""
        if not self.model_dir.is_dir():
            return True  # nothing here to disagree (the small files come from peers again)
        here = describe_cached(self.model_dir, self._digests, self.name)
        if here is None:
            return False
        if self.whole:
            return here.digest == manifest.digest
        return set(here.files) <= set(manifest.files) and set(here.tensors) <= set(manifest.tensors)

    def serving(self) -> Local | None:
        """What we can serve to peers: the model, or until we know it whole, our part of it."""
        return self.local or self._part_local

    @property
    def ready(self) -> bool:
        """Whether the model's small files (config, tokenizer) are here."""
        return self.spec is not None

    def state(self) -> DiskState:
        manifest, spec = self.manifest, self.spec
        if manifest is None or self.local is None:
            whole = self.whole and spec is not None
            part = self.part.digest if self.part is not None else ""
            return DiskState(self.name, spec=spec, layers=((0, spec.num_layers),) if whole else (),
                             ends=ENDS if whole else (), bytes=spec.weight_bytes if whole else 0, fetching=self.fetching,
                             part=part, part_bytes=len(self.part.to_bytes()) if self.part is not None else 0)
        present, on_disk = self._on_disk()
        memory, unchecked = self._in_memory(on_disk)
        if unchecked and not self._checking:  # published once checked
            self._checking = True
            threading.Thread(target=self._check, args=(unchecked, True), name="check-memory", daemon=True).start()
        held = sum(t.nbytes for t in manifest.tensors if t.digest in present)
        return DiskState(self.name, manifest.digest, spec, _layers(on_disk), _ends(on_disk), held, self.fetching,
                         manifest_bytes=self._manifest_bytes, free=self._free(present),
                         memory=_layers(memory), memory_ends=_ends(memory))

    def _on_disk(self) -> tuple[set[str], set[int | str]]:
        """The digests of the tensors on our disk, and the layers and ends all of whose are."""
        assert self.manifest is not None and self.local is not None
        present = {t.digest for t in self.manifest.tensors if self.local.on_disk(t.digest)}
        return present, {p for p, tensors in self._part_tensors.items() if all(t.digest in present for t in tensors)}

    def _in_memory(self, on_disk: set[int | str]) -> tuple[set[int | str], list[TensorEntry]]:
        """The layers and ends not on our disk whose every tensor peers may fetch from the
        shards we hold, and the tensors of others we hold that are not checked yet."""
        found, unchecked = set(), []
        for part, tensors in self._part_tensors.items():
            if part in on_disk or not all(self.memory.holds(t) for t in tensors):
                continue
            todo = [t for t in tensors if self.memory.unchecked(t)]
            if todo:
                unchecked += todo
            elif all(self.memory.has(t) for t in tensors):
                found.add(part)
        return found, unchecked

    def _check(self, entries: list[TensorEntry], publish: bool = False) -> None:
        """Hash held arrays our disk lacks (blocking). `publish` (in the thread state() starts):
        then publish what peers may fetch."""
        began = time.monotonic()
        try:
            with self._check_lock:  # a second check waits, then finds them checked
                hashed, good = self.memory.check(entries)
        finally:
            if publish:
                self._checking = False
        if hashed:
            log.info("checked %d tensors (%.1f MB) held in memory that our disk lacks in %.2f s: peers may "
                     "fetch %d of them from memory", hashed, sum(t.nbytes for t in entries) / 1e6,
                     time.monotonic() - began, good)
        if publish:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self.host.loop.call_soon_threadsafe(lambda: self.host.disk_changed(self.state()))

    def hold(self, shards: Iterable[Any]) -> None:
        """The shards we hold now (after a load or a drop, on the loop): what of them our disk
        lacks, peers may fetch from memory once it is checked. Publishes our disk state."""
        arrays: dict[str, Any] = {}
        for shard in shards:
            if hasattr(shard, "checkpoint_arrays"):  # a group's share is in its worker's process
                arrays.update(shard.checkpoint_arrays())
        self.memory.hold(arrays)
        self.host.disk_changed(self.state())

    def refresh(self) -> bool:
        """Look at our disk again (blocking: a stat of each of the model directory's files, a
        listing of the store, and a hash of what we hold in memory of the layers it lost):
        whether what it holds, or what we may serve from memory, changed since the last look.
        Checking here, before the state is published, means no layer we hold seems lost."""
        if self.local is None or self.manifest is None:
            return False
        self._look()
        seen = (self.local.gone, frozenset(self.store.digests()))
        changed, self._seen = seen != self._seen, seen
        if changed:
            self._check(self._in_memory(self._on_disk()[1])[1])
        return changed

    def _look(self) -> None:
        assert self.local is not None
        self.local.refresh()
        if self.local.gone:
            self.whole = False  # the model directory no longer holds every weight

    def _free(self, present: set[str]) -> int:
        """Bytes we may still keep beyond our stage: the slack left, within the disk's room."""
        if self.whole or self.manifest is None or self.spec is None:
            return 0  # the whole model is here already
        try:
            usage = shutil.disk_usage(self.store.root if self.store.root.exists() else self.model_dir.parent)
        except OSError:
            return 0
        room = int(usage.free - DISK_RESERVE * usage.total)
        if self.slack is not None:
            plan, me = self.host.view().plan, self.host.me
            stage = next((s for s in plan.stages if s.node == me), None) if plan is not None else None
            mine = {t.digest for t in self.manifest.needed(stage.start, stage.end, self.spec.num_layers)} \
                if stage is not None else set()
            beyond = sum(t.nbytes for t in self.manifest.tensors if t.digest in present and t.digest not in mine)
            room = min(room, self.slack - beyond)
        return max(0, room)

    def missing(self, start: int, end: int) -> list[TensorEntry] | None:
        """The tensors layers [start, end) need that are neither on our disk nor in a shard we
        hold (checked); None while we lack the manifest that says what they are."""
        if self.local is not None:
            self._look()  # a file gone since the last look: fetched, or taken from memory
        if self.whole:
            return []
        if self.manifest is None or self.local is None or self.spec is None:
            return None
        wanted = self.manifest.needed(start, end, self.spec.num_layers)
        return _unique(self.local.missing(wanted))

    def tensors(self, start: int, end: int) -> Callable[[], dict[str, Any]] | None:
        """What load_shard reads layers [start, end) from, when not model_dir's files alone."""
        if self.whole or self.manifest is None or self.local is None or self.spec is None:
            return None
        wanted, local = self.manifest.needed(start, end, self.spec.num_layers), self.local
        return lambda: local.lazy_weights(wanted)  # read in the load: MissingWeights fails it

    def places(self, start: int, end: int) -> dict[str, tuple[str, str]] | None:
        """Where the tensors of layers [start, end) are (Local.places), when not all in
        model_dir's files (a tensor group's workers read them there). Raises MissingWeights."""
        if self.whole or self.manifest is None or self.local is None or self.spec is None:
            return None
        return self.local.places(self.manifest.needed(start, end, self.spec.num_layers))

    # ----- getting what we lack ------------------------------------------------------------

    def build(self) -> None:
        """Hash our whole model into its manifest, or the part of it we hold into the
        manifest of that part (blocking: minutes for 600 GB, in a thread)."""
        if self.manifest is not None:
            return
        if self.whole:
            manifest = build_manifest(self.model_dir, self._digests, self.name)
            self.store.put(manifest.to_bytes())
            self._adopt(manifest)
            log.info("hashed %s: %d tensors, manifest %s", self.name, len(manifest.tensors), manifest.digest[:12])
        elif read_index(self.model_dir) is not None and any(self.model_dir.glob("model*.safetensors")):
            part = build_part(self.model_dir, self._digests, self.name)
            self.store.put(part.to_bytes())
            self.part, self._part_local = part, Local(part, self.model_dir, self.store)
            log.info("hashed the part of %s here: %d tensors", self.name, len(part.tensors))

    def assemble(self, peers: list[bulk.Peer], parts: dict[str, int]) -> bool:
        """Make the whole manifest from the parts peers hold (`parts`: digest -> size) and
        ours, and adopt it when they hold every tensor the index names (blocking)."""
        index = read_index(self.model_dir)
        if self.part is None or index is None:
            return False
        wanted = [ObjectRef(d, n) for d, n in parts.items() if not self.store.has(d)]
        if wanted:
            self._locked(lambda: bulk.fetch(wanted, peers, self.store))
        found = [self.part] + [Manifest.from_bytes(self.store.path(d).read_bytes()) for d in sorted(parts)]
        whole = union(found, index)
        if whole is None:
            return False
        self.store.put(whole.to_bytes())
        self._adopt(whole)
        log.info("made the manifest of %s from %d Macs' parts: %d tensors, manifest %s", self.name,
                 len(found), len(whole.tensors), whole.digest[:12])
        return True

    def peers(self) -> list[bulk.Peer]:
        """The peers whose disks hold some of the model, fastest link first (on the loop)."""
        view = self.host.view()
        bandwidth = {frozenset((link.a, link.b)): link.bytes_per_s for link in view.links}
        found = []
        for node, disk in sorted(view.disks.items()):
            if node == view.me or disk.model != self.name or not (disk.manifest or disk.part):
                continue
            if self.manifest is not None and disk.manifest != self.manifest.digest:
                continue  # another version of the model under the same name
            found.append(bulk.Peer(node, view.name(node), _connector(self.host, node),
                                   bandwidth.get(frozenset((view.me, node)), 0.0), self._has(disk)))
        return sorted(found, key=lambda p: -p.bandwidth)

    def take_manifest(self, peers: list[bulk.Peer], digest: str, nbytes: int) -> None:
        """Fetch the manifest `digest` and the small files it lists from `peers`, and adopt
        it (blocking, in a thread)."""
        self._locked(lambda: bulk.fetch([ObjectRef(digest, nbytes)], peers, self.store))
        manifest = Manifest.from_bytes(self.store.path(digest).read_bytes())
        if manifest.digest != digest:
            raise ManifestError(f"the manifest fetched as {digest[:12]} is {manifest.digest[:12]}")
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self._files = {f.digest for f in manifest.files}  # peers that hold the manifest hold these
        wanted = [f for f in manifest.files if not (self.model_dir / f.name).is_file()]
        holders = [p for p in peers if p.has(digest)]  # not a peer with another model under the name
        self._locked(lambda: bulk.fetch(wanted, holders, self.store))
        for f in wanted:  # a copy, not a link: the store may let its objects go
            target = self.model_dir / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.store.path(f.digest), target)
        self._adopt(manifest)

    def fetch(self, entries: list[TensorEntry], peers: list[bulk.Peer],
              on_progress: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None,
              copies: bool = False) -> bulk.FetchReport:
        """Fetch `entries` into the store (blocking, in a thread); `on_progress(bytes so far)`.
        A fetch of `copies` (layers kept for the cluster) stops as soon as a stage's fetch
        waits: a plan is waiting for that one."""
        stop = should_stop or (lambda: False)
        if copies:
            return self._locked(lambda: bulk.fetch(entries, peers, self.store, on_progress,
                                                   lambda: stop() or self._urgent > 0))
        with self._urgent_lock:
            self._urgent += 1
        try:
            return self._locked(lambda: bulk.fetch(entries, peers, self.store, on_progress, stop))
        finally:
            with self._urgent_lock:
                self._urgent -= 1

    def _locked(self, run: Callable[[], bulk.FetchReport]) -> bulk.FetchReport:
        with self._fetch_lock:
            return run()

    def trim(self, stages: list[tuple[int, int]], keep: KeepOnDisk | None) -> int:
        """Let go of the tensors in our store that no stage of ours (running or being prepared)
        and no copy the leader asks for needs, while we hold more than --disk-slack beyond
        them; returns the bytes freed. Without a slack the disk's room is the limit, and
        nothing goes (a copy kept is a layer some Mac may fetch later)."""
        if self.slack is None or self.manifest is None or self.spec is None or self.whole:
            return 0
        wanted = {t.digest for a, b in stages for t in self.manifest.needed(a, b, self.spec.num_layers)}
        if keep is not None:
            wanted |= {t.digest for t in self.kept(keep)}
        spare = [(t.digest, t.object_size) for t in _unique(list(self.manifest.tensors))
                 if t.digest not in wanted and self.store.has(t.digest)]
        excess = sum(size for _, size in spare) - self.slack
        freed = 0
        for digest, size in sorted(spare, key=lambda x: -x[1]):
            if freed >= excess:
                break
            self.store.remove(digest)
            freed += size
        return freed

    def kept(self, keep: KeepOnDisk) -> list[TensorEntry]:
        """The tensors of the copies the leader asks us to keep."""
        assert self.manifest is not None
        ends = [t for end in keep.ends for t in self._end_tensors[end]]
        return ends + [t for t in self.manifest.tensors
                       if t.layer is not None and any(a <= t.layer < b for a, b in keep.layers)]

    def kept_missing(self, keep: KeepOnDisk) -> list[TensorEntry]:
        """The tensors of the copies the leader asks us to keep that our disk lacks."""
        if self.manifest is None or self.local is None or self.whole:
            return []
        local = self.local
        return _unique([t for t in self.kept(keep) if not local.on_disk(t.digest)])

    def _adopt(self, manifest: Manifest) -> None:
        self.manifest, self._manifest_bytes = manifest, len(manifest.to_bytes())
        self.local = Local(manifest, self.model_dir if self.model_dir.is_dir() else None, self.store, self.memory)
        self._files = {f.digest for f in manifest.files}
        if self.spec is None:
            config = read_config(self.model_dir)
            self.spec = describe_model(self.name, config, {t.name: (t.dtype, list(t.shape)) for t in manifest.tensors})
        n = self.spec.num_layers
        ends = {FIRST: [t for t in manifest.needed(0, 1, n) if t.layer is None],
                LAST: [t for t in manifest.needed(n - 1, n, n) if t.layer is None]}
        parts_of: dict[str, set[int | str]] = {}
        for t in manifest.tensors:
            if t.layer is not None:
                parts_of.setdefault(t.digest, set()).add(t.layer)
        for end, tensors in ends.items():
            for t in tensors:
                parts_of.setdefault(t.digest, set()).add(end)
        self._end_tensors, self._parts_of = ends, parts_of
        self._part_tensors = {i: [] for i in range(n)} | ends
        for t in manifest.tensors:
            if t.layer is not None and t.layer < n:
                self._part_tensors[t.layer].append(t)
        self._pointer.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._pointer.with_suffix(".tmp")
        tmp.write_text(manifest.digest)
        os.replace(tmp, self._pointer)

    def _has(self, disk: DiskState) -> Callable[[str], bool]:
        """Whether a peer with this disk holds an object: its manifest and the small files it
        lists (every holder of a manifest has them), and the tensors of the layers it serves
        (from its disk or its memory)."""
        def has(digest: str) -> bool:  # asked from the fetch's threads, as our manifest arrives
            if digest in (disk.manifest, disk.part) or digest in self._files:
                return True
            return any(disk.serves_end(part) if isinstance(part, str) else disk.serves(part, part + 1)
                       for part in self._parts_of.get(digest, ()))
        return has


def _connector(host: Host, node: str) -> Callable[[], Any]:
    return lambda: host.bulk_connect(node)


def _layers(parts: set[int | str]) -> tuple[tuple[int, int], ...]:
    return ranges_of(sorted(p for p in parts if isinstance(p, int)))


def _ends(parts: set[int | str]) -> tuple[str, ...]:
    return tuple(end for end in ENDS if end in parts)


def _unique(entries: list[TensorEntry]) -> list[TensorEntry]:
    """One entry per object: identical tensors are one object in the store."""
    seen: set[str] = set()
    return [e for e in entries if not (e.digest in seen or seen.add(e.digest))]
