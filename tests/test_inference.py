"""Distributed inference through real daemons on loopback, token for token against mlx-lm."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading

import pytest
from daemons import DaemonProcess, wait_for
from serving import PROMPTS, complete, post, serving

from tbmesh.runtime.sampling import Sampling


@pytest.mark.slow  # test_serving.py covers the pipeline against mlx-lm in every run
@pytest.mark.parametrize("stages", [2, 3])
def test_the_pipeline_gives_mlx_lm_tokens_at_temperature_zero_from_every_entry(cluster, reference, stages):
    daemons = cluster(stages)
    view = serving(daemons, stages)
    assert [s["start"] for s in view["plan"]["stages"]][0] == 0
    for i, prompt in enumerate(PROMPTS):
        entry = daemons[i % stages]  # a request may enter at any node
        assert complete(entry, prompt, 24, temperature=0) == reference(prompt, 24)


@pytest.mark.slow  # test_serving.py covers the pipeline against mlx-lm in every run
def test_seeded_sampling_gives_the_single_process_tokens(cluster, reference):
    daemons = cluster(3)
    serving(daemons, 3)
    for seed in (7, 8):
        expected = reference(PROMPTS[0], 24, Sampling(0.8, 0.9, seed))
        assert complete(daemons[1], PROMPTS[0], 24, temperature=0.8, top_p=0.9, seed=seed) == expected
    # different seeds draw differently (else the test above would prove nothing)
    assert reference(PROMPTS[0], 24, Sampling(0.8, 0.9, 7)) != reference(PROMPTS[0], 24, Sampling(0.8, 0.9, 8))


@pytest.mark.slow  # test_serving.py covers the pipeline against mlx-lm in every run
def test_eight_concurrent_requests_all_get_their_own_tokens(cluster, reference):
    daemons = cluster(3)
    serving(daemons, 3)
    jobs = [(PROMPTS[i % 3] + " " * (i // 3), 8 + 2 * i) for i in range(8)]
    results: dict[int, tuple[str, int]] = {}

    def run(i: int) -> None:
        prompt, max_tokens = jobs[i]
        results[i] = complete(daemons[i % 3], prompt, max_tokens, temperature=0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for i, (prompt, max_tokens) in enumerate(jobs):
        assert results[i] == reference(prompt, max_tokens), i


@pytest.mark.slow  # test_serving.py covers the pipeline against mlx-lm in every run
def test_a_client_that_goes_away_frees_the_caches_on_every_stage(cluster):
    daemons = cluster(3)
    serving(daemons, 3)
    host, port = daemons[0].api_url().split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps(
        {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 2000, "stream": True, "temperature": 0}),
        {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # it is generating
    wait_for(lambda: all(d.status()["runtime"]["stage_requests"] == 1 for d in daemons), 10,
             "every stage holding the request's cache")
    connection.close()  # the client disconnects mid-stream

    def idle(daemon: DaemonProcess) -> bool:
        runtime = daemon.status()["runtime"]
        return runtime["requests"] == 0 and runtime["stage_requests"] == 0

    wait_for(lambda: all(idle(d) for d in daemons), 10, "the caches freed everywhere")


@pytest.mark.slow  # test_serving.py covers the pipeline against mlx-lm in every run
def test_each_node_holds_only_its_shard(cluster, model_dir):
    from tbmesh.weights.modeldir import describe_model_dir

    total = describe_model_dir(model_dir).weight_bytes
    daemons = cluster(3)
    view = serving(daemons, 3)
    planned = {s["node"]: s["bytes"] for s in view["plan"]["stages"]}
    for daemon in daemons:
        status = daemon.status()
        shard = status["runtime"]
        assert shard["weight_bytes"] == planned[status["node"]["id"]]
        assert shard["weight_bytes"] < 0.6 * total
        # MLX's resident memory is the shard (plus small buffers), not the model
        assert shard["weight_bytes"] <= shard["active_memory"] < shard["weight_bytes"] + 0.3 * total
    # and `tbmesh status` shows who holds which layers
    out = subprocess.run([sys.executable, "-m", "tbmesh", "status", "--api", daemons[0].api_url()],
                         capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "120"})
    for stage in view["plan"]["stages"]:
        assert f"{stage['start']}-{stage['end'] - 1}" in out.stdout
    assert out.stdout.count("loaded") == 3


def test_bad_requests_and_a_model_that_does_not_fit_get_openai_errors(cluster):
    daemons = cluster(2, memory="1MB")  # the tiny model needs more than 2 x 1 MB
    node = daemons[0]
    status, body = post(node, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4})
    assert status == 503
    reason = wait_for(lambda: node.status()["no_fit"], 20, "the planner's verdict")
    status, body = post(node, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 4})
    assert status == 503 and "does not fit" in body["error"]["message"] and reason in body["error"]["message"]
    assert post(node, "/v1/completions", {"model": "nope", "prompt": "hi"})[0] == 404
    assert post(node, "/v1/chat/completions", {"model": "tiny", "messages": "not a list"})[0] == 400
    host, port = node.api_url().split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("POST", "/v1/completions", b"{not json", {"Content-Type": "application/json"})
    assert connection.getresponse().status == 400
    assert node.alive() and node.status()["node"]["name"] == "n0"
