"""serving/disk.py on a real model directory and store, without a cluster: what a disk
holding a model, or part of one, publishes, what a stage must fetch, and what --disk-slack
lets go."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tbmesh.core.messages import KeepOnDisk
from tbmesh.core.types import Plan, Stage
from tbmesh.serving.disk import Disk
from tbmesh.serving.view import ClusterView
from tbmesh.testbed.tiny import make_tiny_model
from tbmesh.weights.store import Local


class Alone:
    """The Host a Disk is handed, for one node with `plan` (the daemon's narrow interface)."""

    me, name = "me", "me"

    def __init__(self, plan: Plan | None = None) -> None:
        self.plan = plan
        self.loop = asyncio.new_event_loop()

    def view(self) -> ClusterView:
        return ClusterView("me", self.plan)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=4, hidden=64, vocab=512)


def whole(model_dir: Path, state: Path) -> Disk:
    disk = Disk(Alone(), "tiny", model_dir, state)
    disk.open()
    disk.build()
    return disk


def copy_objects(source: Disk, target: Disk, entries) -> None:
    """Put what `source` holds of `entries` into `target`'s store, as a fetch would."""
    for entry in entries:
        place = source.local.locate(entry.digest)
        with open(place.path, "rb") as f:
            f.seek(place.offset)
            target.store.put(place.prefix + f.read(place.length))


def test_a_whole_model_directory_is_on_disk_and_needs_nothing(model_dir, tmp_path):
    disk = whole(model_dir, tmp_path)
    state = disk.state()
    assert state.layers == ((0, 4),) and state.ends == ("first", "last") and state.manifest == disk.manifest.digest
    assert state.spec.num_layers == 4 and disk.missing(0, 4) == [] and disk.tensors(0, 4) is None


def test_a_mac_with_only_the_name_lacks_everything_until_it_has_the_manifest(model_dir, tmp_path):
    holder = whole(model_dir, tmp_path / "holder")
    empty = Disk(Alone(), "tiny", tmp_path / "empty" / "models" / "tiny", tmp_path / "empty")
    empty.open()
    assert not empty.ready and empty.missing(0, 2) is None and empty.state().layers == ()
    # what take_manifest does after its fetch: the manifest and the small files, adopted
    empty.store.put(holder.manifest.to_bytes())
    empty.model_dir.mkdir(parents=True)
    for f in holder.manifest.files:
        shutil.copyfile(model_dir / f.name, empty.model_dir / f.name)
    empty._adopt(holder.manifest)
    assert empty.ready and empty.spec == holder.spec
    missing = empty.missing(0, 2)
    assert {e.digest for e in missing} == {t.digest for t in holder.manifest.needed(0, 2, 4)}
    copy_objects(holder, empty, missing)
    assert empty.missing(0, 2) == [] and empty.state().layers == ((0, 2),) and empty.state().ends == ("first",)
    # a restart finds the manifest and the objects again
    again = Disk(Alone(), "tiny", empty.model_dir, tmp_path / "empty")
    again.open()
    assert again.ready and again.state().layers == ((0, 2),)


def test_a_kept_manifest_that_no_longer_describes_the_directory_is_not_adopted(model_dir, tmp_path):
    """The manifest kept in the state directory is adopted at start only while the directory
    still holds what it describes; another model copied in under the same name (sizes and
    times kept, as cp -p does) is hashed again, and only its changed file is."""
    copy = shutil.copytree(model_dir, tmp_path / "copy" / "tiny")
    first = whole(copy, tmp_path / "state").manifest
    again = Disk(Alone(), "tiny", copy, tmp_path / "state")
    again.open()
    assert again.manifest == first  # unchanged: adopted at once, nothing hashed

    other = make_tiny_model(tmp_path / "other" / "tiny", layers=4, hidden=64, vocab=512, seed=1)
    weights = next(copy.glob("model*.safetensors"))
    before = weights.stat()
    shutil.copy2(next(other.glob("model*.safetensors")), weights)  # same size, same mtime
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    replaced = Disk(Alone(), "tiny", copy, tmp_path / "state")
    replaced.open()
    assert replaced.manifest is None and replaced.state().manifest == ""  # not taken on trust
    replaced.build()
    assert replaced.manifest.digest != first.digest
    assert {t.digest for t in replaced.manifest.tensors} == {t.digest for t in whole(other, tmp_path / "o").manifest.tensors}


