"""An answer ends at every end id mlx-lm stops at: those config.json lists, not only the
tokenizer's own eos token (a model whose config says `eos_token_id: [509, 511]`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serving import complete, post, serving

from tbmesh.testbed.tiny import EOS, IM_END, make_tiny_model
from tbmesh.weights.modeldir import load_tokenizer

PROMPT = "Hello"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Greedy answers of this model soon meet <|end_of_text|>, the config's extra end id."""
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layers=8, hidden=128, vocab=512,
                           early_end=True)


def test_the_tokenizer_knows_the_end_ids_of_the_config(model_dir):
    tokenizer = load_tokenizer(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    ends = {tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(IM_END)}
    assert set(config["eos_token_id"]) == ends == tokenizer.eos_token_ids
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END)  # its own is only one


def test_generation_config_end_ids_win_as_in_mlx_lm(model_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in model_dir.iterdir():
        (copy / file.name).symlink_to(file)
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_tokenizer(copy).eos_token_ids == {7, 9, load_tokenizer(copy).eos_token_id}


def test_an_answer_stops_at_the_extra_end_id_as_mlx_lm_does(cluster, reference):
    text, count = reference(PROMPT, 24)
    assert count < 5  # mlx-lm stops early, at <|end_of_text|> (else this test proves nothing)
    daemons = cluster(2)
    serving(daemons, 2)
    assert complete(daemons[1], PROMPT, 24, temperature=0) == (text, count)
    status, body = post(daemons[0], "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
        "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop", body
    assert body["usage"]["completion_tokens"] < 24
