"""The content-addressed store: verified objects, partials written in any order and resumed,
and what a node can serve and load from its model directory and its store."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tbmesh.testbed.tiny import WEIGHTS_FILE, make_tiny_model
from tbmesh.weights.manifest import Manifest, build_manifest
from tbmesh.weights.store import CorruptObject, Local, MissingWeights, Source, Store

SMALL = {"layers": 3, "hidden": 64, "heads": 1, "kv_heads": 1}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_bytes(source: Source) -> bytes:
    with source.path.open("rb") as f:
        f.seek(source.offset)
        return source.prefix + f.read(source.length)


# --- Store --------------------------------------------------------------------------------------


def test_put_names_an_object_by_its_sha256(tmp_path):
    store = Store(tmp_path / "store")
    assert store.digests() == set() and store.bytes_on_disk() == 0
    digest = store.put(b"hello")
    assert digest == sha(b"hello")
    assert store.path(digest) == tmp_path / "store" / digest[:2] / digest
    assert store.has(digest) and store.path(digest).read_bytes() == b"hello"
    assert store.digests() == {digest} and store.bytes_on_disk() == 5
    store.remove(digest)
    assert not store.has(digest) and store.digests() == set()
    with pytest.raises(ValueError, match="not a sha256"):
        store.path("../../etc/passwd")


def test_append_and_finish_verify_the_bytes(tmp_path):
    store = Store(tmp_path)
    good = sha(b"abcdef")
    store.append(good, b"abc")
    assert store.partial_size(good) == 3
    store.append(good, b"def")
    assert store.finish(good).read_bytes() == b"abcdef"
    assert store.partial_size(good) == 0
    store.remove(good)
    store.append(good, b"abcdeX")
    with pytest.raises(CorruptObject, match=f"object {good[:12]} arrived with sha256"):
        store.finish(good)
    assert not store.has(good) and store.partial_size(good) == 0 and not store.has_partial(good)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.lists(st.integers(1, 3000), max_size=8), st.randoms())
def test_a_partial_written_in_any_order_hashes_and_finishes(tmp_path_factory, data, cuts, rng):
    store = Store(tmp_path_factory.mktemp("store"))
    points = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    pieces = list(itertools.pairwise(points))
    rng.shuffle(pieces)
    partial = store.open(sha(data), len(data))
    for start, end in pieces:
        partial.write(start, data[start:end])
    assert partial.complete and partial.missing() == []
    assert partial.finish().read_bytes() == data


def test_a_partial_resumes_from_its_prefix_after_a_restart(tmp_path):
    data = os.urandom(10_000)
    store = Store(tmp_path)
    partial = store.open(sha(data), len(data))
    partial.write(0, data[:4000])
    partial.close()
    assert store.partial_size(sha(data)) == 4000
    assert not (tmp_path / sha(data)[:2] / (sha(data) + ".partial.ranges")).exists()  # its size says it
    again = Store(tmp_path).open(sha(data), len(data))  # re-hashes the 4000 bytes held
    assert again.missing() == [(4000, 10_000)]
    again.write(4000, data[4000:])
    assert again.finish().read_bytes() == data


def test_a_partial_with_gaps_keeps_its_ranges_through_a_restart(tmp_path):
    data = os.urandom(10_000)
    digest = sha(data)
    partial = Store(tmp_path).open(digest, len(data))
    partial.write(6000, data[6000:8000])  # past a gap: its ranges are saved first
    partial.write(0, data[:1000])
    partial.close()
    ranges = tmp_path / digest[:2] / (digest + ".partial.ranges")
    assert json.loads(ranges.read_text()) == [[0, 1000], [6000, 8000]]
    assert Store(tmp_path).partial_size(digest) == 1000
    again = Store(tmp_path).open(digest, len(data))
    assert again.missing() == [(1000, 6000), (8000, 10_000)]
    again.write(8000, data[8000:])
    again.write(1000, data[1000:6000])
    assert again.finish().read_bytes() == data
    assert not ranges.exists()


def test_a_crash_before_the_ranges_are_saved_again_loses_progress_not_correctness(tmp_path):
    data = os.urandom(3000)
    digest = sha(data)
    partial = Store(tmp_path).open(digest, len(data))
    partial.write(2000, data[2000:])  # the ranges file says [] (written before these bytes)
    os.close(partial._fd)  # a crash: no close(), no save
    again = Store(tmp_path).open(digest, len(data))
    assert again.missing() == [(0, 3000)]
    again.write(0, data)
    assert again.finish().read_bytes() == data


def test_a_corrupt_partial_is_deleted_by_finish(tmp_path):
    data = os.urandom(5000)
    store = Store(tmp_path)
    partial = store.open(sha(data), len(data))
    partial.write(0, data[:2500])
    partial.write(2500, b"\0" * 2500)
    with pytest.raises(CorruptObject):
        partial.finish()
    assert not store.has(sha(data)) and not store.has_partial(sha(data))
    with pytest.raises(ValueError, match="outside the object"):
        store.open(sha(data), 10).write(5, b"123456")


# --- Local --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tmp_path_factory) -> tuple[Path, Manifest]:
    root = make_tiny_model(tmp_path_factory.mktemp("local") / request.param, dtype=request.param, **SMALL)
    return root, build_manifest(root)


def test_local_produces_every_object_of_the_manifest(model, tmp_path):
    root, manifest = model
    store = Store(tmp_path)
    local = Local(manifest, root, store)
    assert store.has(manifest.digest)  # the manifest is an object peers can fetch
    for digest, entry in {**manifest.objects(), manifest.digest: None}.items():
        source = local.locate(digest)
        assert source is not None and sha(source_bytes(source)) == digest
        if entry is not None:
            assert source.size == entry.object_size
    tensor = manifest.tensors[0]
    assert local.locate(tensor.digest).path == root / WEIGHTS_FILE and local.locate(tensor.digest).prefix
    assert local.locate("0" * 64) is None and local.locate("junk") is None
    assert local.missing(manifest.tensors) == []


def _store_only(manifest: Manifest, root: Path, tmp_path: Path) -> Local:
    """A node that holds the model's objects only as store blobs (no model directory)."""
    store = Store(tmp_path / "blobs")
    full = Local(manifest, root, Store(tmp_path / "scratch"))
    for digest in manifest.objects():
        store.put(source_bytes(full.locate(digest)))
    return Local(manifest, None, store)