def test_a_kept_manifest_disagreeing_with_the_small_files_here_is_taken_again(model_dir, tmp_path):
    holder = whole(model_dir, tmp_path / "holder")
    state, here = tmp_path / "empty", tmp_path / "empty" / "models" / "tiny"
    empty = Disk(Alone(), "tiny", here, state)
    empty.open()
    empty.store.put(holder.manifest.to_bytes())
    here.mkdir(parents=True)
    for f in holder.manifest.files:
        shutil.copyfile(model_dir / f.name, here / f.name)
    empty._adopt(holder.manifest)
    (here / "config.json").write_text((here / "config.json").read_text().replace("}", ', "note": 1}', 1))
    again = Disk(Alone(), "tiny", here, state)
    again.open()
    assert again.manifest is None


def test_disk_slack_lets_go_of_what_no_stage_or_copy_needs(model_dir, tmp_path):
    holder = whole(model_dir, tmp_path / "holder")
    plan = Plan(1, 1, "tiny", (Stage("me", 0, 2, 0), Stage("other", 2, 4, 0)))
    disk = Disk(Alone(plan), "tiny", tmp_path / "d" / "models" / "tiny", tmp_path / "d", slack=0)
    disk.model_dir.mkdir(parents=True)
    for f in holder.manifest.files:
        shutil.copyfile(model_dir / f.name, disk.model_dir / f.name)
    disk.store.put(holder.manifest.to_bytes())
    disk._adopt(holder.manifest)
    copy_objects(holder, disk, holder.manifest.tensors)  # everything, as if it once served it all
    assert disk.state().layers == ((0, 4),)
    kept = KeepOnDisk("me", ((3, 4),))
    assert disk.trim([(0, 2)], kept) > 0
    stage = {t.digest for t in holder.manifest.needed(0, 2, 4)}
    copy = {t.digest for t in holder.manifest.tensors if t.layer == 3}
    held = {t.digest for t in holder.manifest.tensors if disk.store.has(t.digest)}
    assert held == stage | copy  # layer 2 (and the head) went; layers 0-1 and the copy of 3 stayed
    assert disk.state().layers == ((0, 2), (3, 4))
    assert Local(holder.manifest, None, disk.store).missing(holder.manifest.needed(0, 2, 4)) == []


def partial_copy(model_dir: Path, target: Path, files: list[str]) -> Path:
    """A copy of a split model's directory holding only `files` of its weights."""
    target.mkdir(parents=True)
    for path in model_dir.iterdir():
        if not path.name.startswith("model-") or path.name in files:
            shutil.copyfile(path, target / path.name)
    return target


def test_macs_that_each_hold_part_of_a_split_model_make_its_whole_manifest(tmp_path):
    from tbmesh.weights.manifest import build_manifest

    split = make_tiny_model(tmp_path / "split" / "tiny", layers=4, hidden=64, vocab=512, max_shard_bytes=250_000)
    files = sorted(p.name for p in split.glob("model-*.safetensors"))
    half = len(files) // 2
    assert len(files) >= 3
    first = Disk(Alone(), "tiny", partial_copy(split, tmp_path / "a" / "tiny", files[:half + 1]), tmp_path / "a")
    second = Disk(Alone(), "tiny", partial_copy(split, tmp_path / "b" / "tiny", files[half:]), tmp_path / "b")
    for disk in (first, second):
        disk.open()
        disk.build()
        assert not disk.whole and disk.manifest is None and disk.part is not None
        assert disk.state().part == disk.part.digest
    # what assemble() does once it has fetched the other's part
    from tbmesh.weights.manifest import union
    from tbmesh.weights.modeldir import read_index

    assert union([first.part], read_index(first.model_dir)) is None  # not all of it yet
    whole = union([first.part, second.part], read_index(first.model_dir))
    assert whole.digest == build_manifest(split, name="tiny").digest  # as one Mac hashing it all
    first.store.put(second.part.to_bytes())
    assert first.assemble([], {second.part.digest: len(second.part.to_bytes())})
    assert first.manifest.digest == whole.digest and first.spec.num_layers == 4
    held = first.state()
    assert held.manifest == whole.digest and held.layers[0][0] == 0 and held.layers[-1][1] < 4  # its files' layers
