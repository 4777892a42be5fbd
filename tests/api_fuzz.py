"""The fuzzing of the HTTP API from its OpenAPI document, shared by tests/test_openapi_fuzz.py
(a few examples) and bench/fuzz_api.py (thousands): schemathesis's command line (`st run`)
against a live daemon, configured by tests/schemathesis.toml, which loads this module for two
checks of our own besides all of schemathesis's:

- every error, whatever its path and method (an unknown path, a method a path does not take),
  is in the format of the API the path belongs to: the error schema its operation's responses
  refer to (OpenAI's Error, Anthropic's AnthropicError, Ollama's OllamaError);
- a request the document calls valid is served, or refused only for what no schema of the
  request can foresee (the prompt's length in tokens, the vocabulary, the chat template: the
  codes tbmesh.http.common.MODEL_DEPENDENT_CODES) or JSON Schema cannot say (a string that must
  hold JSON, fields that must agree: UNDESCRIBABLE_CODES); Anthropic's and Ollama's errors give
  the code in a header. It replaces schemathesis's
  positive_data_acceptance, which would take those 400s for a fault of the document.

The command line, not schemathesis's pytest integration: its lazy loader (from_fixture, for a
server that a fixture starts) reads a pytest node attribute that pytest 9.2 no longer has.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema_rs
import schemathesis

from tbmesh.http import anthropic as anthropic_api
from tbmesh.http import ollama as ollama_api
from tbmesh.http.common import CODE_HEADER, MODEL_DEPENDENT_CODES, UNDESCRIBABLE_CODES
from tbmesh.http.responses import RESPONSE_NOT_FOUND

CONFIG = Path(__file__).with_name("schemathesis.toml")
# schemathesis's failures that say an answer is not as the document describes it
SCHEMA_VIOLATIONS = {"UndefinedStatusCode", "MissingContentType", "UndefinedContentType", "MalformedMediaType",
                     "MissingHeaders", "JsonSchemaError", "MalformedJson", "ContentDeserializationError",
                     "DiscriminatorMismatch"}  # fmt: skip


# --- the checks ----------------------------------------------------------------------------


def _json_body(response: schemathesis.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON: {response.content[:300]!r}") from None


def error_schema(case: schemathesis.Case, status: int) -> dict[str, Any]:
    """The error schema of `case`'s operation for `status`: the one its documented response for
    that status refers to, else the one its other errors refer to (an undocumented 404 or 405
    is in the format of the API the path belongs to), else that of the API of its path (an
    operation that documents no error: Ollama's under /api, Anthropic's under /v1/messages,
    OpenAI's elsewhere)."""
    document = case.operation.schema.raw_schema
    responses = document["paths"][case.operation.path][case.operation.method.lower()]["responses"]
    errors = [responses[str(status)]] if str(status) in responses else \
        [answer for code, answer in responses.items() if code[0] in "45"]  # fmt: skip
    path = case.operation.path
    names = {a["content"]["application/json"]["schema"]["$ref"].rpartition("/")[2] for a in errors} or \
        {ollama_api.ERROR if ollama_api.owns(path) else anthropic_api.ERROR if anthropic_api.owns(path) else "Error"}
    assert len(names) == 1, f"{case.operation.label}: errors in several schemas: {names}"
    schemas = document["components"]["schemas"]
    # its $refs resolve against the document's components
    return {**schemas[names.pop()], "components": {"schemas": schemas}}


def error_code(response: schemathesis.Response) -> str | None:
    """The error's code: OpenAI's error.code, or the header of Anthropic's and Ollama's errors."""
    body = _json_body(response)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return response.headers.get(CODE_HEADER.lower(), [None])[0] or code


@schemathesis.deserializer(ollama_api.NDJSON)
def ndjson_lines(ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> list[Any]:
    """Ollama's streamed answers: one JSON value a line, read as an array (as the document
    describes the stream)."""
    return [json.loads(line) for line in response.content.decode("utf-8").splitlines() if line.strip()]


@schemathesis.check
def errors_in_api_format(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                         case: schemathesis.Case) -> None:  # fmt: skip
    if response.status_code < 400:
        return
    schema = error_schema(case, response.status_code)
    problem = next(jsonschema_rs.validator_for(schema).iter_errors(_json_body(response)), None)
    if problem is not None:
        raise AssertionError(f"a {response.status_code} not in the API's error format ({problem.message}): "
                             f"{response.content[:300]!r}")


@schemathesis.check
def valid_requests_are_served(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                              case: schemathesis.Case) -> None:  # fmt: skip
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code < 400:
        return
    request = response.request
    if request.method != case.operation.method.upper():
        return  # a probe of a method the path does not take (schemathesis's unsupported_method)
    if case.body is not None and not request.headers.get("Content-Type", "").startswith("application/json"):
        return  # a probe of another media type: the API reads JSON whatever the header says
    if response.status_code == 400 and error_code(response) in MODEL_DEPENDENT_CODES + UNDESCRIBABLE_CODES:
        return
    if response.status_code == 404 and error_code(response) in anthropic_api.THREAD_ERROR_CODES:
        return  # a thread continuation of a conversation not kept: what no schema of the request can know
    if response.status_code == 404 and error_code(response) == RESPONSE_NOT_FOUND:
        return  # an id the server makes (GET /v1/responses/{id}): a fuzzed one is none of them
    raise AssertionError(f"a request the document calls valid was refused: {response.status_code} "
                         f"{response.content[:300]!r}")


# --- a run ---------------------------------------------------------------------------------


@dataclass
class FuzzRun:
    exit_code: int
    output: str  # what `st run` printed: the failures with their curl commands
    report: dict[str, Any]  # its JSON run report
    exchanges: list[dict[str, Any]]  # its HAR log's entries: every request and its answer

    def figures(self) -> dict[str, Any]:
        by_status = collections.Counter(e["response"]["status"] for e in self.exchanges)
        failures = {f"{f['code']} {f['title']}": f["count"] for f in self.report["failures"]}
        return {
            "requests": len(self.exchanges),
            "by_status": dict(sorted(by_status.items())),
            "5xx": sum(n for status, n in by_status.items() if status >= 500),
            "schema_violations": sum(f["count"] for f in self.report["failures"] if f["type"] in SCHEMA_VIOLATIONS),
            "failures": failures,  # unique failures by kind, schema violations among them
            "errors": self.report["errors"],  # schemathesis's own (a request it could not send, ...)
            "test_cases": self.report["test_cases"],
            "seconds": round(self.report["running_time"], 1),
            "exit_code": self.exit_code,
        }


def fuzz(api_url: str, examples: int, reports: Path, seed: int | None = None, mode: str | None = None,
         every_failure: bool = False, timeout: float = 3600) -> FuzzRun:  # fmt: skip
    """`st run` against the daemon at `api_url`: up to `examples` requests per operation in the
    fuzzing phase, besides the coverage and stateful phases' own. `mode`: "positive" (valid
    requests only) or "negative" (invalid ones) rather than both. `every_failure`: go on
    after an operation's first failure (to count them all)."""
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
               f"{api_url}/openapi.json", "--max-examples", str(examples), "--workers", "1",
               "--request-timeout", "60", "--report", "json,har", "--report-dir", str(reports)]  # fmt: skip
    if seed is not None:
        command += ["--seed", str(seed)]
    if mode is not None:
        command += ["--mode", mode]
    if every_failure:
        command.append("--continue-on-failure")
    path = os.pathsep.join(p for p in (str(CONFIG.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200", "NO_COLOR": "1"}  # our checks' module on the path
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    output = done.stdout + done.stderr
    report = next(reports.glob("json-*.json"), None)
    har = next(reports.glob("har-*.json"), None)
    if report is None or har is None:
        raise AssertionError(f"st run made no report (exit {done.returncode}):\n{output[-5000:]}")
    return FuzzRun(done.returncode, output, json.loads(report.read_text()),
                   json.loads(har.read_text())["log"]["entries"])
