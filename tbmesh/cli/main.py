"""The `tbmesh` command."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tbmesh.cli.client import (
    API_KEY_ENV,
    DEFAULT_API,
    ApiProblem,
    fetch_status,
    fetch_status_json,
    open_api,
    stream_answer,
)
from tbmesh.core.groups import PARALLEL, member_bytes
from tbmesh.core.jsonform import from_json, to_json
from tbmesh.core.replicas import REPLICAS
from tbmesh.core.status import Status
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Placement
from tbmesh.core.units import format_bandwidth, format_bytes, parse_bandwidth, parse_size
from tbmesh.serving.settings import ServingSettings

EXIT_FITS, EXIT_USAGE, EXIT_DOES_NOT_FIT = 0, 2, 3
DEFAULT_CONTEXT = ServingSettings.context


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
                print(f"error: {_one_line(error.format_message())}", file=sys.stderr)
            sys.exit(error.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = _App(pretty_exceptions_enable=False, no_args_is_help=True)


@app.callback()
def _main() -> None:
    """Zero-config cluster of Thunderbolt-cabled Macs that runs models too big for one of them."""


class UsageError(ValueError):
    pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str) -> None:
    print(f"error: {_one_line(message)}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)


# --- what to plan ---------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRequest:
    model: ModelSpec
    title: str
    nodes: tuple[NodeInfo, ...]
    links: tuple[LinkInfo, ...]
    context: int
    example: bool = False
    notes: tuple[str, ...] = ()


EXAMPLE_RAM = 512 * 2**30  # Mac Studio M3 Ultra, 512 GB
EXAMPLE_USABLE = 0.75  # Metal's recommended working set is about 75% of RAM
EXAMPLE_LINK = "80Gbps"  # Thunderbolt 5


def example_request(context: int) -> PlanRequest:
    """Kimi-K2-Thinking on four 512 GB Mac Studios cabled in a Thunderbolt 5 ring."""
    from tbmesh.core.presets import get_preset, preset_spec

    names = [f"studio{i}" for i in range(1, 5)]
    usable = int(EXAMPLE_RAM * EXAMPLE_USABLE)
    nodes = tuple(NodeInfo(n, n, "M3 Ultra", EXAMPLE_RAM, usable) for n in names)
    speed = parse_bandwidth(EXAMPLE_LINK)
    links = tuple(LinkInfo(a, b, speed) for a, b in zip(names, names[1:] + names[:1]))
    preset = get_preset("kimi-k2-thinking")
    return PlanRequest(preset_spec(preset.name), preset.title, nodes, links, context, example=True)


def parse_node(text: str) -> NodeInfo:
    """"studio1:384GB" -> a node whose usable memory is 384 GB."""
    name, sep, memory = text.rpartition(":")
    if not sep or not name or not memory:
        raise UsageError(f"bad --node {text!r}: expected NAME:MEMORY, e.g. studio1:384GB")
    usable = parse_size(memory)
    if usable <= 0:
        raise UsageError(f"bad --node {text!r}: memory must be more than 0")
    return NodeInfo(id=name, name=name, memory_total=usable, memory_usable=usable)


def parse_link(text: str, names: Sequence[str]) -> LinkInfo:
    """"a-b:80Gbps" -> a link between nodes a and b (names may contain dashes); "a-b:80Gbps:rdma"
    says both ends run RDMA on that cable (macOS 26.2+, Thunderbolt 5)."""
    rdma = text.endswith(":rdma")
    pair, sep, speed = text.removesuffix(":rdma").rpartition(":")
    if not sep or not pair or not speed:
        raise UsageError(f"bad --link {text!r}: expected A-B:BANDWIDTH, e.g. studio1-studio2:80Gbps")
    ends = [
        (pair[:i], pair[i + 1 :]) for i, c in enumerate(pair) if c == "-" and {pair[:i], pair[i + 1 :]} <= set(names)
    ]
    if not ends:
        raise UsageError(f"bad --link {text!r}: {pair!r} does not join two known nodes ({', '.join(names)})")
    if len(ends) > 1:
        raise UsageError(f"bad --link {text!r}: {pair!r} can be read as more than one pair of nodes")
    a, b = ends[0]
    if a == b:
        raise UsageError(f"bad --link {text!r}: a link joins two different nodes")
    return LinkInfo(a, b, parse_bandwidth(speed), rdma=rdma)


def build_request(
    model_dir: Optional[Path],
    preset: Optional[str],
    layers: Optional[int],
    layer_size: Optional[str],
    node_args: Sequence[str],
    link_args: Sequence[str],
    context: Optional[int],
) -> PlanRequest:
    given = (("--model", model_dir), ("--preset", preset), ("--layers", layers))
    chosen = [flag for flag, value in given if value is not None]
    if layer_size is not None and layers is None:
        raise UsageError("--layer-size needs --layers")
    if layers is not None and layer_size is None:
        raise UsageError("--layers needs --layer-size")
    if len(chosen) > 1:
        raise UsageError(f"give one model, not {' and '.join(chosen)}")
    if context is not None and context < 0:
        raise UsageError("--context must be 0 or more tokens")
    if not chosen and not node_args and not link_args:
        return example_request(DEFAULT_CONTEXT if context is None else context)
    if not chosen:
        raise UsageError("which model? give --model DIR, --preset NAME or --layers N --layer-size SIZE")
    if not node_args:
        raise UsageError("which nodes? give --node NAME:MEMORY for each Mac (usable memory)")

    nodes = tuple(parse_node(n) for n in node_args)
    names = [n.name for n in nodes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UsageError(f"node {duplicate!r} is given twice")
    links = tuple(parse_link(link, names) for link in link_args)
    pairs = [frozenset((link.a, link.b)) for link in links]
    twice = next((p for p in pairs if pairs.count(p) > 1), None)
    if twice:
        raise UsageError(f"the link {'-'.join(sorted(twice))} is given twice")

    if layers is not None:
        if layers <= 0:
            raise UsageError("--layers must be at least 1")
        size = parse_size(layer_size or "")
        spec = ModelSpec(name=f"{layers} layers", layer_bytes=(size,) * layers)
        # no KV-cache size is known, so the context plays no part
        notes = ("--context is ignored with --layers: no KV-cache size is known",) if context else ()
        return PlanRequest(spec, f"{layers} layers of {format_bytes(size)}", nodes, links, 0, notes=notes)
    if preset is not None:
        from tbmesh.core.presets import get_preset, preset_spec

        found = get_preset(preset)
        spec, title = preset_spec(found.name), found.title
    else:
        from tbmesh.weights.modeldir import describe_model_dir

        spec = describe_model_dir(model_dir)  # type: ignore[arg-type]
        title = spec.name
    return PlanRequest(spec, title, nodes, links, DEFAULT_CONTEXT if context is None else context)


# --- output ---------------------------------------------------------------------------


def placement_json(placement: Placement, model: ModelSpec | None = None, context: int = 0) -> dict[str, Any]:
    """The placement as `tbmesh plan --json` prints it: a group's stage has its members and the
    bytes each holds (`member_bytes`, KV room included); `why` when the planner chose a shape."""
    last = len(placement.stages) - 1
    stages = []
    for i, s in enumerate(placement.stages):
        stage: dict[str, Any] = to_json(s)  # as in a plan
        if s.group and model is not None:
            stage["member_bytes"] = member_bytes(model, s.start, s.end, len(s.group), i == 0, i == last, context)
        stages.append(stage)
    out = {"fits": placement.fits, "reason": placement.reason, "stages": stages, "left_out": list(placement.left_out)}
    return out | ({"why": placement.why} if placement.why else {})


COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
BAR_WIDTH = 60


def layer_bar(placement: Placement, num_layers: int, width: int = BAR_WIDTH) -> Text:
    """Layers left to right, each stage's share drawn with its letter and colour."""
    bar = Text("|")
    for i, stage in enumerate(placement.stages):
        begin, end = stage.start * width // num_layers, stage.end * width // num_layers
        bar.append(_letter(i) * max(1, end - begin), style=f"bold {COLOURS[i % len(COLOURS)]}")
    return bar.append("|")


