"""schemathesis fuzzes a live daemon from the OpenAPI document it serves (tests/api_fuzz.py):
valid and invalid requests to every operation, and methods they do not take, with every check
of schemathesis and two of ours. So: no 5xx; every answer (status, media type, body, each
server-sent event) as the document describes it; every error in the API's format; every
invalid request refused with a 4xx. A few examples here; bench/fuzz_api.py runs thousands.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api_fuzz import fuzz
from daemons import DaemonProcess, serving_alone

EXAMPLES = 5  # per operation, besides schemathesis's coverage cases (CI's time budget)
CONTEXT = 48  # tokens: the longest answer is short


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[DaemonProcess]:
    daemon = serving_alone("fuzz", tmp_path_factory.mktemp("fuzz"), model_dir, ["--context", str(CONTEXT)])
    yield daemon
    daemon.kill()


def test_the_api_answers_as_its_document_says(daemon: DaemonProcess, tmp_path: Path) -> None:
    run = fuzz(daemon.api_url(), EXAMPLES, tmp_path)
    assert run.exit_code == 0, run.output[-20000:]
    figures = run.figures()
    assert figures["5xx"] == 0 and figures["failures"] == {} and figures["errors"] == [], figures
    # every operation was tried, answers and errors both: the run proves something
    assert run.report["operations"]["tested"] == 18, run.report["operations"]  # all but /openapi.json itself
    assert {200, 400, 404, 405} <= figures["by_status"].keys(), figures
    streamed = [e for e in run.exchanges if e["response"]["content"]["mimeType"].startswith("text/event-stream")]
    assert streamed, "no streamed answer was checked"
    ndjson = [e for e in run.exchanges if e["response"]["content"]["mimeType"].startswith("application/x-ndjson")]
    assert ndjson, "no streamed Ollama answer was checked"
    assert daemon.alive()
