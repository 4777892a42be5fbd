"""`tbmesh daemon`, and `tbmesh install` and `uninstall`, which run it as a launchd service.

Every default of these flags is the node's (tbmesh.node.config.DaemonConfig, the serving
engine's tbmesh.serving.settings.ServingSettings): the daemon's flags take them, install shows
them (an option not given is left out of the plist, so the daemon uses its own).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer

from tbmesh.cli.app import fail_usage, one_line
from tbmesh.core.groups import MIN_SPEEDUP, PARALLEL
from tbmesh.core.units import parse_size
from tbmesh.node.config import FOUND_DEFAULTS, LOG_LEVEL, LOG_LEVELS, MODEL_ALIAS_HELP, DaemonConfig
from tbmesh.serving.settings import ServingSettings


def _run_event_loop(main: Any) -> Any:
    """uvloop when it is installed (it is on macOS and Linux), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)


def _check_daemon_flags(
    parallel: Optional[str] = None,
    replicas: Optional[int] = None,
    prefill_chunk: Optional[int] = None,
    max_batch: Optional[int] = None,
    disk_slack: Optional[str] = None,
    api_allow_hosts: Sequence[str] = (),
) -> Optional[int]:
    """The checks of `tbmesh daemon`'s flags that `tbmesh install` passes on too (None: not given),
    a bad one a one-line usage error; the --disk-slack in bytes (None: not given)."""
    for host in api_allow_hosts:
        if not host.strip() or any(c in host for c in " /@") or host.count(":") == 1:
            fail_usage(f"bad --api-allow-host {host!r}: give a host name as clients write it in the API's URL, "
                       "without scheme or port (e.g. studio.example.com)")
    if parallel is not None and parallel not in PARALLEL:
        fail_usage(f"bad --parallel {parallel!r}: use {', '.join(PARALLEL)}")
    for flag, value in (("--replicas", replicas), ("--prefill-chunk", prefill_chunk), ("--max-batch", max_batch)):
        if value is not None and value < 1:
            fail_usage(f"{flag} must be 1 or more")
    slack = None
    if disk_slack is not None:
        try:
            slack = parse_size(disk_slack)
        except ValueError as error:
            fail_usage(f"--disk-slack: {error}")
    return slack


def _refuse_exposed(interface: list[str]) -> None:
    """Without a secret, serve only where no stranger can reach: Thunderbolt cables, loopback."""
    from tbmesh.net.interfaces import exposed_interfaces

    exposed = exposed_interfaces(interface)
    if exposed:
        fail_usage(f"--interface {', '.join(exposed)} is not Thunderbolt: without a cluster secret anyone on "
                   "that network could join the cluster and read its traffic; give every Mac the same "
                   "--secret-file F (or pass --insecure)")


ALLOW_HOST_HELP = ("Answer API requests for this host name too (repeat), as clients write it in the API's URL: "
                   "a request for another name is refused, as a web page's DNS rebinding would be.")
LOG_LEVEL_HELP = f"{', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}."
PARALLEL_HELP = (f"How the leader splits the model: auto (tensor groups of Macs cabled all to all where the cost model "
                 f"projects a decode at least {MIN_SPEEDUP}x faster, else layers over Macs), pipeline (layers over Macs "
                 "only) or tensor (groups wherever the model and the cables allow).")


