"""The manifest of a model directory: objects named by content, validation of a peer's
manifest, the tensors a stage needs, and the digest cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbmesh.testbed.tiny import WEIGHTS_FILE, make_tiny_model
from tbmesh.weights.manifest import (
    FileEntry,
    Manifest,
    ManifestError,
    TensorEntry,
    build_manifest,
    canonical_header,
    layer_of,
)
from tbmesh.weights.modeldir import read_layout

SMALL = {"layers": 3, "hidden": 64, "heads": 1, "kv_heads": 1}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_model(tmp_path_factory.mktemp("manifest") / "tiny", **SMALL)
    (root / "generation_config.json").write_text('{"eos_token_id": 1}\n')
    return root


@pytest.fixture(scope="module")
def manifest(model: Path) -> Manifest:
    return build_manifest(model)


def test_every_tensor_object_is_a_canonical_safetensors_file_named_by_its_sha256(model, manifest):
    slots = read_layout(model / WEIGHTS_FILE)
    assert {t.name for t in manifest.tensors} == set(slots)
    data = (model / WEIGHTS_FILE).read_bytes()
    for tensor in manifest.tensors:
        slot = slots[tensor.name]
        assert (tensor.dtype, tensor.shape, tensor.nbytes) == (slot.dtype, slot.shape, slot.end - slot.start)
        obj = canonical_header(tensor.dtype, tensor.shape, tensor.nbytes) + data[slot.start:slot.end]
        assert hashlib.sha256(obj).hexdigest() == tensor.digest
        assert len(obj) == tensor.object_size
    # identical tensors (the random model's norms are all ones) are one object
    norms = {t.digest for t in manifest.tensors if t.name.endswith("layernorm.weight")}
    assert len(norms) == 1


def test_the_small_files_are_listed_and_the_weights_are_not(model, manifest):
    names = {f.name for f in manifest.files}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert WEIGHTS_FILE not in names
    for f in manifest.files:
        assert f.digest == hashlib.sha256((model / f.name).read_bytes()).hexdigest()
        assert f.nbytes == (model / f.name).stat().st_size


def test_canonical_header_is_padded_json_as_safetensors_writes_it():
    header = canonical_header("BF16", (3, 5), 30)
    (length,) = struct.unpack("<Q", header[:8])
    assert length == len(header) - 8 and length % 8 == 0
    assert json.loads(header[8:]) == {"tensor": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 30]}}
    assert header[8:].rstrip(b" ") == b'{"tensor":{"dtype":"BF16","shape":[3,5],"data_offsets":[0,30]}}'


@pytest.mark.parametrize("name, layer", [
    ("model.layers.12.mlp.up_proj.weight", 12),
    ("language_model.model.layers.3.self_attn.q_proj.scales", 3),
    ("model.embed_tokens.weight", None),
    ("lm_head.weight", None),
    ("model.norm.weight", None),
    ("vision_tower.model.layers.2.weight", None),
    ("model.layers.x.weight", None),
])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def _entry(name: str, nbytes: int = 4) -> TensorEntry:
    return TensorEntry(name, "U8", (nbytes,), nbytes, hashlib.sha256(name.encode()).hexdigest(), layer_of(name))


SYNTHETIC = Manifest("m", (), tuple(_entry(n) for n in [
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
    *(f"model.layers.{i}.w" for i in range(4)), "model.layers.4.mtp.w",  # layer 4: DeepSeek's MTP layer
]))


def test_needed_gives_a_stage_its_layers_and_the_ends_to_the_first_and_last():
    def names(start, end):
        return [t.name for t in SYNTHETIC.needed(start, end, 4)]

    ends = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    # the first stage reads the embedding, the last the final norm and head, not the other's
    assert names(0, 2) == ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w"]
    assert names(1, 3) == ["model.layers.1.w", "model.layers.2.w"]
    assert names(2, 4) == ["lm_head.weight", "model.norm.weight", "model.layers.2.w", "model.layers.3.w"]
    assert names(0, 4) == [*ends, *(f"model.layers.{i}.w" for i in range(4))]  # never the MTP layer
    assert SYNTHETIC.stage_bytes(1, 3, 4) == 8
    with pytest.raises(ValueError, match=r"layers \[3, 2\)"):
        SYNTHETIC.needed(3, 2, 4)


def test_a_manifest_round_trips_and_is_named_by_its_bytes(manifest):
    data = manifest.to_bytes()
    assert Manifest.from_bytes(data) == manifest
    assert manifest.digest == hashlib.sha256(data).hexdigest()
    shuffled = Manifest(manifest.name, manifest.files[::-1], manifest.tensors[::-1])
    assert shuffled.to_bytes() == data  # one canonical form


def _doc(manifest: Manifest) -> dict:
    return json.loads(manifest.to_bytes())


def _bad(change) -> bytes:
    doc = _doc(SYNTHETIC_WITH_FILE)
    change(doc)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


SYNTHETIC_WITH_FILE = Manifest("m", (FileEntry("config.json", 10, "a" * 64),), SYNTHETIC.tensors)
D = "b" * 64


@pytest.mark.parametrize("data, match", [
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000, "not JSON"),
    (b"[]", "not an object with format"),
    (_bad(lambda d: d.update(format="tbmesh-manifest/9")), "format 'tbmesh-manifest/9'"),
    (_bad(lambda d: d.update(extra=1)), "not an object with format"),
    (_bad(lambda d: d.update(name="")), "name is not a string"),
    (_bad(lambda d: d.update(files={})), "must be lists"),
    (_bad(lambda d: d["files"].append(["../etc/passwd", 1, D])), "not a plain file name"),
    (_bad(lambda d: d["files"].append([".hidden", 1, D])), "not a plain file name"),
    (_bad(lambda d: d["files"].append(["model.safetensors", 1, D])), "is a weight file"),
    (_bad(lambda d: d["files"].append(["x", True, D])), "nbytes is not an integer"),
    (_bad(lambda d: d["files"].append(["x", 1, D.upper()])), "digest is not 64 lower-case hex"),
    (_bad(lambda d: d["tensors"].append(["t", "F32", [2], 4, D])), r"F32\[2\] is not 4 bytes"),
    (_bad(lambda d: d["tensors"].append(["t", "C64", [1], 8, D])), "not a safetensors dtype"),
    (_bad(lambda d: d["tensors"].append(["t", "U8", [1.0], 1, D])), "shape is not an integer"),
    (_bad(lambda d: d["tensors"].append(["t", "U8", [1] * 9, 1, D])), "at most 8 sizes"),
    (_bad(lambda d: d["tensors"].append(["t", "U8", [-1], -1, D])), "shape is not an integer"),
    (_bad(lambda d: d["tensors"].append(["t", "U8", [1], 1])), "is not \\[name, dtype"),
    (b'{"files":[],"format":"tbmesh-manifest/1","name":"m","tensors":[]} ', "not in canonical form"),
    (b'{"format":"tbmesh-manifest/1","files":[],"name":"m","tensors":[]}', "not in canonical form"),
])
def test_a_bad_manifest_is_refused_in_one_line(data, match):
    with pytest.raises(ManifestError, match=match) as caught:
        Manifest.from_bytes(data)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_a_manifest_out_of_order_is_not_canonical():
    doc = _doc(SYNTHETIC_WITH_FILE)
    doc["tensors"].reverse()
    with pytest.raises(ManifestError, match="canonical"):
        Manifest.from_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SYNTHETIC_WITH_FILE.to_bytes())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "replace":
            data[i] = draw(st.sampled_from(b'0129"[]{},:-.eE\\u \x00\xff'))
        elif kind == "insert":
            data[i:i] = draw(st.sampled_from([b"0", b"[", b'"', b",1", b"e999", b'\\ud800', b"null", b"-"]))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        else:
            del data[i:]
    return bytes(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_mutated_manifest_only_ever_raises_manifest_error(data):
    try:
        manifest = Manifest.from_bytes(data)
    except ManifestError:
        return
    assert manifest.to_bytes() == data  # accepted: then it is exactly a valid manifest


def test_the_digest_cache_is_used_until_a_file_changes(model, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    cache = tmp_path / "state" / "digests.json"
    first = build_manifest(copy, cache=cache)
    assert build_manifest(copy, cache=cache) == first
    # The cache is trusted for an unchanged file: a planted digest comes back.
    entries = json.loads(cache.read_text())
    key = str((copy / WEIGHTS_FILE).resolve())
    name = first.tensors[0].name
    entries[key][4][name] = "c" * 64
    cache.write_text(json.dumps(entries))
    assert build_manifest(copy, cache=cache).tensors[0].digest == "c" * 64
    # A change of mtime makes it hash the file again.
    stat = (copy / WEIGHTS_FILE).stat()
    os.utime(copy / WEIGHTS_FILE, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert build_manifest(copy, cache=cache) == first
    cache.write_text("not json")  # a broken cache only costs time
    assert build_manifest(copy, cache=cache) == first


def test_building_needs_every_weight_file(model, tmp_path):
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(model / "config.json", sharded)
    shutil.copy(model / WEIGHTS_FILE, sharded / "model-00001-of-00002.safetensors")
    with pytest.raises(ManifestError, match="model-00002-of-00002.safetensors is missing .*gets its manifest "
                                            "from a peer"):
        build_manifest(sharded)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ManifestError, match="building needs all the weights"):
        build_manifest(sharded)
    with pytest.raises(ManifestError, match="no model\\*.safetensors"):
        build_manifest(tmp_path)