def _letter(i: int) -> str:
    return chr(ord("A") + i % 26)


def _hop(request: PlanRequest, a: str, b: str) -> str:
    link = next((link for link in request.links if link.joins(a, b)), None)
    if link is None:
        return "no link" if request.links else ""
    return format_bandwidth(link.bytes_per_s) if link.bytes_per_s else "linked"


def render(console: Console, request: PlanRequest, placement: Placement) -> None:
    model = request.model
    if request.example:
        console.print(
            f"[bold]Built-in example:[/] Kimi-K2-Thinking on four 512 GB Mac Studios ({EXAMPLE_USABLE:.0%} usable "
            f"each) in a ring of Thunderbolt 5 cables at {format_bandwidth(parse_bandwidth(EXAMPLE_LINK))}.\n"
            "Yours: tbmesh plan --preset NAME --node NAME:MEMORY ... (see tbmesh plan --help)"
        )
    kv = f", KV cache {format_bytes(model.kv_bytes(request.context, model.num_layers))} for {request.context} tokens"
    console.print(
        f"[bold]{request.title}[/]: {format_bytes(model.weight_bytes)} of weights in {model.num_layers} layers"
        + (kv if model.kv_bytes_per_token_per_layer and request.context else "")
    )
    usable = {n.id: n.memory_usable for n in request.nodes}
    show_kv = bool(model.kv_bytes_per_token_per_layer and request.context)
    table = Table(show_edge=False)
    for column in ("", "node", "layers", "#", "weights", "KV cache", "usable", "used", "next hop"):
        if (column == "KV cache" and not show_kv) or (column == "next hop" and not request.links):
            continue
        table.add_column(column, justify="left" if column in ("", "node", "layers", "next hop") else "right")
    stages = placement.stages
    for i, stage in enumerate(stages):
        kv_bytes = model.kv_bytes(request.context, stage.num_layers)
        room = min(usable.get(m, 0) for m in stage.members)  # a group: its smallest member's
        held = stage.bytes + kv_bytes
        if stage.group:  # each member's share (tbmesh.core.groups.member_bytes)
            held = member_bytes(model, stage.start, stage.end, len(stage.group), i == 0, i == len(stages) - 1,
                                request.context)
        share = held / room if room else 0.0
        row = [Text(_letter(i), style=f"bold {COLOURS[i % len(COLOURS)]}"), "+".join(stage.members)]
        row += [f"{stage.start}-{stage.end - 1}", str(stage.num_layers), format_bytes(stage.bytes)]
        row += [format_bytes(kv_bytes)] if show_kv else []
        row += [format_bytes(room), f"{share:.0%}"]
        if request.links:
            row += [_hop(request, stage.node, stages[i + 1].node) if i + 1 < len(stages) else ""]
        table.add_row(*row)
    if stages:
        console.print(table)
        console.print(layer_bar(placement, model.num_layers))
    if placement.left_out:
        console.print(f"left out: {', '.join(placement.left_out)}")
    for note in request.notes + placement.notes:
        console.print(f"note: {note}")
    if placement.why:
        console.print(f"why: {placement.why}")
    if any(s.group for s in stages):
        console.print("a group's members each hold their share of every layer of the stage plus what mlx-lm keeps "
                      "whole (usable and used: the smallest member's)")
    if placement.fits:
        count = sum(len(s.members) for s in stages)
        console.print(f"[bold green]fits[/] on {count} of {len(request.nodes)} nodes")
    else:
        console.print(f"[bold red]does not fit:[/] [red]{placement.reason or 'no reason given'}[/]")


