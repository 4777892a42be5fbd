"""One frame of the `tbmesh status` screen, drawn from a daemon's GET /status.

Pure: render() takes the status (tbmesh.core.status.Status, read with from_json: what an older
daemon lacks reads as empty) and the terminal size and returns a rich renderable; the polling
loop is in status_chat.py.

Every line is built to fit the width (cells never wrap, bars are sized to the panel), except
the planner's no-fit reason, which is worth word-wrapping rather than cutting.
"""

from __future__ import annotations

import io
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tbmesh.core.status import DiskStatus, LinkStatus, NodeStatus, RuntimeStatus, ShardStatus, Status
from tbmesh.core.types import Stage, ranges_of
from tbmesh.core.units import format_bytes

MAX_EVENTS = 8
STATE_STYLES = {"alive": "green", "suspect": "yellow", "dead": "bold red"}
EVENT_STYLES = {"joined": "green", "left": "yellow", "suspect": "yellow", "dead": "red",
                "leader": "magenta", "plan": "cyan", "prepare": "blue", "no-fit": "red"}
# a colour per plan stage; the two block characters alternate so that stage boundaries show
# without colour too (pipes, tmux capture-pane)
STAGE_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "bright_red")
STAGE_BLOCKS = ("█", "▓")
EMPTY_BLOCK = "░"
PANEL_CHROME = 4  # a panel's two borders and its padding of one on each side


def render(status: Status, width: int, height: int | None = None, error: str | None = None) -> RenderableType:
    """The whole screen for `width` columns; with `height`, fewer events so that it fits."""
    names = {n.id: n.name or _short(n.id) for n in status.nodes}
    top: list[RenderableType] = []
    if error:
        top.append(Text(error, style="bold red"))
    top.append(_header(status, names, width))
    top += _nodes_and_links(status, names, width)
    serving = _serving(status.runtime, width - PANEL_CHROME)
    plan = _panel(Group(*_plan_lines(status, names, width - PANEL_CHROME), *serving), _plan_title(status))
    plan.subtitle, plan.subtitle_align = _runtime(status.runtime), "right"  # on its bottom border
    top.append(plan)
    limit = MAX_EVENTS if height is None else min(MAX_EVENTS, height - _lines(Group(*top), width) - 3)
    if limit > 0 and status.events:
        top.append(_panel(_events_table(status, limit), "events"))
    return Group(*top)


def _nodes_and_links(status: Status, names: dict[str, str], width: int) -> list[RenderableType]:
    """Side by side when both fit whole, else one above the other; on narrow screens the nodes
    table drops columns rather than cut names, and the links take two columns to save lines."""
    full = _nodes_table(status, squeeze=0)
    links = status.links
    links_table = _links_table(links, names)
    nodes_width, links_width = _width(full) + PANEL_CHROME, _width(links_table) + PANEL_CHROME
    if nodes_width + links_width <= width:
        rows = max(_table_height(status.nodes), _table_height(links))
        return [_side_by_side(_panel(full, "nodes"), _panel(links_table, "links"), nodes_width, rows)]
    nodes = full
    for squeeze in (1, 2, 3):
        if _width(nodes) + PANEL_CHROME <= width:
            break
        nodes = _nodes_table(status, squeeze)
    excess = _width(nodes) + PANEL_CHROME - width
    if excess > 0:  # the last resort before cutting text: shorter memory bars
        nodes = _nodes_table(status, 3, bar_width=max(8 - excess, 3))
    if len(links) > 1 and 2 * _width(links_table) + 3 + PANEL_CHROME <= width:
        half = (len(links) + 1) // 2
        grid = Table.grid(padding=(0, 3))
        grid.add_row(_links_table(links[:half], names), _links_table(links[half:], names))
        links_table = grid
    return [_panel(nodes, "nodes"), _panel(links_table, "links")]


# ----- header ---------------------------------------------------------------------------

