"""`tbmesh model pull`: the real huggingface_hub, in a subprocess, against a local hub
(tests/hub_server.py, HF_ENDPOINT) serving a tiny model split into many safetensors files."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest
from hub_server import Hub
from mlx_lm.utils import load_model

from tbmesh.core.modelspec import files_for_layers, tensor_part
from tbmesh.core.units import format_bytes
from tbmesh.runtime.shard import load_shard
from tbmesh.testbed.tiny import make_tiny_model
from tbmesh.weights.modeldir import INDEX_FILE

REPO = "tbmesh-tests/tiny-split"
LAYERS = 6
STAGES = ((0, 2), (2, 4), (4, 6))  # three Macs
# about 197 KB a layer, 131 KB for the embedding and the head: 11 files, some straddling layers
SHARD_BYTES = 150_000
MIB = 2**20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("hub") / "tiny-split", layers=LAYERS, hidden=64, heads=2,
                           kv_heads=1, max_shard_bytes=SHARD_BYTES)  # fmt: skip


@pytest.fixture(scope="module")
def hub(model_dir: Path) -> Iterator[Hub]:
    with Hub() as hub:
        hub.add(REPO, model_dir)
        yield hub


@pytest.fixture
def fresh(hub: Hub) -> Iterator[Hub]:
    hub.reset_counts()
    yield hub
    hub.stall.clear()
    hub.cut_once.clear()
    hub.release.clear()
    hub.stalled.clear()


def env(hub: Hub, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a Mac whose hub is `hub`: huggingface_hub reads HF_* when imported."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**clean, "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "XDG_STATE_HOME": str(home / "state"), "PYTHONIOENCODING": "utf-8", **extra}  # fmt: skip


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tbmesh", "model", "pull", *args]


def tbmesh_pull(hub: Hub, home: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), check=False, capture_output=True, text=True, encoding="utf-8",
                          env=env(hub, home, **extra), timeout=120)  # fmt: skip


def weight_files(model_dir: Path) -> list[str]:
    return sorted(set(json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].values()))


def small_files(model_dir: Path) -> set[str]:
    return {p.name for p in model_dir.iterdir() if not p.name.endswith(".safetensors")}


def expected_weights(model_dir: Path, start: int, end: int) -> set[str]:
    """The files holding layers [start, end), the embedding if first, the norm and head if last:
    read from the tensor names here, not with the code under test."""
    holds: dict[str, set[int | str]] = defaultdict(set)
    for name, file in json.loads((model_dir / INDEX_FILE).read_text())["weight_map"].items():
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        holds[file].add(int(layer[1]) if layer else name.split(".")[-2])  # embed_tokens, norm, lm_head
    wanted = set(range(start, end)) | ({"embed_tokens"} if start == 0 else set())
    wanted |= {"norm", "lm_head"} if end == LAYERS else set()
    return {file for file, parts in holds.items() if parts & wanted}


def assert_same_files(pulled: Path, model_dir: Path, names: set[str]) -> None:
    got = {p.name for p in pulled.iterdir() if p.is_file()}
    assert got == names
    for name in names:
        assert (pulled / name).read_bytes() == (model_dir / name).read_bytes(), name


# --- pulling ------------------------------------------------------------------------------


def test_a_full_pull_gives_the_same_bytes_each_file_fetched_once(fresh: Hub, model_dir: Path, tmp_path: Path):
    files = small_files(model_dir) | set(weight_files(model_dir))
    assert len(weight_files(model_dir)) >= 8  # a split model, as big models come
    result = tbmesh_pull(fresh, tmp_path, REPO, "--dir", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'model'}\n"
    assert_same_files(tmp_path / "model", model_dir, files)
    assert fresh.requests.gets == dict.fromkeys(files, 1)
    total = sum((model_dir / name).stat().st_size for name in files)
    lines = result.stderr.splitlines()  # progress, no more than a line a second, and when done
    assert 1 <= len(lines) <= 3 and all(re.fullmatch(r"[\d.]+ [KM]?B of [\d.]+ [KM]?B", line) for line in lines)
    assert lines[-1] == f"{format_bytes(total)} of {format_bytes(total)}", result.stderr


def test_the_default_directory_is_in_the_state_directory(fresh: Hub, model_dir: Path, tmp_path: Path):
    result = tbmesh_pull(fresh, tmp_path, REPO, "--layers", "2-3")
    assert result.returncode == 0, result.stderr
    dest = tmp_path / "state" / "tbmesh" / "models" / REPO  # XDG_STATE_HOME on Linux
    assert result.stdout == f"{dest}\n"
    assert_same_files(dest, model_dir, small_files(model_dir) | expected_weights(model_dir, 2, 4))


@pytest.fixture(scope="module")
def stages(hub: Hub, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], tuple]:
    """Each of three Macs pulls its stage's share: (directory, GETs per file) per stage."""
    pulled = {}
    for start, end in STAGES:
        home = tmp_path_factory.mktemp(f"mac{start}")
        hub.reset_counts()
        result = tbmesh_pull(hub, home, REPO, "--dir", str(home / "model"), "--layers", f"{start}-{end - 1}")
        assert result.returncode == 0, result.stderr
        pulled[start, end] = (home / "model", dict(hub.requests.gets))
    return pulled


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_pulls_only_the_files_of_its_layers(stages, model_dir: Path, stage: tuple[int, int]):
    pulled, gets = stages[stage]
    wanted = small_files(model_dir) | expected_weights(model_dir, *stage)
    assert len(expected_weights(model_dir, *stage)) < len(weight_files(model_dir)) / 2
    assert gets == dict.fromkeys(wanted, 1)
    assert_same_files(pulled, model_dir, wanted)


