"""Weights served from memory (tbmesh.weights.memory, serving/disk.py), on a real model, store
and bulk connections: a Mac whose model directory vanished while it served still holds the
layers it loaded; peers fetch them from its memory as the same verified objects, and a new
stage of its own takes them from there. Only arrays that are the checkpoint's bytes count."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from daemons import wait_for

from tbmesh.core.messages import ENDS, DiskState
from tbmesh.net import peers
from tbmesh.runtime.shard import Shard, load_shard
from tbmesh.serving.disk import Disk
from tbmesh.serving.view import ClusterView
from tbmesh.weights import bulk
from tbmesh.weights.store import Local, Store

LAYERS = 4


class Alone:
    """The Host a Disk is handed, for one node alone: it keeps what the Disk publishes."""

    me, name = "me", "me"

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.published: list[DiskState | None] = []

    def view(self) -> ClusterView:
        return ClusterView("me", None)

    def disk_changed(self, state: DiskState | None) -> None:
        self.published.append(state)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def original(request, tmp_path_factory) -> Path:
    from tbmesh.testbed.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "tiny", layers=LAYERS, hidden=64, vocab=512,
                           dtype=request.param)


def vanished(original: Path, tmp_path: Path) -> tuple[Disk, Shard]:
    """A Mac that hashed its copy of the model and loaded all of it; then the copy's weight
    files were deleted (the small files stay) and it looked at its disk again."""
    copy = shutil.copytree(original, tmp_path / "models" / "tiny")
    disk = Disk(Alone(), "tiny", copy, tmp_path / "state")
    disk.open()
    disk.build()
    shard = load_shard(copy, 0, LAYERS)
    disk.hold([shard])
    assert disk.state().memory == ()  # all on disk: nothing hashed, nothing offered from memory
    for file in copy.glob("*.safetensors"):
        file.unlink()
    assert disk.refresh()  # saw the files go, and checked what it holds of them
    return disk, shard


def serving(local: Local) -> bulk.Peer:
    """A peer serving `local` with bulk.serve over a fresh socket pair at each connection."""
    def connect() -> peers.Detached:
        ours, theirs = socket.socketpair()
        threading.Thread(target=bulk.serve, args=(peers.Detached(theirs, b"", None), local), daemon=True).start()
        return peers.Detached(ours, b"", None)
    return bulk.Peer("a", "a", connect)


def test_a_shard_in_memory_serves_the_objects_its_disk_lost(original, tmp_path):
    disk, _ = vanished(original, tmp_path)
    state = disk.state()
    assert (state.layers, state.ends) == ((), ())  # nothing on disk any more
    assert (state.memory, state.memory_ends) == (((0, LAYERS),), ENDS)  # every layer from memory
    assert not disk.whole  # the model directory no longer holds every weight
    manifest = disk.manifest
    for tensor in manifest.tensors:  # the canonical object, its bytes straight from the array
        source = disk.local.locate(tensor.digest)
        assert source is not None and source.path is None and source.data is not None
        assert hashlib.sha256(source.prefix + bytes(source.data)).hexdigest() == tensor.digest
    assert disk.memory.check(manifest.tensors) == (0, 0)  # each array is hashed once

    # a peer fetches a stage from that memory over a bulk connection, and verifies it as ever
    store = Store(tmp_path / "b")
    wanted = manifest.needed(1, LAYERS, LAYERS)
    report = bulk.fetch(wanted, [serving(disk.local)], store)
    assert report.objects == len({t.digest for t in wanted}) and report.corrupt == 0
    fetched = Local(manifest, None, store).lazy_weights(wanted)
    for name, array in mx.load(str(next(original.glob("*.safetensors")))).items():
        if name in fetched:
            assert fetched[name].dtype == array.dtype and mx.array_equal(fetched[name], array).item(), name


def test_a_new_stage_takes_its_layers_from_memory_and_a_dropped_shard_serves_nothing(original, tmp_path):
    disk, shard = vanished(original, tmp_path)
    assert disk.missing(1, 3) == []  # held in memory: nothing to fetch
    smaller = load_shard(disk.model_dir, 1, 3, keep=[shard], tensors=disk.tensors(1, 3))
    assert (smaller.read_layers, smaller.kept_layers) == (0, 2)
    disk.hold([smaller])  # the old shard dropped
    state = disk.state()
    assert (state.memory, state.memory_ends) == (((1, 3),), ())
    kept = {t.digest for t in disk.manifest.tensors if t.layer in (1, 2)}  # (norms of ones are one object)
    gone = [t for t in disk.manifest.tensors if t.layer == 0 and t.digest not in kept]
    assert gone and all(disk.local.locate(t.digest) is None for t in gone)
    assert [t for t in disk.missing(0, 1) if t.layer == 0] == gone  # to fetch, if a plan wants them
    disk.hold([])
    assert disk.state().memory == () and all(disk.local.locate(t.digest) is None for t in disk.manifest.tensors)


def test_only_arrays_that_are_the_checkpoints_bytes_are_offered(original, tmp_path):
    disk, shard = vanished(original, tmp_path)
    arrays = shard.checkpoint_arrays()
    changed, turned = "model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"
    arrays[changed] = arrays[changed] + 1  # as a sanitize that changes a tensor's values
    arrays[turned] = mx.contiguous(arrays[turned].T).T  # the same values, laid out column-major
    mx.eval(arrays[changed], arrays[turned])
    disk.memory.hold(arrays)
    assert disk.refresh() is False  # the disk did not change since the last look
    disk.state()  # starts checking the new arrays in a thread, and publishes when done
    wait_for(lambda: not disk._checking, 10, "the check of the new arrays")
    disk.host.loop.run_until_complete(asyncio.sleep(0.01))  # the publish it asked the loop for
    published = disk.host.published[-1]
    assert published.memory == ((0, 1), (3, LAYERS)) and published.memory_ends == ENDS
    assert disk.state().memory == published.memory
    entries = {t.name: t for t in disk.manifest.tensors}
    assert disk.local.locate(entries[changed].digest) is None and disk.local.locate(entries[turned].digest) is None