def _header(status: Status, names: dict[str, str], width: int) -> Text:
    leader = status.leader
    parts = [
        Text.assemble(("tbmesh ", "bold"), (status.node.name or "?", "bold cyan")),
        Text.assemble(("cluster ", "dim"), status.cluster or "?"),
        Text.assemble(("leader ", "dim"), (_name(names, leader) if leader else "none yet",
                                           "magenta" if leader else "yellow")),
        Text.assemble(("term ", "dim"), str(status.term)),
        Text.assemble(("model ", "dim"), status.model or "none"),
    ]
    return _pack(parts, width)


# ----- nodes and links ------------------------------------------------------------------

def _nodes_table(status: Status, squeeze: int, bar_width: int | None = None) -> Table:
    """One row per node. To fit narrower screens, squeeze 1 drops the chip column and shortens
    the memory bars; squeeze 2 also leaves the followers' role blank (the leader's is shown);
    squeeze 3 drops the disk column (the plan panel tells of fetches)."""
    me = status.node.id
    compact = squeeze > 0
    table = _table()
    _column(table, "node", min_width=6)
    if not compact:
        _column(table, "chip", max_width=24)
    _column(table, "role")
    _column(table, "state")
    _column(table, "memory used / usable")
    _column(table, "compute", justify="right")
    _column(table, "layers")
    disks = squeeze < 3 and any(node.disk for node in status.nodes)
    if disks:
        _column(table, "disk")
    for node in status.nodes:
        # (an older daemon without "role": the leader is the one status names)
        leader = (node.role or ("leader" if node.id == status.leader else "")) == "leader"
        name = Text(("★ " if leader else "  ") + (node.name or _short(node.id)),
                    style="bold" if node.id == me else "")
        role = node.role if squeeze < 2 or leader else ""
        state = node.state or "?"
        row = [name] + ([node.chip] if not compact else [])
        row += [Text(role, style="magenta" if leader else "dim"),
                Text(state, style=STATE_STYLES.get(state, "")),
                _memory(node, bar_width or (8 if compact else 20)),
                _flops(node.flops),
                _layers(node.shard)]
        if disks:
            row.append(_disk(node.disk, compact))
        table.add_row(*row)
    return table


def _memory(node: NodeStatus, bar_width: int) -> Text:
    used = (node.shard.bytes or 0) if node.shard else 0  # the loaded shard; the rest of the usable memory is free
    usable = node.memory_usable
    filled = 0 if usable <= 0 else min(bar_width, round(bar_width * used / usable))
    used_text, usable_text = format_bytes(used), format_bytes(usable)
    if used_text.split()[-1] == usable_text.split()[-1]:  # "153.6/464.0 GB": one unit is enough
        used_text = used_text.split()[0] + "/"
    else:
        used_text += " / "
    return Text.assemble(("█" * filled, "green"), (EMPTY_BLOCK * (bar_width - filled), "dim"),
                         f" {used_text}{usable_text}")


def _layers(shard: ShardStatus | None) -> Text:
    if not shard or _span(shard) == (0, 0):
        return Text("")
    text = Text(_range(*_span(shard)))
    if shard.loaded:
        text.append(" loaded", style="green")
    else:  # still loading: how far
        text.append(f" {shard.progress:.0%}", style="yellow")
    return text


def _disk(disk: DiskStatus | None, compact: bool) -> Text:
    """The model's bytes on the node's disk, and a fetch under way: how far, how fast, from whom."""
    if not disk:
        return Text("")
    text = Text(format_bytes(disk.bytes))
    fetching = disk.fetching
    if fetching:
        done = fetching.done / max(fetching.total, 1)
        text.append(f" ↓{done:.0%}", style="yellow")
        if not compact:
            text.append(f" {_bandwidth(fetching.bytes_per_s * 8)}", style="yellow")
    return text


