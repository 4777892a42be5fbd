"""`tbmesh model tiny`: random-weight models that mlx-lm loads and runs as real checkpoints."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import stream_generate

from tbmesh.testbed.tiny import BOS, EOS, FILES, IM_END, IM_START, WEIGHTS_FILE, make_tiny_model
from tbmesh.weights.modeldir import describe_model_dir, read_header

SMALL = {"layers": 4, "hidden": 64}  # fast
HEADS = {"heads": 2, "kv_heads": 1}  # the default (heads of 64) would leave one, with no grouping
ARCHS = ("llama", "qwen3", "qwen3_moe")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch=arch, **SMALL, **HEADS) for arch in ARCHS}


def greedy(model, tokenizer, prompt: str, tokens: int = 12) -> list[int]:
    """Token ids at temperature 0 (mlx-lm's default sampler is argmax)."""
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=tokens)]


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: all of it after the header."""
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_lm_loads_and_generates_deterministically(models: dict[str, Path], arch: str) -> None:
    model, tokenizer = mlx_lm.load(str(models[arch]))
    assert len(model.layers) == SMALL["layers"]
    first = greedy(model, tokenizer, "The river was wide")
    assert len(first) >= 2
    assert greedy(model, tokenizer, "The river was wide") == first
    assert greedy(model, tokenizer, "How many machines do you need?") != first
    text = mlx_lm.generate(model, tokenizer, "The river was wide", max_tokens=12)
    assert isinstance(text, str)


def test_logits_stay_sane_over_sixteen_layers(tmp_path: Path) -> None:
    for arch in ("llama", "qwen3"):
        path = make_tiny_model(tmp_path / arch, arch=arch, layers=16, hidden=64, **HEADS)
        model, tokenizer = mlx_lm.load(str(path))
        logits = model(mx.array([tokenizer.encode("Winter came early that year.")]))[0]
        assert mx.all(mx.isfinite(logits)).item()
        assert 1.0 < logits.std().item() < 4.0  # peaked enough to matter, not one-hot
        assert len(set(logits.argmax(axis=-1).tolist())) > 1  # positions disagree


def test_tied_embeddings_have_no_output_projection(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", arch="qwen3", tie_embeddings=True, **SMALL, **HEADS)
    assert not any(name.startswith("lm_head.") for name in read_header(path / WEIGHTS_FILE))
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    model, tokenizer = mlx_lm.load(str(path))
    logits = model(mx.array([tokenizer.encode("The river was wide")]))[0]
    assert 1.0 < logits.std().item() < 4.0


def test_tokenizer_round_trips_and_has_chat_template(models: dict[str, Path]) -> None:
    _, tokenizer = mlx_lm.load(str(models["llama"]))
    text = "Numbers have units: 64 GB, 80 Gb/s. Grüße, naïve café 😀\n\ttabs"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.convert_tokens_to_ids(BOS)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer.encode("the river", add_special_tokens=False)) < len("the river")  # merges learned
    assert len(tokenizer) == 512
    for token in (BOS, EOS, IM_START, IM_END):
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    config = json.loads((models["llama"] / "config.json").read_text())
    assert tokenizer.eos_token_ids == set(config["eos_token_id"])
    assert config["bos_token_id"] == tokenizer.convert_tokens_to_ids(BOS)

    assert tokenizer.has_chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (f"{BOS}{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi{IM_END}\n"
                        f"{IM_START}assistant\n")  # fmt: skip
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.count(tokenizer.convert_tokens_to_ids(BOS)) == 1


def test_a_large_vocab_is_filled_with_reserved_tokens(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", layers=1, hidden=64, vocab=4096, **HEADS)
    _, tokenizer = mlx_lm.load(str(path))
    assert len(tokenizer) == 4096
    assert tokenizer.convert_ids_to_tokens(4095).startswith("<|reserved_special_token_")


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_model_dir_counts_layers_and_bytes(models: dict[str, Path], arch: str) -> None:
    spec = describe_model_dir(models[arch])
    assert spec.num_layers == SMALL["layers"]
    assert spec.weight_bytes == data_bytes(models[arch] / WEIGHTS_FILE)
    assert len(set(spec.layer_bytes)) == 1 and spec.layer_bytes[0] > 0


def test_dtype_is_in_the_weights_and_the_config(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", dtype="bfloat16", layers=1, hidden=64, **HEADS)
    assert {dtype for dtype, _ in read_header(path / WEIGHTS_FILE).values()} == {"BF16"}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, tokenizer = mlx_lm.load(str(path))
    assert greedy(model, tokenizer, "hello", 3)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    options = {"arch": "qwen3_moe", "layers": 2, "hidden": 64, **HEADS}
    a = make_tiny_model(tmp_path / "a", seed=7, **options)
    b = make_tiny_model(tmp_path / "b", seed=7, **options)
    c = make_tiny_model(tmp_path / "c", seed=8, **options)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / WEIGHTS_FILE).read_bytes() != (c / WEIGHTS_FILE).read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert read_header(a / WEIGHTS_FILE) == read_header(c / WEIGHTS_FILE)  # same shapes


def test_existing_directory_needs_force(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", layers=1, hidden=64, **HEADS)
    with pytest.raises(FileExistsError):
        make_tiny_model(path, layers=1, hidden=64, **HEADS)
    # another model's files that mlx-lm would read along with the new ones
    stale = [path / "model-00002-of-00002.safetensors", path / "generation_config.json", path / "chat_template.jinja"]
    for file in stale:
        file.write_text("{}")
    make_tiny_model(path, layers=2, hidden=64, force=True, **HEADS)
    assert not any(file.exists() for file in stale)
    assert describe_model_dir(path).num_layers == 2


def test_split_weights_load_as_one_file(models: dict[str, Path], tmp_path: Path) -> None:
    """max_shard_bytes: mlx_lm.convert's layout of big models, the same model in many files."""
    path = make_tiny_model(tmp_path / "split", arch="llama", max_shard_bytes=60_000, **SMALL, **HEADS)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert not (path / WEIGHTS_FILE).exists()
    assert len(files) > SMALL["layers"] and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    whole = read_header(models["llama"] / WEIGHTS_FILE)
    assert index["weight_map"] == {name: f for f in files for name in read_header(path / f)}
    assert sorted(index["weight_map"]) == sorted(whole)
    assert all(data_bytes(path / f) <= 60_000 or len(read_header(path / f)) == 1 for f in files)
    tokens = mx.array([[5, 17, 300, 42]])
    assert mx.array_equal(mlx_lm.load(str(path))[0](tokens), mlx_lm.load(str(models["llama"]))[0](tokens)).item()