def test_the_pulled_stages_give_the_full_models_logits(stages, model_dir: Path):
    """Three Macs, each with only its stage's files: chained, the same floats as the model."""
    model, _ = load_model(model_dir)
    shards = [load_shard(stages[stage][0], *stage) for stage in STAGES]
    tokens = mx.array([[5, 17, 300, 42, 7]])
    x = tokens
    for shard in shards:
        x = shard.forward(x, shard.make_cache())
    assert mx.array_equal(x, model(tokens)[:, -1, :]).item()


def test_an_interrupted_pull_does_not_fetch_finished_files_again(fresh: Hub, model_dir: Path, tmp_path: Path):
    dest = tmp_path / "model"
    weights = weight_files(model_dir)
    stalled = weights[len(weights) // 2]
    fresh.stall.add(stalled)
    process = subprocess.Popen(command(REPO, "--dir", str(dest)), env=env(fresh, tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert fresh.stalled.wait(60)
        others = [name for name in weights if name != stalled]
        deadline = time.monotonic() + 60
        while not all((dest / name).is_file() for name in others) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (dest / stalled).exists()
        again = tbmesh_pull(fresh, tmp_path, REPO, "--dir", str(dest))  # meanwhile
        assert again.returncode == 2
        assert again.stderr == f"error: another pull into {dest} is running (pid {process.pid})\n"
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)  # ^C
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert time.monotonic() - interrupted < 5  # not after the files in flight
    assert process.returncode == 130
    assert stderr.splitlines()[-1] == "interrupted: the same command goes on where it stopped"
    partial = list((dest / ".cache").rglob("*.incomplete"))
    sha256 = hashlib.sha256((model_dir / stalled).read_bytes()).hexdigest()
    assert len(partial) == 1 and f".{sha256}." in partial[0].name  # named after the file's ETag
    fresh.stall.clear()
    fresh.release.set()
    fresh.reset_counts()
    result = tbmesh_pull(fresh, tmp_path, REPO, "--dir", str(dest))
    assert result.returncode == 0, result.stderr
    assert fresh.requests.gets == {stalled: 1}  # from its start: a new process does not resume a file
    assert_same_files(dest, model_dir, small_files(model_dir) | set(weights))
    assert not list(dest.rglob("*.incomplete"))  # dropped, not left to fill the disk


def test_a_connection_cut_mid_file_is_resumed_from_the_last_chunk(fresh: Hub, model_dir: Path, tmp_path: Path):
    """huggingface_hub writes what it receives in 10 MiB chunks: cut after the first one, the
    file goes on with a Range from there (the bytes of the chunk cut short come again)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in small_files(model_dir) - {INDEX_FILE}:
        (repo / name).write_bytes((model_dir / name).read_bytes())
    (repo / "model.safetensors").write_bytes(random.Random(0).randbytes(12 * MIB))  # a pull does not parse it
    fresh.add("tbmesh-tests/big", repo)
    fresh.cut_once["model.safetensors"] = 11 * MIB
    result = tbmesh_pull(fresh, tmp_path, "tbmesh-tests/big", "--dir", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    assert fresh.requests.gets["model.safetensors"] == 2
    assert fresh.requests.ranges == [("model.safetensors", f"bytes={10 * MIB}-")]
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()


def test_a_gated_model_pulls_with_its_token(fresh: Hub, model_dir: Path, tmp_path: Path):
    fresh.add("tbmesh-tests/gated", model_dir, token="hf_letmein")
    result = tbmesh_pull(fresh, tmp_path, "tbmesh-tests/gated", "--dir", str(tmp_path / "m"), "--layers", "0-0",
                         HF_TOKEN="hf_letmein")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_files(tmp_path / "m", model_dir, small_files(model_dir) | expected_weights(model_dir, 0, 1))


# --- errors: one line ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def not_a_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    (root / "data.jsonl").write_text('{"text": "hello"}\n')
    (root / "README.md").write_text("a dataset\n")
    return root


@pytest.mark.parametrize(("args", "words"), [
    (("nobody/nothing",), "no model nobody/nothing on http://127.0.0.1:"),
    ((REPO, "--revision", "v9"), f"{REPO} has no revision 'v9'"),
    (("tbmesh-tests/gated-too",), "tbmesh-tests/gated-too is gated: accept its terms at http://127.0.0.1:"),
    (("tbmesh-tests/dataset",), "tbmesh-tests/dataset is not an mlx-lm model: it has no config.json"),
    ((REPO, "--layers", "4-6"), "layers 4-6 are not a range of the model's 6 layers (0-5)"),
    ((REPO, "--layers", "3"), "bad --layers '3': give A-B"),
    (("not a repo",), "'not a repo' is not a model repository name (OWNER/NAME)"),
])  # fmt: skip
def test_a_mistake_is_one_line(fresh: Hub, model_dir: Path, not_a_model: Path, tmp_path: Path, args, words):
    fresh.add("tbmesh-tests/gated-too", model_dir, token="hf_secret")
    fresh.add("tbmesh-tests/dataset", not_a_model)
    result = tbmesh_pull(fresh, tmp_path, *args, "--dir", str(tmp_path / "m"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and words in result.stderr, result.stderr
    weights = [p for p in (tmp_path / "m").rglob("*.safetensors")] if (tmp_path / "m").exists() else []
    assert weights == []


def test_an_unreachable_hub_says_so_and_names_hf_endpoint(fresh: Hub, tmp_path: Path):
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = tbmesh_pull(fresh, tmp_path, REPO, "--dir", str(tmp_path / "m"), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot reach the hub at http://127.0.0.1:{port} (HF_ENDPOINT)")


@pytest.mark.needs_root
def test_a_disk_too_small_fails_before_downloading_the_weights(fresh: Hub, tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], check=True)
    try:
        result = tbmesh_pull(fresh, tmp_path, REPO, "--dir", str(disk / "model"))
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert re.match(rf"error: disk full: {disk}/model needs 1\.\d MB more, {disk}/model has [\d.]+ KB free",
                        result.stderr), result.stderr  # fmt: skip
        assert not any(name.endswith(".safetensors") for name in fresh.requests.gets)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# --- which files hold which layers ---------------------------------------------------------


def test_tensor_parts_of_the_checkpoint_layouts():
    assert tensor_part("model.layers.12.self_attn.q_proj.weight") == 12
    assert tensor_part("language_model.model.layers.3.mlp.experts.gate_proj.scales") == 3  # kimi_k25
    assert tensor_part("model.embed_tokens.weight") == "embedding"
    assert tensor_part("language_model.model.embed_tokens.biases") == "embedding"
    assert tensor_part("model.norm.weight") == "norm"
    assert tensor_part("lm_head.weight") == "output"
    assert tensor_part("language_model.lm_head.scales") == "output"
    assert tensor_part("vision_tower.encoder.blocks.0.attn.weight") == "other"
    assert tensor_part("mm_projector.linear_1.weight") == "other"


def test_files_for_layers_take_the_ends_to_the_edge_stages():
    weight_map = {
        "language_model.model.embed_tokens.weight": "a", "vision_tower.patch_embed.weight": "v",
        "language_model.model.layers.0.mlp.weight": "a", "language_model.model.layers.1.mlp.weight": "b",
        "language_model.model.layers.2.mlp.weight": "b", "language_model.model.layers.3.mlp.weight": "c",
        "language_model.model.norm.weight": "c", "language_model.lm_head.weight": "d",
        "language_model.model.layers.4.embed_tokens.weight": "mtp",  # past the last layer: never loaded
    }  # fmt: skip
    assert files_for_layers(weight_map, 4, 0, 4) == {"a", "b", "c", "d", "v"}
    assert files_for_layers(weight_map, 4, 0, 1) == {"a", "v"}
    assert files_for_layers(weight_map, 4, 1, 3) == {"b"}
    assert files_for_layers(weight_map, 4, 3, 4) == {"c", "d"}
    tied = {name: file for name, file in weight_map.items() if "lm_head" not in name}
    assert files_for_layers(tied, 4, 3, 4) == {"a", "c"}  # the embedding is the head
