"""`tbmesh plan`: how a model's layers would be split over a set of Macs, with no cluster running."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tbmesh.cli.app import fail_usage
from tbmesh.core.groups import MIN_SPEEDUP, PARALLEL, member_bytes
from tbmesh.core.jsonform import to_json
from tbmesh.core.types import LinkInfo, ModelSpec, NodeInfo, Placement
from tbmesh.core.units import format_bandwidth, format_bytes, parse_bandwidth, parse_size
from tbmesh.node.config import DaemonConfig
from tbmesh.serving.settings import ServingSettings

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 3  # and 2, a usage error (tbmesh.cli.app.EXIT_USAGE)
DEFAULT_CONTEXT = ServingSettings.context  # the daemon's: plan for the cluster it would run


class UsageError(ValueError):
    pass


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


# --- the command ----------------------------------------------------------------------


def plan(
    model: Optional[Path] = typer.Option(None, "--model", help="An mlx-lm model directory (config.json + safetensors)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A known model, e.g. kimi-k2-thinking (--list-presets)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="A made-up model of N equal layers (with --layer-size)."),
    layer_size: Optional[str] = typer.Option(None, "--layer-size", help="Bytes per layer for --layers, e.g. 10GB."),
    node: list[str] = typer.Option([], "--node", help="NAME:MEMORY, the usable memory of a Mac (repeat per Mac)."),
    link: list[str] = typer.Option([], "--link", help="A-B:BANDWIDTH[:rdma], a cable between two nodes, e.g. a-b:80Gbps (:rdma: both ends run RDMA on it)."),
    parallel: str = typer.Option(DaemonConfig.parallel, "--parallel", help=f"auto: tensor groups of Macs cabled all to all where the cost model projects a decode at least {MIN_SPEEDUP}x faster, else layers over Macs; pipeline: layers over Macs only; tensor: groups wherever possible (the daemon's --parallel)."),
    context: Optional[int] = typer.Option(None, "--context", help="Tokens of KV cache to leave room for.", show_default=f"{DEFAULT_CONTEXT}, the daemon's"),
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
        fail_usage(str(error))
    if as_json:
        print(json.dumps(placement_json(placement, request.model, request.context)))
    else:
        render(console, request, placement)
    raise typer.Exit(EXIT_FITS if placement.fits else EXIT_DOES_NOT_FIT)