def test_weights_loaded_from_blobs_equal_those_of_the_original_file(model, tmp_path):
    root, manifest = model
    original = mx.load(str(root / WEIGHTS_FILE))
    local = _store_only(manifest, root, tmp_path)
    assert local.missing(manifest.tensors) == []
    loaded = local.lazy_weights(manifest.tensors)
    assert set(loaded) == set(original)
    for name, array in original.items():
        assert loaded[name].dtype == array.dtype and mx.array_equal(loaded[name], array).item(), name
    from_dir = Local(manifest, root, Store(tmp_path / "other")).lazy_weights(manifest.needed(1, 2, 3))
    for entry in manifest.needed(1, 2, 3):
        assert mx.array_equal(from_dir[entry.name], original[entry.name]).item()


def test_a_node_with_part_of_the_weights_loads_from_both(model, tmp_path):
    root, manifest = model
    stage = manifest.needed(0, 2, 3)
    local = _store_only(manifest, root, tmp_path)
    for entry in stage[len(stage) // 2:]:  # half the stage only in the model directory
        local.store.remove(entry.digest)
    partial_dir = tmp_path / "partial"
    partial_dir.mkdir()
    shutil.copy(root / WEIGHTS_FILE, partial_dir / WEIGHTS_FILE)
    mixed = Local(manifest, partial_dir, local.store)
    loaded = mixed.lazy_weights(stage)
    original = mx.load(str(root / WEIGHTS_FILE))
    assert all(mx.array_equal(loaded[e.name], original[e.name]).item() for e in stage)
    nothing = Local(manifest, None, Store(tmp_path / "empty"))
    assert nothing.missing(stage) == stage
    with pytest.raises(MissingWeights, match=f"{len(stage)} tensors .* are neither in None nor in the store") as caught:
        nothing.lazy_weights(stage)
    assert "\n" not in str(caught.value)


def test_local_serves_a_tensor_of_the_model_directory_only_when_it_matches_the_manifest(model, tmp_path):
    _root, manifest = model
    other = make_tiny_model(tmp_path / "other", dtype="float16", **SMALL)  # same names, other dtype
    local = Local(manifest, other, Store(tmp_path / "store"))
    assert local.missing(manifest.tensors) == list(manifest.tensors)
