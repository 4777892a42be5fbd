"""`tbmesh status` and `tbmesh chat`: the cluster through the local daemon's API."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console

from tbmesh.cli.app import one_line
from tbmesh.cli.client import (
    API_KEY_ENV,
    DEFAULT_API,
    ApiProblem,
    fetch_status,
    fetch_status_json,
    open_api,
    stream_answer,
)
from tbmesh.core.jsonform import from_json
from tbmesh.core.status import Status


STATUS_REFRESH_S = 0.5  # the live screen polls the daemon twice a second
API_KEY_HELP = "The daemon's --api-key, if it has one."


def status(
    api: str = typer.Option(DEFAULT_API, "--api", help="The daemon's API URL."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV, help=API_KEY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the status JSON and exit."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
) -> None:  # fmt: skip
    """Watch the cluster as the local daemon sees it: a live screen, refreshed twice a second
    (Ctrl-C to leave). When stdout is not a terminal (a pipe, a script), print one frame and
    exit, as with --once."""
    try:
        data = fetch_status_json(api, api_key=api_key)
    except ConnectionError as error:
        print(f"error: {error}", file=sys.stderr)
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(data, indent=2))  # as the daemon sent it
        return
    from tbmesh.cli import status_view

    console = Console(highlight=False)
    if once or not console.is_terminal:
        console.print(status_view.render(from_json(Status, data), console.width))
        return
    try:
        _watch_status(api, from_json(Status, data), console, api_key)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves the screen: exit 0, no traceback


def _watch_status(api: str, status: Status, console: Console, api_key: str | None) -> None:
    """Redraw from GET /status until Ctrl-C; while the daemon does not answer, keep the last
    frame under a red line and keep asking."""
    import time

    from rich.live import Live

    from tbmesh.cli import status_view

    error = None
    # the alternate screen: a full-screen view that leaves the shell as it was on exit
    with Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            width, height = console.size  # read each time: the terminal may be resized
            live.update(status_view.render(status, width, height, error), refresh=True)
            time.sleep(STATUS_REFRESH_S)
            try:
                status, error = fetch_status(api, timeout=1.0, api_key=api_key), None
            except ConnectionError:
                error = f"daemon not answering at {api}: its last status below; retrying"


# --- chat with the cluster's model -------------------------------------------------------

CHAT_READ_TIMEOUT = 600.0  # s between two pieces of the answer (a long prefill on a big model)


def chat(
    prompt: str = typer.Argument(..., help="What to ask."),
    api: str = typer.Option(DEFAULT_API, "--api", help="The daemon's API URL."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV, help=API_KEY_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="The model id.", show_default="the first the daemon serves"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens in the answer.", show_default="what the context leaves"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 picks the likeliest token each step.", show_default="the API's"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sample the same answer every time."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt."),
) -> None:  # fmt: skip
    """Ask the cluster's model through the local daemon's API; the answer streams as it comes."""
    wrote = False

    def write(text: str) -> None:
        nonlocal wrote
        wrote = True
        sys.stdout.write(text)
        sys.stdout.flush()

    def fail(message: str, code: int = 1) -> None:
        if wrote:
            print()  # end the half-written answer's line first
        print(f"error: {one_line(message)}", file=sys.stderr)
        raise typer.Exit(code)

    try:
        if model is None:
            with open_api(api, "/v1/models", api_key=api_key) as response:
                served = [m["id"] for m in json.loads(response.read())["data"]]
            if not served:
                raise ApiProblem(f"the daemon at {api} serves no model (start it with --model DIR)")
            model = served[0]
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": prompt}]  # fmt: skip
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        for key, value in (("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
            if value is not None:
                body[key] = value
        with open_api(api, "/v1/chat/completions", body, timeout=CHAT_READ_TIMEOUT, api_key=api_key) as response:
            stream_answer(response, write)
        print()
    except ApiProblem as error:
        fail(str(error))
    except (OSError, ValueError) as error:  # the connection dropped mid-answer, a garbled event
        fail(f"the answer from {api} broke off: {error}")
    except KeyboardInterrupt:  # closing the connection cancels the generation in the cluster
        print()
        raise typer.Exit(130)