def daemon(
    interface: list[str] = typer.Option([], "--interface", help="Serve on this interface (repeat).", show_default=FOUND_DEFAULTS["interfaces"]),
    port: int = typer.Option(DaemonConfig.port, "--port", help="Control port for peers; 0 = any free."),
    api_host: str = typer.Option(DaemonConfig.api_host, "--api-host", help="Where the HTTP API listens."),
    api_port: int = typer.Option(DaemonConfig.api_port, "--api-port", help="HTTP API port; 0 = any free."),
    ollama_port: Optional[int] = typer.Option(None, "--ollama-port", help="Serve the API on this port too, for Ollama clients (Ollama's is 11434); 0 = any free."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Every API request but GET /health must carry this key (Bearer or x-api-key)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the API key from a file (a key on the command line shows in ps)."),
    api_allow_host: list[str] = typer.Option([], "--api-allow-host", help=ALLOW_HOST_HELP, show_default=FOUND_DEFAULTS["api_allow_hosts"]),
    model_alias: list[str] = typer.Option([], "--model-alias", metavar="PATTERN=NAME", help=MODEL_ALIAS_HELP),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where the node id is kept.", show_default=FOUND_DEFAULTS["state_dir"]),
    name: Optional[str] = typer.Option(None, "--name", help="This Mac's name in the cluster.", show_default=FOUND_DEFAULTS["name"]),
    cluster: str = typer.Option(DaemonConfig.cluster, "--cluster", help="Only Macs with the same cluster name join."),
    model: Optional[Path] = typer.Option(None, "--model", help="The mlx-lm model directory to plan and serve, or only its name: the weights this Mac lacks come from its peers."),
    replicas: int = typer.Option(DaemonConfig.replicas, "--replicas", help="Copies of each layer the cluster keeps on its Macs' disks (as their room allows), so that a dead Mac's layers can still be fetched."),
    disk_slack: Optional[str] = typer.Option(None, "--disk-slack", help="The most bytes of the model this Mac keeps on disk beyond its own layers, e.g. 200GB.", show_default=FOUND_DEFAULTS["disk_slack"]),
    secret: Optional[str] = typer.Option(None, "--secret", help="Cluster secret: peers without it are refused."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Read the cluster secret from a file."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve without a cluster secret on interfaces that are not Thunderbolt (anyone on that network can then join the cluster and read its traffic)."),
    context: int = typer.Option(ServingSettings.context, "--context", help="Tokens of KV cache each stage keeps room for."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Pretend this much memory is usable (tests, demos), e.g. 24GB.", show_default=FOUND_DEFAULTS["memory_usable"]),
    probe: bool = typer.Option(DaemonConfig.probe_links, "--probe/--no-probe", help="Measure each link's bandwidth when it appears."),
    mqtt: Optional[str] = typer.Option(None, "--mqtt", help="Publish state and events to this MQTT broker: mqtt://host[:port]."),
    resume_wait: float = typer.Option(ServingSettings.resume_wait, "--resume-wait", help="Seconds a request in flight waits for the cluster to serve the model again (after a Mac leaves) before it fails."),
    prefill_chunk: int = typer.Option(ServingSettings.prefill_chunk, "--prefill-chunk", help="The most prompt tokens one step prefills; streams already decoding take a step between two chunks."),
    max_batch: int = typer.Option(ServingSettings.max_batch, "--max-batch", help="The most requests one decode step runs."),
    prefix_cache: bool = typer.Option(ServingSettings.prefix_cache, "--prefix-cache/--no-prefix-cache", help="Keep the KV of recent prompts and answers, so a prompt that starts the same prefills only the rest."),
    parallel: str = typer.Option(DaemonConfig.parallel, "--parallel", help=PARALLEL_HELP + " A group's members run one worker process each (see tbmesh plan --parallel for the planner's reasons)."),
    log_level: str = typer.Option(LOG_LEVEL, "--log-level", help=LOG_LEVEL_HELP),
) -> None:  # fmt: skip
    """Run this Mac's node: discover peers on Thunderbolt, join the cluster, serve the API."""
    import logging

    from tbmesh.node.daemon import Daemon as NodeDaemon
    from tbmesh.node.daemon import DaemonFailed, StartupError

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        fail_usage(f"bad --log-level {log_level!r}: use {LOG_LEVEL_HELP[:-1]}")
    for flag, value in (("--port", port), ("--api-port", api_port), ("--ollama-port", ollama_port)):
        if value is not None and not 0 <= value <= 65535:
            fail_usage(f"bad {flag} {value}: a port is 0 to 65535")
    if context < 0:
        fail_usage("--context must be 0 or more tokens")
    if not resume_wait >= 0:
        fail_usage("--resume-wait must be 0 or more seconds")
    slack = _check_daemon_flags(parallel, replicas, prefill_chunk, max_batch, disk_slack, api_allow_host)
    from tbmesh.http.common import ModelNames

    try:
        ModelNames.parse(model_alias)
    except ValueError as error:
        fail_usage(f"--model-alias: {error}")
    if secret is not None and secret_file is not None:
        fail_usage("give --secret or --secret-file, not both")
    secret_bytes = None
    try:
        if secret_file is not None:
            secret_bytes = secret_file.read_bytes().strip()
        elif secret is not None:
            secret_bytes = secret.encode()
        usable = parse_size(memory) if memory is not None else None
    except (OSError, ValueError) as error:
        fail_usage(str(error))
    if secret_bytes is not None and not secret_bytes:
        fail_usage("the cluster secret is empty")
    if secret_bytes is None and not insecure:
        _refuse_exposed(interface)
    if api_key is not None and api_key_file is not None:
        fail_usage("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            fail_usage(f"--api-key-file {api_key_file}: {error}")
    if api_key is not None and not api_key.strip():
        fail_usage("the API key is empty")
    if mqtt is not None:
        from tbmesh.node import telemetry

        try:
            telemetry.parse_url(mqtt)
            telemetry.check_topic_level("--cluster", cluster)
        except ValueError as error:
            fail_usage(str(error))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = DaemonConfig(
        interfaces=interface or None, port=port, api_host=api_host, api_port=api_port, ollama_port=ollama_port,
        api_key=api_key, api_allow_hosts=api_allow_host, model_aliases=model_alias, cluster=cluster, model=model, secret=secret_bytes, memory_usable=usable, probe_links=probe, mqtt=mqtt,
        replicas=replicas, disk_slack=slack, parallel=parallel,
        serving=ServingSettings(context=context, prefill_chunk=prefill_chunk, max_batch=max_batch,
                                resume_wait=resume_wait, prefix_cache=prefix_cache),
    )
    if state_dir is not None:
        config.state_dir = state_dir
    if name:
        config.name = name

    async def main() -> None:
        await NodeDaemon(config).run()

    try:
        _run_event_loop(main())
    except StartupError as error:
        fail_usage(str(error))
    except DaemonFailed as error:  # it said why in its log; the exit status says it failed
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


# --- the launchd service ------------------------------------------------------------------

NOT_MACOS = "tbmesh {command} is for macOS (launchd); use --dry-run to see the {what}"


def _service_for(user_agent: bool, user: Optional[str], flags: Any = None) -> Any:
    """The launchd service to install or remove: a LaunchDaemon running as the user who ran sudo
    (or --user), or with --user-agent a LaunchAgent of the current user."""
    import getpass
    import os

    from tbmesh.cli.launchd import AGENT, DAEMON, InstallError, find_program, make_service

    if user_agent and user is not None:
        fail_usage("--user is for the LaunchDaemon; a LaunchAgent runs as the user who installs it")
    if user_agent:
        who = getpass.getuser()
    else:
        who = user or os.environ.get("SUDO_USER") or getpass.getuser()
        if who == "root" and user is None:
            fail_usage("which user should tbmesh run as? run install with sudo from that user's account, "
                       "or give --user NAME")  # fmt: skip
    try:
        arguments = flags.arguments() if flags is not None else []
        return make_service(AGENT if user_agent else DAEMON, who, find_program(), arguments)
    except InstallError as error:
        fail_usage(str(error))


def _check_can_change(command: str, user_agent: bool) -> None:
    """Refuse before touching anything: not a Mac, or the wrong privileges for the kind."""
    import os
    import shlex

    if sys.platform != "darwin":
        fail_usage(NOT_MACOS.format(command=command, what="plist and commands" if command == "install" else "commands"))
    if not user_agent and os.geteuid() != 0:
        from tbmesh.cli.launchd import InstallError, find_program

        try:
            program = str(find_program())  # sudo's PATH does not have the venv's bin
        except InstallError:
            program = "tbmesh"
        fail_usage(f"the LaunchDaemon is installed by root: sudo {shlex.join([program, *sys.argv[1:]])} "
                   "(or --user-agent to run tbmesh only while you are logged in)")  # fmt: skip
    if user_agent and os.geteuid() == 0:
        fail_usage("a LaunchAgent is installed by its own user, without sudo")


def _print_commands(commands: list[list[str]]) -> None:
    import shlex

    for command in commands:
        print(shlex.join(command))


def _the_daemons(default: object) -> str:
    """An install option's default as --help shows it: the daemon's own, which a flag left out of
    the plist leaves it to."""
    return f"the daemon's: {default}"


def _flag_name(on: bool, flag: str) -> str:
    """A --x/--no-x flag's default as --help shows the daemon's: x or no-x."""
    return flag if on else f"no-{flag}"


def install(
    interface: list[str] = typer.Option([], "--interface", help="Serve on this interface (repeat).", show_default=_the_daemons(FOUND_DEFAULTS["interfaces"])),
    model: Optional[Path] = typer.Option(None, "--model", help="The mlx-lm model directory to plan and serve."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Only Macs with the same cluster name join.", show_default=_the_daemons(DaemonConfig.cluster)),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Read the cluster secret from this file (a secret itself would be readable in the plist)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve without a cluster secret on interfaces that are not Thunderbolt."),
    name: Optional[str] = typer.Option(None, "--name", help="This Mac's name in the cluster.", show_default=_the_daemons(FOUND_DEFAULTS["name"])),
    port: Optional[int] = typer.Option(None, "--port", help="Control port for peers.", show_default=_the_daemons(DaemonConfig.port)),
    api_host: Optional[str] = typer.Option(None, "--api-host", help="Where the HTTP API listens.", show_default=_the_daemons(DaemonConfig.api_host)),
    api_port: Optional[int] = typer.Option(None, "--api-port", help="HTTP API port.", show_default=_the_daemons(DaemonConfig.api_port)),
    ollama_port: Optional[int] = typer.Option(None, "--ollama-port", help="Serve the API on this port too, for Ollama clients (e.g. 11434)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the API key from this file (a key itself would be readable in the plist)."),
    api_allow_host: list[str] = typer.Option([], "--api-allow-host", help=ALLOW_HOST_HELP, show_default=_the_daemons(FOUND_DEFAULTS["api_allow_hosts"])),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where the node id is kept.", show_default=_the_daemons(FOUND_DEFAULTS["state_dir"])),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens of KV cache each stage keeps room for.", show_default=_the_daemons(ServingSettings.context)),
    log_level: Optional[str] = typer.Option(None, "--log-level", help=LOG_LEVEL_HELP, show_default=_the_daemons(LOG_LEVEL)),
    mqtt: Optional[str] = typer.Option(None, "--mqtt", help="Publish state and events to this MQTT broker: mqtt://host[:port]."),
    resume_wait: Optional[float] = typer.Option(None, "--resume-wait", help="Seconds a request in flight waits for the cluster to serve again.", show_default=_the_daemons(ServingSettings.resume_wait)),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="How the leader splits the model: auto, pipeline or tensor, as the daemon's --parallel.", show_default=_the_daemons(DaemonConfig.parallel)),
    replicas: Optional[int] = typer.Option(None, "--replicas", help="Copies of each layer the cluster keeps on its Macs' disks, as their room allows.", show_default=_the_daemons(DaemonConfig.replicas)),
    disk_slack: Optional[str] = typer.Option(None, "--disk-slack", help="The most bytes of the model this Mac keeps on disk beyond its own layers, e.g. 200GB.", show_default=_the_daemons(FOUND_DEFAULTS["disk_slack"])),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help="The most prompt tokens one step prefills.", show_default=_the_daemons(ServingSettings.prefill_chunk)),
    prefix_cache: Optional[bool] = typer.Option(None, "--prefix-cache/--no-prefix-cache", help="Keep the KV of recent prompts and answers, so a prompt that starts the same prefills only the rest.", show_default=_the_daemons(_flag_name(ServingSettings.prefix_cache, "prefix-cache"))),
    user: Optional[str] = typer.Option(None, "--user", help="The account the LaunchDaemon runs as.", show_default="the user who ran sudo"),
    user_agent: bool = typer.Option(False, "--user-agent", help="A LaunchAgent instead: no sudo, runs only while you are logged in."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plist and the launchctl commands; change nothing."),
) -> None:  # fmt: skip
    """Run `tbmesh daemon` at every boot as a launchd service, with these daemon options.

    By default a LaunchDaemon (sudo; starts at boot with nobody logged in, as your user, so it
    keeps your node id and reads your models). Logs: ~/Library/Logs/tbmesh/daemon.log.
    """
    from tbmesh.cli.launchd import (
        DaemonFlags,
        InstallError,
        install_commands,
        other_kind_plist,
        plist_bytes,
        protected_paths,
    )
    from tbmesh.cli.launchd import install as install_service

    if not dry_run:
        _check_can_change("install", user_agent)
    for flag, value in (("--port", port), ("--api-port", api_port), ("--ollama-port", ollama_port)):
        if value is not None and not 0 <= value <= 65535:
            fail_usage(f"bad {flag} {value}: a port is 0 to 65535")
    if context is not None and context < 0:
        fail_usage("--context must be 0 or more tokens")
    if log_level is not None and log_level.lower() not in LOG_LEVELS:
        fail_usage(f"bad --log-level {log_level!r}: use {LOG_LEVEL_HELP[:-1]}")
    if resume_wait is not None and not resume_wait >= 0:
        fail_usage("--resume-wait must be 0 or more seconds")
    _check_daemon_flags(parallel=parallel, replicas=replicas, prefill_chunk=prefill_chunk, disk_slack=disk_slack,
                        api_allow_hosts=api_allow_host)  # fmt: skip
    if mqtt is not None:
        from tbmesh.node import telemetry

        try:
            telemetry.parse_url(mqtt)
        except ValueError as error:
            fail_usage(str(error))
    # the service would only fail at every start, every 10 s: catch a wrong path now
    if model is not None and not model.expanduser().is_dir():
        fail_usage(f"--model {model}: no such directory")
    if secret_file is not None and not secret_file.expanduser().is_file():
        fail_usage(f"--secret-file {secret_file}: no such file")
    if api_key_file is not None and not api_key_file.expanduser().is_file():
        fail_usage(f"--api-key-file {api_key_file}: no such file")
    if secret_file is None and not insecure:
        _refuse_exposed(interface)
    flags = DaemonFlags(tuple(interface), model, cluster, secret_file, name, port, api_host, api_port,
                        state_dir, context, log_level, mqtt, resume_wait, ollama_port, api_key_file,
                        parallel=parallel, replicas=replicas, disk_slack=disk_slack,
                        prefill_chunk=prefill_chunk, prefix_cache=prefix_cache, insecure=insecure,
                        api_allow_hosts=tuple(api_allow_host))  # fmt: skip
    service = _service_for(user_agent, user, flags)
    for path in protected_paths(service):
        print(f"warning: {path} is in a folder macOS keeps from launchd services unless their program "
              "has Full Disk Access; move it, or grant it (see the README)", file=sys.stderr)  # fmt: skip
    other = other_kind_plist(service)
    if other.exists():
        print(f"warning: {other} is installed too and would run a second daemon on the same ports; "
              f"remove it with: tbmesh uninstall{'' if user_agent else ' --user-agent'}", file=sys.stderr)  # fmt: skip
    if dry_run:
        print(f"# would write {service.plist_path}:")
        sys.stdout.write(plist_bytes(service).decode())
        print(f"# would create {service.log_path} (owned by {service.user}), then run:")
        _print_commands(install_commands(service))
        return
    try:
        install_service(service)
    except (InstallError, OSError) as error:
        hint = ""
        if user_agent:
            hint = " (a LaunchAgent needs you logged in to the desktop; without that use the LaunchDaemon: sudo tbmesh install)"
        fail_usage(f"{error}{hint}")
    print(f"installed {service.plist_path}: tbmesh daemon runs as {service.user} "
          f"{'at every login' if user_agent else 'from boot'}; logs in {service.log_path}")  # fmt: skip


def uninstall(
    user_agent: bool = typer.Option(False, "--user-agent", help="Remove the LaunchAgent instead of the LaunchDaemon."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the launchctl commands; change nothing."),
) -> None:  # fmt: skip
    """Stop the launchd service and remove its plist (the logs and the node id stay)."""
    from tbmesh.cli.launchd import InstallError, uninstall_commands
    from tbmesh.cli.launchd import uninstall as uninstall_service

    if not dry_run:
        _check_can_change("uninstall", user_agent)
    # the user does not matter here (the label and the plist path are the same for everyone)
    # except for a LaunchAgent's domain, gui/<uid>: the current user's
    service = _service_for(user_agent, None if user_agent else "root")
    if dry_run:
        _print_commands(uninstall_commands(service))
        print(f"# then would remove {service.plist_path}")
        return
    try:
        loaded, removed = uninstall_service(service)
    except (InstallError, OSError) as error:
        fail_usage(str(error))
    if not loaded and not removed:
        print(f"tbmesh was not installed ({service.plist_path} does not exist)")
    else:
        print(f"{'stopped and ' if loaded else ''}removed {service.target}" + (f" ({service.plist_path})" if removed else ""))

