"""A client of a daemon's HTTP API, standard library only: what `tbmesh status`, `tbmesh chat`
and `tbmesh demo` use."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

DEFAULT_API = "http://127.0.0.1:7471"


class ApiProblem(ConnectionError):
    """The daemon does not answer, or answers with an error: one line to show."""


def open_api(api: str, path: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    """An HTTP response of the daemon's API (POST when there is a body); raises ApiProblem."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        with error:
            raise ApiProblem(_error_message(error.code, error.read())) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ApiProblem(f"no tbmesh daemon answers at {api} ({getattr(error, 'reason', error)}); "
                         "start one with `tbmesh daemon` (or point --api at one)") from None


def fetch_status(api: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET /status; raises ApiProblem (a ConnectionError) with a one-line reason."""
    with open_api(api, "/status", timeout=timeout) as response:
        try:
            return json.loads(response.read())
        except (OSError, ValueError) as error:
            raise ApiProblem(f"the daemon at {api} sent a broken status ({error})") from None


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