def _fetches(status: Status) -> list[Text]:
    """A line per node fetching weights: how far, how fast, from whom."""
    lines = []
    for node in status.nodes:
        fetching = node.disk.fetching if node.disk else None
        if fetching is None:
            continue
        lines.append(Text.assemble(
            (f"{node.name or _short(node.id)} fetching ", "yellow"),
            f"{format_bytes(fetching.done)} of {format_bytes(fetching.total)} at {_bandwidth(fetching.bytes_per_s * 8)}",
            (f" from {', '.join(fetching.sources)}" if fetching.sources else "", "dim")))
    return lines


def _links_table(links: tuple[LinkStatus, ...], names: dict[str, str]) -> Table | Text:
    if not links:
        return Text("no links measured yet", style="dim")
    table = _table()
    _column(table, "link")
    _column(table, "bandwidth", justify="right")
    _column(table, "RTT", justify="right")
    for link in links:
        ends = f"{_name(names, link.a)} ↔ {_name(names, link.b)}"
        ends += " RDMA" if link.rdma else ""  # both ends run RDMA: groups use jaccl
        table.add_row(ends, _bandwidth(link.bandwidth_bps), _rtt(link.rtt_s))
    return table


def _side_by_side(left: Panel, right: Panel, left_width: int, rows: int) -> Table:
    """Two panels on one row, of the same height so that their borders line up; the left one
    as wide as its table needs, the right one takes the rest."""
    left.height = right.height = rows + 2
    grid = Table.grid(expand=True)
    grid.add_column(width=left_width)
    grid.add_column(ratio=1)
    grid.add_row(left, right)
    return grid


# ----- the plan -------------------------------------------------------------------------

def _plan_title(status: Status) -> str:
    model = (status.plan.model if status.plan else "") or status.model
    return f"plan of {model}" if model else "plan"


def _plan_lines(status: Status, names: dict[str, str], width: int) -> list[RenderableType]:
    lines: list[RenderableType] = []
    plan = status.plan
    if plan and plan.stages:
        stages = plan.stages
        lines.append(_pack([Text(f"epoch {plan.epoch}", style="bold"),
                            Text(f"term {plan.term}"),
                            Text(f"{_layer_count(stages)} layers on {_plural(_member_count(stages), 'node')}",
                                 style="dim")], width))
        lines += _bar(stages, names, width)
        left_out = [_name(names, n) for n in plan.left_out]
        if left_out:
            lines.append(_pack([Text("left out:", style="yellow")] + [Text(n) for n in left_out], width))
    else:
        lines.append(_no_plan(status))
    lines += [_pack([line], width) for line in _fetches(status)]
    for node in status.nodes:  # left out of every plan: another model under the name
        if node.other_model:
            words = [Text(word) for word in node.other_model.split()]
            lines.append(_pack([Text("another model:", style="bold red"), *words], width, sep=" "))
    replicas = status.replicas
    if replicas and min(replicas) < 2:  # a dead Mac would take layers no other disk holds
        few = [i for i, n in enumerate(replicas) if n < 2]
        lines.append(_pack([Text("one copy on disk:", style="yellow"),
                            Text(", ".join(_range(a, b) for a, b in ranges_of(few))),
                            Text("(a Mac that dies takes them along)", style="dim")], width))
    preparing = status.preparing
    if preparing and preparing.plan.stages:
        lines.append(Text(""))
        lines.append(_pack([Text(f"preparing epoch {preparing.plan.epoch}", style="bold yellow"),
                            Text(f"term {preparing.plan.term}"),
                            Text("loading shards", style="dim")], width))
        lines += _bar(preparing.plan.stages, names, width, preparing.progress)
    return lines


def _no_plan(status: Status) -> Text:
    if status.no_fit:
        return Text.assemble(("does not fit: ", "bold red"), (status.no_fit, "red"))
    if not status.model:
        return Text("no model: this daemon only keeps membership (give it --model DIR to serve one)",
                    style="dim")
    if not status.leader:
        return Text("waiting for a leader…", style="yellow")
    return Text("waiting for the leader's plan…", style="yellow")