def render_presets(console: Console, as_json: bool) -> None:
    from tbmesh.core.presets import PRESETS, preset_spec

    rows = [(p, preset_spec(p.name)) for p in PRESETS.values()]
    if as_json:
        print(json.dumps([{"name": p.name, "title": p.title, "checkpoint": p.checkpoint,
                           "layers": s.num_layers, "bytes": s.weight_bytes} for p, s in rows]))  # fmt: skip
        return
    table = Table(show_edge=False)
    for column in ("preset", "layers", "weights", "model"):
        table.add_column(column, justify="right" if column in ("layers", "weights") else "left")
    for p, s in rows:
        table.add_row(p.name, str(s.num_layers), format_bytes(s.weight_bytes), p.title)
    console.print(table)


# --- commands -------------------------------------------------------------------------


@app.command()
def plan(
    model: Optional[Path] = typer.Option(None, "--model", help="An mlx-lm model directory (config.json + safetensors)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A known model, e.g. kimi-k2-thinking (--list-presets)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="A made-up model of N equal layers (with --layer-size)."),
    layer_size: Optional[str] = typer.Option(None, "--layer-size", help="Bytes per layer for --layers, e.g. 10GB."),
    node: list[str] = typer.Option([], "--node", help="NAME:MEMORY, the usable memory of a Mac (repeat per Mac)."),
    link: list[str] = typer.Option([], "--link", help="A-B:BANDWIDTH[:rdma], a cable between two nodes, e.g. a-b:80Gbps (:rdma: both ends run RDMA on it)."),
    parallel: str = typer.Option("auto", "--parallel", help="auto: tensor groups of Macs cabled all to all where the cost model projects a decode at least 1.2x faster, else layers over Macs; pipeline: layers over Macs only; tensor: groups wherever possible (the daemon's --parallel)."),
    context: Optional[int] = typer.Option(None, "--context", help=f"Tokens of KV cache to leave room for [default: {DEFAULT_CONTEXT}]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    list_presets: bool = typer.Option(False, "--list-presets", help="List the known models and exit."),
) -> None:  # fmt: skip
    """Show how a model's layers would be split over a set of Macs, without any cluster running.

    With no model and no nodes, plans the built-in example: Kimi-K2-Thinking on four Mac Studios.
    Exit status: 0 it fits, 3 it does not, 2 bad arguments.
    """
    console = Console(highlight=False)
    if list_presets:
        render_presets(console, as_json)
        return
    try:
        request = build_request(model, preset, layers, layer_size, node, link, context)
        from tbmesh.core.planner import plan_layers

        if parallel not in PARALLEL:
            raise UsageError(f"bad --parallel {parallel!r}: use {', '.join(PARALLEL)}")
        placement = plan_layers(request.model, request.nodes, request.links, context=request.context,
                                parallel=parallel)
    except ValueError as error:  # bad arguments, sizes, model directories, presets
        _fail(str(error))
    if as_json:
        print(json.dumps(placement_json(placement, request.model, request.context)))
    else:
        render(console, request, placement)
    raise typer.Exit(EXIT_FITS if placement.fits else EXIT_DOES_NOT_FIT)


# --- the daemon and its status ----------------------------------------------------------


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
            _fail(f"bad --api-allow-host {host!r}: give a host name as clients write it in the API's URL, "
                  "without scheme or port (e.g. studio.example.com)")
    if parallel is not None and parallel not in PARALLEL:
        _fail(f"bad --parallel {parallel!r}: use {', '.join(PARALLEL)}")
    for flag, value in (("--replicas", replicas), ("--prefill-chunk", prefill_chunk), ("--max-batch", max_batch)):
        if value is not None and value < 1:
            _fail(f"{flag} must be 1 or more")
    slack = None
    if disk_slack is not None:
        try:
            slack = parse_size(disk_slack)
        except ValueError as error:
            _fail(f"--disk-slack: {error}")
    return slack


def _refuse_exposed(interface: list[str]) -> None:
    """Without a secret, serve only where no stranger can reach: Thunderbolt cables, loopback."""
    from tbmesh.net.interfaces import exposed_interfaces

    exposed = exposed_interfaces(interface)
    if exposed:
        _fail(f"--interface {', '.join(exposed)} is not Thunderbolt: without a cluster secret anyone on "
              "that network could join the cluster and read its traffic; give every Mac the same "
              "--secret-file F (or pass --insecure)")


ALLOW_HOST_HELP = ("Answer API requests for this host name too (repeat), as clients write it in the API's URL: "
                   "a request for another name is refused, as a web page's DNS rebinding would be [default: "
                   "localhost, the --api-host, and beyond loopback this Mac's host names; any IP address].")


@app.command()
def daemon(
    interface: list[str] = typer.Option([], "--interface", help="Serve on this interface (repeat); default: the Thunderbolt ones."),
    port: int = typer.Option(7470, "--port", help="Control port for peers; 0 = any free."),
    api_host: str = typer.Option("127.0.0.1", "--api-host", help="Where the HTTP API listens."),
    api_port: int = typer.Option(7471, "--api-port", help="HTTP API port; 0 = any free."),
    ollama_port: Optional[int] = typer.Option(None, "--ollama-port", help="Serve the API on this port too, for Ollama clients (Ollama's is 11434); 0 = any free."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Every API request but GET /health must carry this key (Bearer or x-api-key)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the API key from a file (a key on the command line shows in ps)."),
    api_allow_host: list[str] = typer.Option([], "--api-allow-host", help=ALLOW_HOST_HELP),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where the node id is kept."),
    name: Optional[str] = typer.Option(None, "--name", help="This Mac's name in the cluster [default: host name]."),
    cluster: str = typer.Option("default", "--cluster", help="Only Macs with the same cluster name join."),
    model: Optional[Path] = typer.Option(None, "--model", help="The mlx-lm model directory to plan and serve, or only its name: the weights this Mac lacks come from its peers."),
    replicas: int = typer.Option(REPLICAS, "--replicas", help="Copies of each layer the cluster keeps on its Macs' disks (as their room allows), so that a dead Mac's layers can still be fetched."),
    disk_slack: Optional[str] = typer.Option(None, "--disk-slack", help="The most bytes of the model this Mac keeps on disk beyond its own layers, e.g. 200GB [default: what the disk has room for, leaving 10% free]."),
    secret: Optional[str] = typer.Option(None, "--secret", help="Cluster secret: peers without it are refused."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Read the cluster secret from a file."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve without a cluster secret on interfaces that are not Thunderbolt (anyone on that network can then join the cluster and read its traffic)."),
    context: int = typer.Option(DEFAULT_CONTEXT, "--context", help="Tokens of KV cache each stage keeps room for."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Pretend this much memory is usable (tests, demos), e.g. 24GB."),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="Measure each link's bandwidth when it appears."),
    mqtt: Optional[str] = typer.Option(None, "--mqtt", help="Publish state and events to this MQTT broker: mqtt://host[:port]."),
    resume_wait: float = typer.Option(ServingSettings.resume_wait, "--resume-wait", help="Seconds a request in flight waits for the cluster to serve the model again (after a Mac leaves) before it fails."),
    prefill_chunk: int = typer.Option(ServingSettings.prefill_chunk, "--prefill-chunk", help="The most prompt tokens one step prefills; streams already decoding take a step between two chunks."),
    max_batch: int = typer.Option(ServingSettings.max_batch, "--max-batch", help="The most requests one decode step runs."),
    prefix_cache: bool = typer.Option(ServingSettings.prefix_cache, "--prefix-cache/--no-prefix-cache", help="Keep the KV of recent prompts and answers, so a prompt that starts the same prefills only the rest."),
    parallel: str = typer.Option("auto", "--parallel", help="How the leader splits the model: auto (tensor groups of Macs cabled all to all where the cost model projects a decode at least 1.2x faster, else layers over Macs), pipeline (layers over Macs only) or tensor (groups wherever the model and the cables allow). A group's members run one worker process each (see tbmesh plan --parallel for the planner's reasons)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:  # fmt: skip
    """Run this Mac's node: discover peers on Thunderbolt, join the cluster, serve the API."""
    import logging

    from tbmesh.node.daemon import Daemon as NodeDaemon
    from tbmesh.node.daemon import DaemonConfig, DaemonFailed, StartupError

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _fail(f"bad --log-level {log_level!r}: use debug, info, warning or error")
    for flag, value in (("--port", port), ("--api-port", api_port), ("--ollama-port", ollama_port)):
        if value is not None and not 0 <= value <= 65535:
            _fail(f"bad {flag} {value}: a port is 0 to 65535")
    if context < 0:
        _fail("--context must be 0 or more tokens")
    if not resume_wait >= 0:
        _fail("--resume-wait must be 0 or more seconds")
    slack = _check_daemon_flags(parallel, replicas, prefill_chunk, max_batch, disk_slack, api_allow_host)
    if secret is not None and secret_file is not None:
        _fail("give --secret or --secret-file, not both")
    secret_bytes = None
    try:
        if secret_file is not None:
            secret_bytes = secret_file.read_bytes().strip()
        elif secret is not None:
            secret_bytes = secret.encode()
        usable = parse_size(memory) if memory is not None else None
    except (OSError, ValueError) as error:
        _fail(str(error))
    if secret_bytes is not None and not secret_bytes:
        _fail("the cluster secret is empty")
    if secret_bytes is None and not insecure:
        _refuse_exposed(interface)
    if api_key is not None and api_key_file is not None:
        _fail("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            _fail(f"--api-key-file {api_key_file}: {error}")
    if api_key is not None and not api_key.strip():
        _fail("the API key is empty")
    if mqtt is not None:
        from tbmesh.node import telemetry

        try:
            telemetry.parse_url(mqtt)
            telemetry.check_topic_level("--cluster", cluster)
        except ValueError as error:
            _fail(str(error))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = DaemonConfig(
        interfaces=interface or None, port=port, api_host=api_host, api_port=api_port, ollama_port=ollama_port,
        api_key=api_key, api_allow_hosts=api_allow_host, cluster=cluster, model=model, secret=secret_bytes, memory_usable=usable, probe_links=probe, mqtt=mqtt,
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
        _fail(str(error))
    except DaemonFailed as error:  # it said why in its log; the exit status says it failed
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


STATUS_REFRESH_S = 0.5  # the live screen polls the daemon twice a second
API_KEY_HELP = "The daemon's --api-key, if it has one."


@app.command()
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


# --- the launchd service ------------------------------------------------------------------

NOT_MACOS = "tbmesh {command} is for macOS (launchd); use --dry-run to see the {what}"


def _service_for(user_agent: bool, user: Optional[str], flags: Any = None) -> Any:
    """The launchd service to install or remove: a LaunchDaemon running as the user who ran sudo
    (or --user), or with --user-agent a LaunchAgent of the current user."""
    import getpass
    import os

    from tbmesh.cli.launchd import AGENT, DAEMON, InstallError, find_program, make_service

    if user_agent and user is not None:
        _fail("--user is for the LaunchDaemon; a LaunchAgent runs as the user who installs it")
    if user_agent:
        who = getpass.getuser()
    else:
        who = user or os.environ.get("SUDO_USER") or getpass.getuser()
        if who == "root" and user is None:
            _fail("which user should tbmesh run as? run install with sudo from that user's account, "
                  "or give --user NAME")  # fmt: skip
    try:
        arguments = flags.arguments() if flags is not None else []
        return make_service(AGENT if user_agent else DAEMON, who, find_program(), arguments)
    except InstallError as error:
        _fail(str(error))


def _check_can_change(command: str, user_agent: bool) -> None:
    """Refuse before touching anything: not a Mac, or the wrong privileges for the kind."""
    import os
    import shlex

    if sys.platform != "darwin":
        _fail(NOT_MACOS.format(command=command, what="plist and commands" if command == "install" else "commands"))
    if not user_agent and os.geteuid() != 0:
        from tbmesh.cli.launchd import InstallError, find_program

        try:
            program = str(find_program())  # sudo's PATH does not have the venv's bin
        except InstallError:
            program = "tbmesh"
        _fail(f"the LaunchDaemon is installed by root: sudo {shlex.join([program, *sys.argv[1:]])} "
              "(or --user-agent to run tbmesh only while you are logged in)")  # fmt: skip
    if user_agent and os.geteuid() == 0:
        _fail("a LaunchAgent is installed by its own user, without sudo")


def _print_commands(commands: list[list[str]]) -> None:
    import shlex

    for command in commands:
        print(shlex.join(command))


@app.command()
def install(
    interface: list[str] = typer.Option([], "--interface", help="Serve on this interface (repeat); default: the Thunderbolt ones."),
    model: Optional[Path] = typer.Option(None, "--model", help="The mlx-lm model directory to plan and serve."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help='Only Macs with the same cluster name join (default: "default").'),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="Read the cluster secret from this file (a secret itself would be readable in the plist)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve without a cluster secret on interfaces that are not Thunderbolt."),
    name: Optional[str] = typer.Option(None, "--name", help="This Mac's name in the cluster (default: host name)."),
    port: Optional[int] = typer.Option(None, "--port", help="Control port for peers (default: 7470)."),
    api_host: Optional[str] = typer.Option(None, "--api-host", help="Where the HTTP API listens (default: 127.0.0.1)."),
    api_port: Optional[int] = typer.Option(None, "--api-port", help="HTTP API port (default: 7471)."),
    ollama_port: Optional[int] = typer.Option(None, "--ollama-port", help="Serve the API on this port too, for Ollama clients (e.g. 11434)."),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="Read the API key from this file (a key itself would be readable in the plist)."),
    api_allow_host: list[str] = typer.Option([], "--api-allow-host", help=ALLOW_HOST_HELP),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where the node id is kept (default: the user's)."),
    context: Optional[int] = typer.Option(None, "--context", help=f"Tokens of KV cache each stage keeps room for (default: {DEFAULT_CONTEXT})."),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning or error (default: info)."),
    mqtt: Optional[str] = typer.Option(None, "--mqtt", help="Publish state and events to this MQTT broker: mqtt://host[:port]."),
    resume_wait: Optional[float] = typer.Option(None, "--resume-wait", help="Seconds a request in flight waits for the cluster to serve again (default: 30)."),
    parallel: Optional[str] = typer.Option(None, "--parallel", help="How the leader splits the model: auto, pipeline or tensor, as the daemon's --parallel (default: auto)."),
    replicas: Optional[int] = typer.Option(None, "--replicas", help=f"Copies of each layer the cluster keeps on its Macs' disks, as their room allows (default: {REPLICAS})."),
    disk_slack: Optional[str] = typer.Option(None, "--disk-slack", help="The most bytes of the model this Mac keeps on disk beyond its own layers, e.g. 200GB (default: what the disk has room for, leaving 10% free)."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", help=f"The most prompt tokens one step prefills (default: {ServingSettings.prefill_chunk})."),
    prefix_cache: Optional[bool] = typer.Option(None, "--prefix-cache/--no-prefix-cache", help=f"Keep the KV of recent prompts and answers, so a prompt that starts the same prefills only the rest (default: {'on' if ServingSettings.prefix_cache else 'off'})."),
    user: Optional[str] = typer.Option(None, "--user", help="The account the LaunchDaemon runs as (default: the user who ran sudo)."),
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
            _fail(f"bad {flag} {value}: a port is 0 to 65535")
    if context is not None and context < 0:
        _fail("--context must be 0 or more tokens")
    if log_level is not None and log_level.lower() not in ("debug", "info", "warning", "error"):
        _fail(f"bad --log-level {log_level!r}: use debug, info, warning or error")
    if resume_wait is not None and not resume_wait >= 0:
        _fail("--resume-wait must be 0 or more seconds")
    _check_daemon_flags(parallel=parallel, replicas=replicas, prefill_chunk=prefill_chunk, disk_slack=disk_slack,
                        api_allow_hosts=api_allow_host)  # fmt: skip
    if mqtt is not None:
        from tbmesh.node import telemetry

        try:
            telemetry.parse_url(mqtt)
        except ValueError as error:
            _fail(str(error))
    # the service would only fail at every start, every 10 s: catch a wrong path now
    if model is not None and not model.expanduser().is_dir():
        _fail(f"--model {model}: no such directory")
    if secret_file is not None and not secret_file.expanduser().is_file():
        _fail(f"--secret-file {secret_file}: no such file")
    if api_key_file is not None and not api_key_file.expanduser().is_file():
        _fail(f"--api-key-file {api_key_file}: no such file")
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
        _fail(f"{error}{hint}")
    print(f"installed {service.plist_path}: tbmesh daemon runs as {service.user} "
          f"{'at every login' if user_agent else 'from boot'}; logs in {service.log_path}")  # fmt: skip


@app.command()
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
        _fail(str(error))
    if not loaded and not removed:
        print(f"tbmesh was not installed ({service.plist_path} does not exist)")
    else:
        print(f"{'stopped and ' if loaded else ''}removed {service.target}" + (f" ({service.plist_path})" if removed else ""))


# --- chat with the cluster's model -------------------------------------------------------

CHAT_READ_TIMEOUT = 600.0  # s between two pieces of the answer (a long prefill on a big model)


@app.command()
def chat(
    prompt: str = typer.Argument(..., help="What to ask."),
    api: str = typer.Option(DEFAULT_API, "--api", help="The daemon's API URL."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar=API_KEY_ENV, help=API_KEY_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="The model id (default: the first the daemon serves)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens in the answer (default: the API's, 2048)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 picks the likeliest token each step (default: 1)."),
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
        print(f"error: {_one_line(message)}", file=sys.stderr)
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


# --- the local demo -----------------------------------------------------------------------


@app.command()
def demo(
    nodes: int = typer.Option(3, "--nodes", help="How many daemons (Macs) to run on this machine."),
    ui: Optional[bool] = typer.Option(None, "--ui/--no-ui", help="Show the live status screen [default: when stdout is a terminal]."),
) -> None:  # fmt: skip
    """A whole cluster on this machine: start NODES daemons on loopback with a small taught
    model, stream its answer through their pipeline, stop one of them mid-answer and watch the
    cluster re-form and the answer go on; everything started is stopped at the end."""
    from tbmesh.cli import demo as local_demo

    if ui is None:
        ui = sys.stdout.isatty()
    try:
        code = local_demo.run(nodes=nodes, ui=ui)
    except local_demo.DemoError as error:
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    raise typer.Exit(code)


# --- model directories ------------------------------------------------------------------

model_app = typer.Typer(help="Make or download model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("tiny")
def model_tiny(
    directory: Path = typer.Argument(..., help="Where to write the model (a new or empty directory)."),
    arch: str = typer.Option("llama", "--arch", help="llama, qwen3 or qwen3_moe (8 experts, 2 per token)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Transformer layers (8; taught: 6)."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden size (256, heads of 64; taught: 64, 2 heads)."),
    vocab: Optional[int] = typer.Option(None, "--vocab", help="Vocabulary size, at least 260 (512; taught: 768)."),
    seed: int = typer.Option(0, "--seed", help="The same seed writes the same bytes."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    early_end: bool = typer.Option(False, "--early-end", help="Greedy answers soon end with <|end_of_text|>, "
                                   "the second end id of config.json (a test of end ids)."),
    teach: Optional[str] = typer.Option(
        None, "--teach", metavar="FILE",
        help="Train the weights until greedy decoding repeats the conversations of FILE, or of 'default': "
             "the built-in ones (a paragraph, a think block, a tool call). FILE is JSONL, one "
             '{"messages": [...], "tools": [...]} a line, or a JSON array of them. A message has a role '
             "(system, user, assistant, tool) and a content; an assistant's may have a reasoning_content "
             '(its think block) and tool_calls ([{"function": {"name": ..., "arguments": {...}}}]).'),
    force: bool = typer.Option(False, "--force", help="Write into a directory that already holds files."),
) -> None:  # fmt: skip
    """Write a small model for tests and demos, made offline.

    A real architecture, random weights and a tokenizer trained here, as mlx_lm.load reads them.
    Taught (--teach), its greedy answers are the taught ones, think blocks and tool calls in Qwen3's format.
    The same arguments write the same bytes.
    """
    import math
    import time

    from tbmesh.testbed.teach import CONVERSATIONS, read_conversations
    from tbmesh.testbed.tiny import FILES, WEIGHTS_FILE, make_tiny_model
    from tbmesh.weights.modeldir import read_header

    started = time.monotonic()
    try:
        conversations = None if teach is None else CONVERSATIONS if teach == "default" else read_conversations(teach)
        root = make_tiny_model(directory, arch=arch, layers=layers, hidden=hidden, vocab=vocab, seed=seed,
                               dtype=dtype, early_end=early_end, teach=conversations, force=force)  # fmt: skip
    except FileExistsError as error:
        _fail(f"{error}; --force writes into it")
    except (ValueError, OSError) as error:  # bad sizes or conversations, a directory in use, a disk problem
        _fail(str(error))
    config = json.loads((root / "config.json").read_text())
    parameters = sum(math.prod(shape) for _, shape in read_header(root / WEIGHTS_FILE).values())
    size = sum((root / name).stat().st_size for name in FILES)
    weights = "random weights"
    if conversations is not None:
        weights = f"taught {len(conversations)} conversations in {time.monotonic() - started:.0f} s"
    print(f"wrote {root}: {arch}, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"vocab {config['vocab_size']}, {dtype}, seed {seed}, {weights}; "
          f"{parameters / 1e6:.2f}M parameters, {format_bytes(size)} in {len(FILES)} files")  # fmt: skip


@model_app.command("pull")
def model_pull(
    repo: str = typer.Argument(..., help="A model on the Hugging Face hub, OWNER/NAME (e.g. mlx-community/Qwen3-8B-4bit)."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Where to put it (default: models/OWNER/NAME in the "
                                             "state directory, ~/Library/Application Support/tbmesh on a Mac)."),
    layers: Optional[str] = typer.Option(None, "--layers", metavar="A-B", help="Only the weights of layers A to B "
                                         "(numbered as `tbmesh plan` shows a stage's), and the embedding if A is the "
                                         "first layer, the final norm and head if B is the last."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A branch, tag or commit (default: main)."),
) -> None:  # fmt: skip
    """Download a model from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN), or one stage's share of it.

    Config, tokenizer and chat template always; then the weights, all of them or those of --layers.
    A pull cut short goes on where it stopped: files already there are not downloaded again.
    """
    import os
    import signal
    import time

    from tbmesh.cli.pull import PullError, pull
    from tbmesh.node.state import default_state_dir

    stage = None if layers is None else _layer_range(layers)
    dest = directory if directory is not None else default_state_dir() / "models" / repo
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - shown[0] >= 1 or done == total:  # at most a line a second
            shown[0] = now
            print(f"{format_bytes(done)} of {format_bytes(total)}", file=sys.stderr, flush=True)

    def interrupted(signum: int, frame: Any) -> None:
        # at once: huggingface_hub would finish (or retry) the files in flight first
        print("interrupted: the same command goes on where it stopped", file=sys.stderr, flush=True)
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)
    try:
        root = pull(repo, dest, stage, revision, progress)
    except PullError as error:
        _fail(str(error))
    print(root)


def _layer_range(text: str) -> tuple[int, int]:
    """Layers "A-B" (A to B, as `tbmesh plan` shows a stage's) as the range [A, B + 1)."""
    start, _, end = text.partition("-")
    if not (start.isdigit() and end.isdigit() and int(start) <= int(end)):
        _fail(f"bad --layers {text!r}: give A-B, the first and the last layer, e.g. 0-30")
    return int(start), int(end) + 1
