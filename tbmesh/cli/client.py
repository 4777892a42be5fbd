"""A client of a daemon's HTTP API, standard library only (and the status's types): what
`tbmesh status`, `tbmesh chat` and `tbmesh demo` use."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from tbmesh.core.jsonform import from_json
from tbmesh.core.status import Status
from tbmesh.node.config import api_url

DEFAULT_API = api_url()  # the local daemon's, started with its default --api-host and --api-port
API_KEY_ENV = "TBMESH_API_KEY"  # where `tbmesh status` and `tbmesh chat` find the daemon's --api-key


class ApiProblem(ConnectionError):
    """The daemon does not answer, or answers with an error: one line to show."""


def open_api(api: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5.0,
             api_key: str | None = None) -> Any:  # fmt: skip
    """An HTTP response of the daemon's API (POST when there is a body), with the daemon's API
    key if it has one; raises ApiProblem."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(api.rstrip("/") + path, data=data, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        with error:
            message = _error_message(error.code, error.read())
        if error.code == 401:
            message += f" (give the daemon's key with --api-key or {API_KEY_ENV})"
        raise ApiProblem(message) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ApiProblem(f"no tbmesh daemon answers at {api} ({getattr(error, 'reason', error)}); "
                         "start one with `tbmesh daemon` (or point --api at one)") from None


def fetch_status_json(api: str, timeout: float = 2.0, api_key: str | None = None) -> dict[str, Any]:
    """GET /status as the daemon sends it; raises ApiProblem (a ConnectionError) with a one-line reason."""
    with open_api(api, "/status", timeout=timeout, api_key=api_key) as response:
        try:
            return json.loads(response.read())
        except (OSError, ValueError) as error:
            raise ApiProblem(f"the daemon at {api} sent a broken status ({error})") from None


def fetch_status(api: str, timeout: float = 2.0, api_key: str | None = None) -> Status:
    """GET /status, read typed (what an older or newer daemon lacks reads as empty)."""
    return from_json(Status, fetch_status_json(api, timeout, api_key))


def stream_answer(response: Any, write: Callable[[str], None]) -> None:
    """Write the text of each server-sent chunk (chat or completion) as it arrives, to [DONE].
    A thinking model's reasoning (reasoning_content) is written between <think> and </think>,
    as the model wrote it."""
    thinking = False
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue  # the blank line between events, comments
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            if thinking:
                write("</think>")
            return
        event = json.loads(data)
        if "error" in event:
            raise ApiProblem(_error_message(500, data.encode()))
        for choice in event.get("choices", []):  # chat chunks have a delta, completions text
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            text = delta.get("content") or choice.get("text")
            if reasoning:
                write(reasoning if thinking else "<think>" + reasoning)
                thinking = True
            if text:
                write("</think>" + text if thinking else text)
                thinking = False
    raise ApiProblem("the answer ended before it was complete")


def _error_message(status: int, body: bytes) -> str:
    """The message of an OpenAI-style error body, else the status."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"the API answered HTTP {status}"
