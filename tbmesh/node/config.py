"""What a node is started with: the one home of the daemon's defaults.

`tbmesh daemon` takes its flags' defaults from here, `tbmesh install` shows them (an option
not given is left out of the plist, so the daemon uses these), the API client dials the
default API address, and a test holds the README's flag table to them. The serving engine's
own settings are `tbmesh.serving.settings.ServingSettings`; the planner's shapes
(`Parallel`) and the copies of each layer (`REPLICAS`) are the core's.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from tbmesh.core.groups import DEFAULT_PARALLEL, Parallel
from tbmesh.core.membership import Timing
from tbmesh.core.replicas import REPLICAS
from tbmesh.node.state import default_state_dir
from tbmesh.serving.settings import DISK_RESERVE, ServingSettings

LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
LOG_LEVEL: LogLevel = "info"  # the daemon's log level when --log-level is not given


def host_name() -> str:
    """This Mac's short host name: the name a node shows in the cluster unless given one."""
    return socket.gethostname().split(".")[0]


@dataclass
class DaemonConfig:
    interfaces: list[str] | None = None  # None: the Thunderbolt interfaces
    port: int = 7470  # control port for peers; 0 = any free
    api_host: str = "127.0.0.1"  # where the HTTP API listens: this Mac only
    api_port: int = 7471  # 0 = any free
    ollama_port: int | None = None  # the same API on a second port too (Ollama's is 11434); 0 = any free
    api_key: str | None = None  # every API request but a health check must carry it
    api_allow_hosts: list[str] = field(default_factory=list)  # Host names the API answers to besides its own
    # "PATTERN=NAME": a request naming a model that matches PATTERN (fnmatch's) gets NAME, so that
    # clients that send their own model names (Claude Code's claude-*) reach a served one
    model_aliases: list[str] = field(default_factory=list)
    state_dir: Path = field(default_factory=default_state_dir)
    name: str = field(default_factory=host_name)
    cluster: str = "default"
    model: Path | None = None
    secret: bytes | None = None
    memory_usable: int | None = None  # pretend to have this much (tests, demos)
    timing: Timing = field(default_factory=Timing)
    probe_links: bool = True  # measure each link's bandwidth when it appears
    serving: ServingSettings = field(default_factory=ServingSettings)  # context, resume wait, batching
    mqtt: str | None = None  # mqtt://host[:port]: publish state and events there (tbmesh.node.telemetry)
    replicas: int = REPLICAS  # copies of each layer on the members' disks (tbmesh.core.replicas)
    disk_slack: int | None = None  # bytes of the model kept on disk beyond our stage; None: as the disk allows
    # the planner's shapes (tbmesh.core.groups): tensor groups only where they pay, else a pipeline
    parallel: Parallel = DEFAULT_PARALLEL


# what --help says of --model-alias (model_aliases)
MODEL_ALIAS_HELP = ("A request for a model name that matches PATTERN (a shell pattern, e.g. 'claude-*') gets the served "
                    "model NAME (repeat; the first match wins; a served model's own name, and it with :latest, "
                    "always mean it).")


# The defaults that are found when the daemon starts, in words: what --help and the README show.
FOUND_DEFAULTS = {
    "interfaces": "the Thunderbolt ones",
    "api_allow_hosts": "localhost, the --api-host, and beyond loopback this Mac's host names; any IP address",
    "state_dir": "~/Library/Application Support/tbmesh on a Mac, $XDG_STATE_HOME/tbmesh elsewhere",
    "name": "the host name",
    "memory_usable": "what Metal lets a model take",
    "disk_slack": f"what the disk has room for, leaving {DISK_RESERVE:.0%} free",
}


def api_url(host: str = DaemonConfig.api_host, port: int = DaemonConfig.api_port) -> str:
    """The URL of a daemon's HTTP API; by default the local daemon's, as started with no flags."""
    return f"http://{host}:{port}"
