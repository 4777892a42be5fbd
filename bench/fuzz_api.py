"""Fuzz the HTTP API of a live daemon from its OpenAPI document, for long.

The run of tests/test_openapi_fuzz.py (tests/api_fuzz.py: schemathesis's `st run` with every
check of its own and two of ours, configured by tests/schemathesis.toml) with many more
examples, going on after failures to count them all: one `tbmesh daemon` on loopback, a
cluster of its own, serving a random tiny llama (tbmesh.testbed.tiny, made once under
/tmp/tbmesh-bench) with a short --context so that answers stay short.

Figures: requests sent, answers by status, 5xx (goal 0), schema violations (answers the
document does not describe; goal 0), unique failures by kind (goal none); and, per API
(OpenAI, Anthropic, Ollama, tbmesh's own), the answers by status, the answers generated (a 200
from a generation endpoint) and how many of them streamed, and the codes of the 400s. Writes
bench/results/fuzz_api.json; `st run`'s own reports (JSON, and HAR: every request and answer)
stay in --reports.

    python bench/fuzz_api.py [--examples 2000] [--mode all|positive|negative] [--context 48]
                             [--seed N] [--reports DIR] [--out bench/results/fuzz_api.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from api_fuzz import fuzz  # noqa: E402
from daemons import serving_alone  # noqa: E402
from provenance import provenance  # noqa: E402

from tbmesh.http.anthropic import CODE_HEADER  # noqa: E402
from tbmesh.testbed.tiny import make_tiny_model  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "tbmesh-bench"
GENERATION = {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/api/chat", "/api/generate"}
STREAMED = {"text/event-stream", "application/x-ndjson"}


def api_of(path: str) -> str:
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "tbmesh"


def error_code(response: dict[str, Any]) -> str | None:
    """A HAR answer's error code: the X-Tbmesh-Error-Code header, or OpenAI's error.code."""
    for header in response.get("headers", []):
        if header["name"].lower() == CODE_HEADER.lower():
            return header["value"]
    try:
        error = json.loads(response.get("content", {}).get("text") or "null")
    except ValueError:
        return None
    error = error.get("error") if isinstance(error, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def breakdown(exchanges: list[dict[str, Any]]) -> dict[str, Any]:
    """The HAR log's exchanges counted per API, and in all: answers by status, answers generated
    (a 200 to a POST on a generation endpoint) and how many streamed, the 400s' codes."""
    def counts() -> dict[str, Any]:
        return {"requests": 0, "by_status": collections.Counter(), "generated": 0, "streamed": 0,
                "error_codes": collections.Counter()}

    total, by_api = counts(), collections.defaultdict(counts)
    for exchange in exchanges:
        request, response = exchange["request"], exchange["response"]
        path = urlsplit(request["url"]).path.rstrip("/") or "/"
        status = response["status"]
        mime = response.get("content", {}).get("mimeType", "").split(";")[0].strip()
        for c in (total, by_api[api_of(path)]):
            c["requests"] += 1
            c["by_status"][str(status)] += 1
            if status == 200 and request["method"] == "POST" and path in GENERATION:
                c["generated"] += 1
                c["streamed"] += mime in STREAMED
            if status == 400:
                c["error_codes"][str(error_code(response))] += 1

    def plain(c: dict[str, Any]) -> dict[str, Any]:
        return {**c, "by_status": dict(sorted(c["by_status"].items())), "error_codes": dict(c["error_codes"].most_common())}

    return {**plain(total), "by_api": {api: plain(c) for api, c in sorted(by_api.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="per operation")
    parser.add_argument("--mode", choices=("all", "positive", "negative"), default="all",
                        help="valid requests, invalid ones, or both")
    parser.add_argument("--context", type=int, default=48, help="the daemon's --context, in tokens")
    parser.add_argument("--seed", type=int, default=None, help="schemathesis's seed (default: a random one)")
    parser.add_argument("--reports", type=Path, default=None, help="where st run's reports go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_api.json")
    args = parser.parse_args()

    # the tests' model (tests/serving.py): 8 layers, 128 wide, 512 tokens
    model = CACHE / "fuzz-tiny"
    if not (model / "config.json").exists():
        make_tiny_model(model, layers=8, hidden=128, vocab=512)
    reports = args.reports or Path(tempfile.mkdtemp(prefix="fuzz-api-reports-"))
    reports.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-api-") as state:
        daemon = serving_alone("fuzz", Path(state), model, ["--context", str(args.context)])
        try:
            run = fuzz(daemon.api_url(), args.examples, reports, seed=args.seed, mode=args.mode,
                       every_failure=True, timeout=24 * 3600)
            alive = daemon.alive()
        finally:
            daemon.kill()

    figures = run.figures()
    result = {
        **provenance(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(),
        "settings": {"examples": args.examples, "mode": args.mode, "context": args.context,
                     "seed": run.report["seed"]},
        **figures,
        "breakdown": breakdown(run.exchanges),
        "daemon_alive_after": alive,
        "reports": str(reports),
    }  # fmt: skip
    print(f"{figures['requests']} requests in {figures['seconds']} s (seed {run.report['seed']}): "
          f"by status {figures['by_status']}")
    print(f"5xx: {figures['5xx']}  schema violations: {figures['schema_violations']}  "
          f"failures: {figures['failures'] or 'none'}  schemathesis errors: {len(figures['errors'])}  "
          f"daemon alive after: {alive}")
    if run.exit_code != 0:
        print(run.output[-20000:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}; st run's reports in {reports}")


if __name__ == "__main__":
    main()
