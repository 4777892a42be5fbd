"""Every default in one home, shown where an operator reads it: each command's --help shows
the default of every flag, the README's flag tables list every flag of `tbmesh daemon` and
`tbmesh plan` with the default --help shows, and a daemon started with no flags runs with
tbmesh.node.config.DaemonConfig's defaults. Any drift fails here."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tbmesh.cli.main import app

README = Path(__file__).resolve().parent.parent / "README.md"
# where a help string must not say a default (rich reads "[default: ...]" as markup and drops it;
# show_default is the one way)
SAYS_DEFAULT = re.compile(r"[\[(]default\b|\bdefault\s*:", re.IGNORECASE)


# typer vendors click: its commands and options are known by their protocol, not by click's classes
Command = Option = Any


def commands() -> dict[str, Command]:
    """Every command by its name as typed after `tbmesh`: "plan", ..., "model tiny"."""
    found: dict[str, Command] = {}

    def walk(command: Command, name: str) -> None:
        if hasattr(command, "commands"):  # a group
            for sub_name, sub in command.commands.items():
                walk(sub, f"{name} {sub_name}".strip())
        else:
            found[name] = command

    walk(get_command(app), "")
    assert {"plan", "daemon", "install", "model tiny"} <= found.keys()  # the walk found the commands
    return found


def options(command: Command) -> list[Option]:
    return [p for p in command.params if p.param_type_name == "option"]


def shown_default(option: Option) -> str | None:
    """The default --help shows for `option` (typer's rules), None when it shows none."""
    if isinstance(option.show_default, str):
        return f"({option.show_default})"  # a default described in words
    default = option.default
    if option.is_flag and option.secondary_opts:  # --x/--no-x: the name of the default
        return (option.opts[0] if default else option.secondary_opts[0]).removeprefix("--")
    if default is None or default is False or (isinstance(default, (list, tuple)) and not default):
        return None
    return str(default)


def help_text(name: str) -> str:
    """`tbmesh NAME --help` as one line of words (wide enough that rich wraps nothing)."""
    result = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": "2000", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return re.sub(r"[\s│╭╮╰╯─]+", " ", result.output)


def test_help_shows_the_default_of_every_flag_of_every_command():
    missing = []
    for name, command in commands().items():
        shown = help_text(name)
        for option in options(command):
            default = shown_default(option)
            if default is not None and f"[default: {default}]" not in shown:
                missing.append(f"tbmesh {name} {option.opts[0]}: [default: {default}]")
    assert not missing, "--help does not show: " + "; ".join(missing)
    assert "[default: (4096, the daemon's)]" in help_text("plan")  # the --context the issue found bare


def test_no_help_string_writes_a_default_itself():
    written = [f"tbmesh {name} {option.opts[0]}: {option.help!r}"
               for name, command in commands().items() for option in options(command)
               if SAYS_DEFAULT.search(option.help or "")]  # fmt: skip
    assert not written, "give these defaults with show_default: " + "; ".join(written)


def test_the_rule_for_help_strings_catches_a_written_default():
    assert SAYS_DEFAULT.search("Tokens of KV cache to leave room for [default: 4096].")
    assert SAYS_DEFAULT.search("Control port for peers (default: 7470).")
    assert not SAYS_DEFAULT.search("the conversations of FILE, or of 'default': the built-in ones")


# --- the README's flag tables -------------------------------------------------------------

TABLE_HEADER = "| flag | default | meaning |"
TABLES = {"daemon": "Running the daemon", "plan": "Would my model fit on my Macs?"}  # command: section


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def flag_table(section: str) -> list[tuple[set[str], str, str]]:
    """The rows of the section's flag table: (the flags the row names, its default, the row)."""
    lines = section.splitlines()
    start = lines.index(TABLE_HEADER) + 2  # past the header and its rule
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((set(re.findall(r"`(--[a-z][a-z-]*)", cells[0])), cells[1], line))
    return rows


def readme_default(option: Option) -> str:
    """What the README's default column says for `option`: --help's words without the brackets
    typer puts around a default described in words; empty when --help shows none."""
    shown = shown_default(option)
    if shown is None:
        return ""
    return shown[1:-1] if isinstance(option.show_default, str) else shown


@pytest.mark.parametrize("command_name", sorted(TABLES))
def test_the_readme_flag_table_lists_every_flag_with_its_default(command_name: str):
    command = commands()[command_name]
    rows = flag_table(readme_section(TABLES[command_name]))
    drift = []
    for option in options(command):
        names = set(option.opts) | set(option.secondary_opts)
        matching = [row for row in rows if row[0] == names]
        if len(matching) != 1:
            drift.append(f"{'/'.join(sorted(names))}: {len(matching)} rows name it")
        elif matching[0][1] != readme_default(option):
            drift.append(f"{option.opts[0]}: the README says {matching[0][1]!r}, the code "
                         f"{readme_default(option)!r}")  # fmt: skip
    known = [set(o.opts) | set(o.secondary_opts) for o in options(command)]
    drift += [f"no such flag of tbmesh {command_name}: {row}" for names, _, row in rows if names not in known]
    assert not drift, f"README's table of tbmesh {command_name} drifted: " + "; ".join(drift)


def test_the_readme_lists_the_daemon_options_install_passes_on():
    section = readme_section("Install on Macs")
    sentence = section[section.index("`tbmesh install` takes the `tbmesh daemon` options"):]
    sentence = sentence[: sentence.index("; an option not given")]
    listed = set(re.findall(r"`(--[a-z][a-z-]*)`", sentence))
    install, daemon = commands()["install"], commands()["daemon"]
    own = {"--user", "--user-agent", "--dry-run"}  # install's own, not the daemon's
    passed = {name for o in options(install) for name in o.opts + o.secondary_opts} - own
    assert listed == passed
    assert passed <= {name for o in options(daemon) for name in o.opts + o.secondary_opts}


def test_the_table_reader_sees_a_wrong_default():
    rows = flag_table(f"{TABLE_HEADER}\n| --- | --- | --- |\n| `--parallel auto\\|pipeline\\|tensor` | pipeline | how |\n")
    assert rows == [({"--parallel"}, "pipeline", rows[0][2])]
    parallel = next(o for o in options(commands()["daemon"]) if o.name == "parallel")
    assert readme_default(parallel) == "auto" != rows[0][1]


# --- the one home --------------------------------------------------------------------------


def test_a_daemon_started_with_no_flags_runs_with_the_configs_defaults(monkeypatch: pytest.MonkeyPatch):
    import tbmesh.cli.daemon as daemon_command
    import tbmesh.node.daemon as node_daemon
    from tbmesh.node.config import DaemonConfig

    started: list[Any] = []

    class Daemon:
        def __init__(self, config: DaemonConfig) -> None:
            started.append(config)

        async def run(self) -> None:
            pass

    monkeypatch.setattr(node_daemon, "Daemon", Daemon)
    monkeypatch.setattr(daemon_command, "_run_event_loop", asyncio.run)  # no uvloop: nothing runs long
    monkeypatch.setattr(daemon_command, "_refuse_exposed", lambda interfaces: None)  # no Thunderbolt here
    monkeypatch.setattr("logging.basicConfig", lambda **kwargs: None)
    result = CliRunner().invoke(app, ["daemon"])
    assert result.exit_code == 0, result.output
    assert started == [DaemonConfig()]


def test_the_client_dials_the_api_where_a_daemon_listens_by_default():
    from tbmesh.cli.client import DEFAULT_API
    from tbmesh.node.config import DaemonConfig

    assert DEFAULT_API == f"http://{DaemonConfig.api_host}:{DaemonConfig.api_port}" == "http://127.0.0.1:7471"


def test_the_choices_of_parallel_are_the_cores_and_the_daemons_default_is_one():
    from tbmesh.core.groups import PARALLEL
    from tbmesh.node.config import DaemonConfig

    assert PARALLEL == ("auto", "pipeline", "tensor")
    assert DaemonConfig.parallel == "auto"
    plan = next(o for o in options(commands()["plan"]) if o.name == "parallel")
    assert plan.default == DaemonConfig.parallel  # `tbmesh plan` plans as the daemon would