def _bar(stages: tuple[Stage, ...], names: dict[str, str], width: int,
         progress: dict[str, float] | None = None) -> list[Text]:
    """A bar of layer ranges, one segment per stage in proportion to its layers, labelled below;
    with `progress` ({node: 0..1}), each segment fills as its node loads its shard."""
    widths = _segment_widths([_layer_count([s]) for s in stages], width)
    bar, labels, legend, cut = Text(), Text(), [], False
    for i, (stage, cells) in enumerate(zip(stages, widths)):
        colour, block = STAGE_COLOURS[i % len(STAGE_COLOURS)], STAGE_BLOCKS[i % 2]
        label = f"{_members(names, stage)} {_range(*_span(stage))}"
        if progress is not None:
            done = max(0.0, min(1.0, progress.get(stage.node, 0.0)))
            filled = round(cells * done)
            bar.append(block * filled, colour)
            bar.append(EMPTY_BLOCK * (cells - filled), colour)
            label += f" {done:.0%}"
        else:
            bar.append(block * cells, colour)
        legend.append(Text(f"{block} {label}", style=colour))
        room = cells - 1 if i < len(stages) - 1 else cells  # a space between neighbouring labels
        piece = Text(label, style=colour)
        cut = cut or piece.cell_len > room
        piece.truncate(max(room, 0), overflow="ellipsis", pad=True)
        labels.append(piece)
        labels.append(" " * (cells - max(room, 0)))
    lines = [bar, labels]
    if cut:  # some labels did not fit their segment: list them all in full
        lines.append(_pack(legend, width))
    return lines


def _members(names: dict[str, str], stage: Stage) -> str:
    """A stage's Mac, or a tensor group's members on one segment: "studio1+studio2"."""
    return "+".join(_name(names, m) for m in stage.members)


def _member_count(stages: tuple[Stage, ...]) -> int:
    return sum(len(s.members) for s in stages)


