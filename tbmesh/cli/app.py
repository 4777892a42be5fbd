"""The `tbmesh` Typer app and what every command shares: a mistake is one line on stderr."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer

EXIT_USAGE = 2  # a bad flag or argument, as click's own usage errors


class _App(typer.Typer):
    """A Typer app whose usage errors are one line on stderr, like the commands' own errors."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            print("aborted", file=sys.stderr)
            sys.exit(1)
        except Exception as error:
            # click's usage errors; typer vendors click, so match its protocol, not its classes
            if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
                raise
            if type(error).__name__ == "NoArgsIsHelpError":
                error.show()  # type: ignore[attr-defined]  # the help text
            else:
                print(f"error: {one_line(error.format_message())}", file=sys.stderr)
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = _App(pretty_exceptions_enable=False, no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Zero-config cluster of Thunderbolt-cabled Macs that runs models too big for one of them."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail_usage(message: str) -> NoReturn:
    """An operator's mistake: one line, `error: ...`, and exit status 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)