@pytest.mark.parametrize(
    "options",
    [{"arch": "gpt9"}, {"vocab": 100}, {"hidden": 64, "heads": 3}, {"hidden": 99}, {"layers": 0}, {"heads": 0}, {"dtype": "int8"},
     {"arch": "qwen3_moe", "experts": 2, "experts_per_token": 3}, {"max_shard_bytes": 0}],
)  # fmt: skip
def test_bad_options_are_refused_before_writing(tmp_path: Path, options: dict) -> None:
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "m", **options)
    assert not (tmp_path / "m").exists()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tbmesh", *args], capture_output=True, text=True, timeout=60)


def test_cli_refuses_a_directory_with_files_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    small = ["--layers", "2", "--hidden", "64", "--vocab", "300", "--arch", "qwen3", "--seed", "3"]

    refused = run("model", "tiny", str(path), *small)
    assert refused.returncode == 2
    assert refused.stdout == "" and refused.stderr.count("\n") == 1 and "--force" in refused.stderr
    assert [p.name for p in path.iterdir()] == ["notes.txt"]

    made = run("model", "tiny", str(path), *small, "--force")
    assert made.returncode == 0, made.stderr
    assert str(path) in made.stdout and "qwen3, 2 layers" in made.stdout and "parameters" in made.stdout
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == ("qwen3", 2, 300)
    assert describe_model_dir(path).num_layers == 2
    assert (path / "notes.txt").read_text() == "mine"  # --force replaces the model, nothing else