def _segment_widths(sizes: list[int], width: int) -> list[int]:
    """Split `width` cells in proportion to `sizes`, at least one cell each (largest remainder)."""
    if not sizes:
        return []
    total = sum(sizes) or len(sizes)
    sizes = sizes if sum(sizes) else [1] * len(sizes)
    spare = max(width - len(sizes), 0)  # one cell each first, the rest shared out
    exact = [spare * s / total for s in sizes]
    widths = [1 + int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder[: max(width - sum(widths), 0)]:
        widths[i] += 1
    return widths


def _runtime(runtime: RuntimeStatus | None) -> Text | None:
    """Requests in flight, tokens/s and tokens."""
    if not runtime:
        return None
    return Text.assemble(" ", ("requests in flight ", "dim"), (str(runtime.requests), "bold"),
                         "  ", (f"{runtime.tokens_per_s:.1f}", "bold"), (" tokens/s", "dim"),
                         "  ", (f"{runtime.counters.tokens:,}", "bold"), (" tokens", "dim"), " ")


def _serving(runtime: RuntimeStatus | None, width: int) -> list[Text]:
    """The batch, the KV room and the prefix cache, from daemons that serve with them."""
    if not runtime or not runtime.scheduler.kv_room:
        return []
    scheduler, caches = runtime.scheduler, runtime.caches
    parts = [Text.assemble(("decoding ", "dim"), (str(scheduler.decoding), "bold"),
                           (" queued ", "dim"), (str(scheduler.queued), "bold")),
             Text.assemble(("KV ", "dim"), (f"{scheduler.kv_tokens:,}", "bold"),
                           (f" of {scheduler.kv_room:,} tokens", "dim"))]
    lookups, hits = scheduler.prefix_lookups, scheduler.prefix_hits
    cached = Text.assemble(("prefix cache ", "dim"), (f"{caches.prefix_tokens:,}", "bold"),
                           (" tokens ", "dim"), (format_bytes(caches.prefix_bytes), "bold"))
    if lookups:
        cached.append_text(Text.assemble(("  hits ", "dim"), (f"{hits / lookups:.0%}", "bold"),
                                         (f" of {lookups:,}", "dim")))
    return [_pack(parts + [cached], width)]


# ----- events ---------------------------------------------------------------------------

def _events_table(status: Status, limit: int) -> Table:
    """The newest `limit` events, newest first, with their age on the daemon's clock."""
    table = _table(header=False, expand=True)  # the details get all the room there is
    _column(table, "age", justify="right")
    _column(table, "kind")
    _column(table, "detail", ratio=1)
    for event in reversed(status.events[-limit:]):
        table.add_row(_age(status.now, event.at), Text(event.kind, style=EVENT_STYLES.get(event.kind, "")),
                      event.detail)
    return table


# ----- small helpers --------------------------------------------------------------------

def _panel(body: RenderableType, title: str) -> Panel:
    return Panel(body, title=title, title_align="left", box=box.ROUNDED, padding=(0, 1))


def _table(header: bool = True, expand: bool = False) -> Table:
    """A borderless table; its cells never wrap (see _column)."""
    return Table(box=None, show_header=header, header_style="dim", pad_edge=False,
                 expand=expand, padding=(0, 1))


def _column(table: Table, header: str, **kwargs: Any) -> None:
    """A column whose too-long cells end in "…" rather than wrap onto a second line."""
    table.add_column(header, no_wrap=True, overflow="ellipsis", **kwargs)


def _table_height(rows: tuple[Any, ...]) -> int:
    return 1 + max(len(rows), 1)  # the header and the rows (or one "none" line)


def _pack(parts: list[Text], width: int, sep: str = "  ") -> Text:
    """Parts on as few lines as fit `width`, never breaking a part (a too-long one gets "…")."""
    lines: list[Text] = []
    for part in parts:
        if lines and lines[-1].cell_len + len(sep) + part.cell_len <= width:
            lines[-1].append(sep)
            lines[-1].append_text(part)
        else:
            lines.append(part.copy())
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return Text("\n").join(lines)


def _width(renderable: RenderableType) -> int:
    """The cells `renderable` needs to show without cutting anything."""
    console = Console(width=1000, file=io.StringIO(), color_system=None)
    return Measurement.get(console, console.options, renderable).maximum


def _lines(renderable: RenderableType, width: int) -> int:
    """How many lines `renderable` takes at `width` (rendered in memory, not shown)."""
    console = Console(width=width, file=io.StringIO(), color_system=None)
    return len(console.render_lines(renderable, console.options, pad=False))


def _name(names: dict[str, str], node_id: str | None) -> str:
    return names.get(node_id or "") or _short(node_id)


def _short(node_id: str | None) -> str:
    return node_id[:8] if node_id else "?"


def _range(start: int, end: int) -> str:
    """Layers [start, end) as people count them: "0-15" (both ends included)."""
    if end - start <= 1:
        return str(start) if end - start == 1 else "none"
    return f"{start}-{end - 1}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _span(stage: Stage | ShardStatus) -> tuple[int, int]:
    """A stage's [start, end) of layers."""
    return stage.start, stage.end


def _layer_count(stages: tuple[Stage, ...]) -> int:
    return sum(max(0, end - start) for start, end in map(_span, stages))


def _flops(flops: float | None) -> str:
    if not flops:
        return "–"
    if flops >= 1e12:
        return f"{flops / 1e12:.1f} TFLOP/s"
    return f"{flops / 1e9:.1f} GFLOP/s"


def _bandwidth(bits_per_s: float | None) -> str:
    if not bits_per_s:
        return "–"  # not measured yet
    return f"{bits_per_s / 1e9:.1f} Gbit/s" if bits_per_s >= 1e9 else f"{bits_per_s / 1e6:.0f} Mbit/s"


def _rtt(seconds: float | None) -> str:
    if not seconds:
        return "–"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 0.9995e-3 else f"{seconds * 1e6:.0f} µs"


def _age(now: float, at: float) -> str:
    if not now or not at:  # a daemon that did not say
        return ""
    seconds = max(0, int(now - at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
