"""Render the README's figures from the JSON under bench/results/.

Every figure of the README sits between marker comments,

    <!-- figures: NAME -->
    ...
    <!-- /figures -->

and what is between them is made by the function RENDERERS[NAME] from the results files: the
tables, and the sentences that quote figures. Each block says which file and commit its
figures come from. No figure between the markers is typed by hand: to change one, run the
benchmark again (its command is in the block); to change the words around it, edit the
function here and run this script.

    .venv/bin/python bench/readme_tables.py           # rewrite README.md's blocks
    .venv/bin/python bench/readme_tables.py --check   # exit 1 when a block differs from its files

A results file measured on a commit known to predate the code it describes (STALE below) is
rendered as it is, saying so, until it is measured again.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"

# A block on lines of its own, or inline within a sentence (no newline inside).
BLOCK = re.compile(r"(<!-- figures: ([a-z0-9-]+) -->(\n?))(.*?)(\n?<!-- /figures -->)", re.DOTALL)

# Results measured on code that has changed since in what they measure: rendered with this note
# while the file still holds that commit's run.
STALE = {
    "daemon-join.json": ("f463fb2a0dc77aa2f4989b791f185d2e883c80b0", "before the serving engine"),
    "daemon-failure.json": ("f463fb2a0dc77aa2f4989b791f185d2e883c80b0", "before the serving engine"),
    "daemon-false-positives.json": ("f463fb2a0dc77aa2f4989b791f185d2e883c80b0", "before the serving engine"),
    "daemon-idle.json": ("f463fb2a0dc77aa2f4989b791f185d2e883c80b0", "before the serving engine"),
    "reassign.json": ("b853ca0eace8e7942d64a21a6858f1a93e92fec4", "on the deleted `tbmesh/pipeline.py`"),
    "chaos.json flap": ("c044ab8025be88c13bba31ff146bac896ec77d00",
                        "the commit before the two fixes described below"),
}


# --- reading the files ---------------------------------------------------------------------------


class Results:
    """The results files, each read once."""

    def __init__(self, directory: Path = RESULTS) -> None:
        self.directory = directory
        self.cache: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self.cache:
            self.cache[name] = json.loads((self.directory / name).read_text())
        return self.cache[name]


def commit_of(data: Any) -> str | None:
    """The commit a results file (or one of its keys) records, in any of the benches' spellings."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("commit"), str):
        return data["commit"]
    source = data.get("source")
    if isinstance(source, dict) and source.get("commit"):
        return source["commit"] + (" with uncommitted changes" if source.get("uncommitted") else "")
    return None


def commit_words(data: Any) -> str:
    """"commit 1234abc", with what commit_of says after the hash; or that none is recorded."""
    commit = commit_of(data)
    if not commit:
        return "commit not recorded"
    sha, _, rest = commit.partition(" ")
    return f"commit {sha[:7]}" + (f" {rest}" if rest else "")


def source(results: Results, *names: str) -> str:
    """One line: the files (a name may be "file key" for one key of a file) and their commits."""
    said_of: dict[str, list[str]] = {}  # what is said of the files -> the files, in order
    for name in names:
        file, _, key = name.partition(" ")
        data = results[file][key] if key else results[file]
        commit = commit_of(data)
        said = commit_words(data)
        stale = STALE.get(name)
        if stale and commit and commit.startswith(stale[0]):
            said += f", {stale[1]}: to be measured again"
        said_of.setdefault(said, []).append(f"`bench/results/{file}`" + (f" `{key}`" if key else ""))
    return "<sub>From " + "; ".join(f"{', '.join(labels)}: {said}" for said, labels in said_of.items()) + ".</sub>"


# --- formatting ----------------------------------------------------------------------------------


def x(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}x"


def num(value: int) -> str:
    """30210 -> "30 210", as the README writes counts."""
    return f"{value:,}".replace(",", " ")


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low.rstrip('x')}-{high}"


# --- the blocks ----------------------------------------------------------------------------------


def planner(r: Results) -> str:
    d = r["planner.json"]
    rows = "\n".join(f"| {row['nodes']} × {row['layers']} | {row['planner_ms']:.2f} ms | {row['fresh_ms']:.2f} ms "
                     f"| {row['ratio']:.2f} |" for row in d["rows"])
    return ("| nodes × layers | planner | from scratch | ratio |\n| --- | --- | --- | --- |\n"
            f"{rows}\n\n{source(r, 'planner.json')}")


def daemon(r: Results) -> str:
    join, fail = r["daemon-join.json"], r["daemon-failure.json"]
    fp, idle = r["daemon-false-positives.json"], r["daemon-idle.json"]
    med, kill, pull = join["medians"], fail["rows"]["kill"], fail["rows"]["pull"]
    loaded, unloaded = fp["loaded"], fp["unloaded"]
    a, bare = idle["processes"]["daemon a"], idle["processes"]["bare python"]
    false = loaded["false_positive_events"] + loaded["false_positive_log_lines"]
    return f"""| what | measured | target | baseline in the same run |
| --- | --- | --- | --- |
| join: cable plugged → every node lists the new Mac | {med['all_alive_s']:.2f} s | < {join['target_s']:g} s | TCP reachable after {med['floor_s']:.4f} s; {med['noticed_s']:.1f} s of it is the watcher's debounce |
| failure: `kill -9` → marked dead | {kill['dead_s']:.2f} s | < {fail['target_s']:g} s | {kill['real_over_simulated']:.3f}× the simulator's figure |
| failure: cable pulled → marked dead | {pull['dead_s']:.2f} s | < {fail['target_s']:g} s | {pull['real_over_simulated']:.3f}× the simulator's figure |
| false positives, {loaded['seconds'] / 60:.0f} min with both cores saturated by MLX | {false} | {fp['target_false_positives']} | heartbeat RTT {loaded['rtt_median_s'] * 1000:.1f} ms loaded vs {unloaded['rtt_median_s'] * 1000:.1f} ms unloaded |
| idle daemon (one peer), CPU | {a['cpu_percent']:.2f} % | < {idle['target_cpu_percent']:g} % | a bare process importing `mlx.core` and the daemon's module: {bare['cpu_percent']:g} % |
| idle daemon, RSS | {a['rss_mb']:.1f} MB | | the same bare process: {bare['rss_mb']:.1f} MB |

{source(r, 'daemon-join.json', 'daemon-failure.json', 'daemon-false-positives.json', 'daemon-idle.json')}"""


INFERENCE_FILES = ("inference.json", "inference-decode.json", "inference-512.json")


def inference(r: Results) -> str:
    rows = []
    for name in INFERENCE_FILES:
        d = r[name]
        m, ratio, pipes = d["model"], d["decode"]["ratio_vs_mlx_lm"], d["decode"]["ratio_vs_pipes"]
        args = d["command"].removeprefix(".venv/bin/python bench/inference.py").split(" --out ")[0].strip()
        rows.append(f"| {m['layers']} × {m['hidden']} ({m['forward_ms']:.0f} ms) | "
                    f"{'`' + args + '`' if args else 'none: the defaults'} (bench/results/{name}) | "
                    f"{x(ratio['tbmesh_1'])} | {x(ratio['tbmesh_2'])} | {x(ratio['tbmesh_3'])} | "
                    f"{x(ratio['pipes_2'])} / {x(ratio['pipes_3'])} | "
                    f"{x(pipes['tbmesh_2'])} / {x(pipes['tbmesh_3'])} |")
    return ("| model (one forward) | command | 1 stage | 2 stages | 3 stages | pipes_2 / pipes_3 "
            "| tbmesh vs pipes, 2 / 3 stages |\n| --- | --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n\n" + source(r, *INFERENCE_FILES))


def inference_notes(r: Results) -> str:
    vs_pipes = [v for n in INFERENCE_FILES for v in r[n]["decode"]["ratio_vs_pipes"].values()]
    floors = [r[n]["decode"]["ratio_vs_mlx_lm"][p] for n in INFERENCE_FILES for p in ("pipes_2", "pipes_3")]
    split = r["split.json"]
    s, rate = split["ratio_vs_1_stage"], split["tokens_per_s"]
    d = r["inference.json"]
    ttft, conc = d["ttft"], d["concurrency"]
    t = ttft["ratio_vs_mlx_lm"]
    one, three = conc["tbmesh_1"], conc["tbmesh_3"]
    return f"""The target we set (2 and 3 stages ≥ 0.90x of mlx-lm) assumed a hop costs tens of
microseconds; here the hops are not what costs: tbmesh runs at the speed of its split's
floor ({span(vs_pipes, x)} of `pipes_N`), and the floor itself is {span(floors, x)} of one process. The
cause is how this virtual machine schedules processes over its two vCPUs, not the split:
`.venv/bin/python bench/split.py` (bench/results/split.json) runs the pipe rings with 1, 2
and 3 stages free, and pinned all to one vCPU, in the same rounds. Free, 2 and 3 stages run
at {x(s['free_2'])} and {x(s['free_3'])} of 1 stage; pinned, at {x(s['pinned_2'])} and {x(s['pinned_3'])}: a stage that waits for its turn
wakes on an idle vCPU and computes slower. Pinning is no cure: one process pinned loses its
second vCPU ({x(rate['pinned_1'] / rate['free_1'])} of free). The default run also measures: time to first token for a
{ttft['prompt_tokens']}-token prompt, {x(t['tbmesh_1'])} / {x(t['tbmesh_2'])} / {x(t['tbmesh_3'])} of mlx-lm ({ttft['ms']['mlx_lm'] / 1000:.1f} s) for 1 / 2 / 3 stages; with
4 and 8 concurrent requests, 1 stage gives {x(one['4']['vs_one_request'])} and {x(one['8']['vs_one_request'])} one request's throughput
(batched steps), 3 stages {x(three['4']['vs_one_request'])} and {x(three['8']['vs_one_request'])} (batched steps, and the pipeline fills);
each node's MLX memory when loaded equals its shard's planned bytes.

{source(r, *INFERENCE_FILES, 'split.json')}"""


def serving(r: Results) -> str:
    d = r["serving.json"]
    one, conc, chat, exact = d["one_request"], d["concurrency"], d["chat"], d["exact_chat"]
    servers, ratios, levels = conc["servers"], conc["ratios"], [str(n) for n in conc["levels"]]
    mlx = one["servers"]["mlx_lm"]

    def per_level(key: str, bold: str | None = None) -> str:
        return " / ".join(f"**{x(ratios[key][n])}**" if n == bold else x(ratios[key][n]) for n in levels)

    def at8(server: str, what: str) -> str:
        s = servers[server]["8"]
        return f"{s[what + '_p50']:.0f} / {s[what + '_p95']:.0f} ms"

    def turn(server: str, key: str) -> str:
        return x(chat["ratios"][f"{server}/mlx_lm"][key])

    ch = chat["servers"]
    st, m = d["settings"], d["model"]
    flags = st["mlx_lm_server"]["flags"]
    intro = f"""**Serving against mlx_lm.server** (`{d['command']}`, {d['seconds'] / 60:.0f} minutes;
`--quick` for a smoke run; bench/results/serving.json): the same {m['layers']} × {m['hidden']} {m['dtype']} llama
served in one run by `mlx_lm.server` ({flags['--decode-concurrency']} decodes and {flags['--prompt-concurrency']} prompts batched, its prompt cache of
{flags['--prompt-cache-size']}), one tbmesh daemon and a 3-daemon pipeline (`--context` {st['context']}), all driven by the
official `openai` SDK (streaming chat completions, temperature 0, {st['tokens']} tokens; {'all ' + str(d['identity']['compared']) + ' answers compared were identical' if d['identity']['all_identical'] else str(d['identity']['differing']) + ' of ' + str(d['identity']['compared']) + ' answers compared differed'}
across the servers); and, for the concurrency runs, mlx-lm's own `BatchGenerator` in a process
with no server at all (`mlx_lm_batch`): the compute floor of batching with mlx-lm's caches on
this machine. Medians of {st['rounds']} interleaved rounds, as ratios to mlx_lm.server in the same rounds:

"""
    return intro + f"""| | mlx_lm.server | tbmesh, 1 stage | tbmesh, 3 stages | target |
| --- | --- | --- | --- | --- |
| one request: decode, time to first token | {mlx['decode_tokens_per_s']:.1f} tokens/s, {mlx['ttft_ms']:.0f} ms | {x(one['ratios']['tbmesh_1/mlx_lm']['decode_tokens_per_s'])}, {x(one['ratios']['tbmesh_1/mlx_lm']['ttft'])} | {x(one['ratios']['tbmesh_3/mlx_lm']['decode_tokens_per_s'])}, {x(one['ratios']['tbmesh_3/mlx_lm']['ttft'])} | ≥ 1.0x |
| aggregate tokens/s at {' / '.join(levels)} streams | {' / '.join(f"{servers['mlx_lm'][n]['tokens_per_s']:.1f}" for n in levels)} | {per_level('tbmesh_1/mlx_lm', '8')} | {per_level('tbmesh_3/mlx_lm')} | 8 streams, 1 stage ≥ 1.2x |
| … against mlx-lm's BatchGenerator with no server ({' / '.join(f"{servers['mlx_lm_batch'][n]['tokens_per_s']:.1f}" for n in levels)}) | {per_level('mlx_lm/mlx_lm_batch')} | {per_level('tbmesh_1/mlx_lm_batch')} | {per_level('tbmesh_3/mlx_lm_batch')} | |
| 3 stages against 1 stage at {' / '.join(levels)} streams | | | {per_level('tbmesh_3/tbmesh_1', '8')} | 8 streams ≥ 0.9x |
| time to first token at 8 streams, p50 / p95 | {at8('mlx_lm', 'ttft_ms')} | {at8('tbmesh_1', 'ttft_ms')} | {at8('tbmesh_3', 'ttft_ms')} | |
| inter-token latency at 8 streams, p50 / p95 | {at8('mlx_lm', 'itl_ms')} | {at8('tbmesh_1', 'itl_ms')} | {at8('tbmesh_3', 'itl_ms')} | |
| chat: turn 1 (a {d['settings']['system_prompt_tokens']}-token system prompt new to the server) | {ch['mlx_lm']['turn1_ttft_ms']:.0f} ms | {turn('tbmesh_1', 'turn1_ttft')} | {turn('tbmesh_3', 'turn1_ttft')} | |
| chat: turn 2 (the answer as text and one more question) | {ch['mlx_lm']['turn2_ttft_ms']:.0f} ms ({ch['mlx_lm']['turn2/turn1']:.2f} of turn 1) | {turn('tbmesh_1', 'turn2_ttft')} ({ch['tbmesh_1']['turn2/turn1']:.2f} of turn 1) | {turn('tbmesh_3', 'turn2_ttft')} ({ch['tbmesh_3']['turn2/turn1']:.2f}) | ≤ 1.2x mlx_lm.server |
| chat: a new conversation with the same system prompt | {ch['mlx_lm']['again_ttft_ms']:.0f} ms ({ch['mlx_lm']['again/turn1']:.2f} of turn 1) | {ch['tbmesh_1']['again/turn1']:.2f} of turn 1 | {ch['tbmesh_3']['again/turn1']:.2f} | |
| turn 2 as a real model's answer comes back (token ids) | (takes text only) | {exact['servers']['tbmesh_1']['turn2_ttft_ms']:.0f} ms, **{exact['servers']['tbmesh_1']['turn2/turn1']:.2f} of turn 1** | {exact['servers']['tbmesh_3']['turn2_ttft_ms']:.0f} ms, {exact['servers']['tbmesh_3']['turn2/turn1']:.2f} | ≤ 0.3x of turn 1 |

{source(r, 'serving.json')}"""


def serving_memory(r: Results) -> str:
    m = r["serving.json"]["memory"]
    one = [n for n in m["nodes"] if n["server"] == "tbmesh_1"]
    three = sorted((n for n in m["nodes"] if n["server"] == "tbmesh_3"), key=lambda n: int(n["layers"].split("-")[0]))
    mb = 1e6

    def over(nodes: list[dict]) -> str:
        worst = max(nodes, key=lambda n: n["active_memory_peak"] - n["planned_bytes"])
        extra = (worst["active_memory_peak"] - worst["planned_bytes"]) / mb
        return f" ({extra:.1f} MB over on one: a step's activations)" if extra >= 0.05 else ""

    rss3 = [n["rss_peak"] / mb for n in three]
    return f"""Memory under {m['streams']} streams: each daemon's MLX memory peaks at its planned bytes (the plan's
weights + the KV room of `--context`): {one[0]['active_memory_peak'] / mb:.1f} of {one[0]['planned_bytes'] / mb:.1f} MB for 1 stage,
{' / '.join(f"{n['active_memory_peak'] / mb:.1f}" for n in three)} of {' / '.join(f"{n['planned_bytes'] / mb:.1f}" for n in three)} MB for 3 stages{over(three)}; the
processes' peak RSS (Python, the libraries, MLX's buffer cache) is {one[0]['rss_peak'] / mb:.0f} MB for 1 stage,
{min(rss3):.0f}-{max(rss3):.0f} MB per stage, {m['mlx_lm']['rss_peak'] / mb:.0f} MB for mlx_lm.server.

{source(r, 'serving.json')}"""


def serving_notes(r: Results) -> str:
    d = r["serving.json"]
    ratios, servers = d["concurrency"]["ratios"], d["concurrency"]["servers"]
    floor = list(ratios["mlx_lm/mlx_lm_batch"].values())
    rounds = [a["tokens_per_s"] / b["tokens_per_s"]
              for a, b in zip(servers["tbmesh_1"]["8"]["runs"], servers["mlx_lm"]["8"]["runs"])]
    ch, exact, one = d["chat"]["servers"], d["exact_chat"]["servers"], d["one_request"]["ratios"]["tbmesh_1/mlx_lm"]
    solo = r["serving-one.json"]
    solo_ratio = solo["one_request"]["ratios"]["tbmesh_1/mlx_lm"]
    turn2 = [ch["mlx_lm"]["turn2/turn1"], ch["tbmesh_1"]["turn2/turn1"]]
    solo_args = solo["command"].removeprefix(".venv/bin/python bench/serving.py").split(" --out")[0].strip()
    return f"""- **8 streams on 1 stage: {x(ratios['tbmesh_1/mlx_lm']['8'])}, not quite 1.2x.** mlx_lm.server is as fast as mlx-lm's own
  `BatchGenerator` with no server around it ({span(floor, x)}): it has no serving overhead left to
  beat, and tbmesh runs the same batched math {x(ratios['tbmesh_1/mlx_lm_batch']['8'])} faster than that floor (it decodes while
  it prefills, so every step has work, and its first tokens come
  {servers['mlx_lm']['8']['ttft_ms_p50'] / servers['tbmesh_1']['8']['ttft_ms_p50']:.1f} times as early at the median; a one-stage
  lane builds its next step while the current one's tokens go out, as mlx-lm's async_eval
  does). The rest is compute: MLX's CPU matmuls run on one thread here. Single rounds give
  {span(rounds, x)}. On a Mac's GPU decode is memory-bound: a step of 8 costs about one step of 1, so
  batching gains several times more there, for both servers.
- **3 stages against 1: {x(ratios['tbmesh_3/tbmesh_1']['8'])} at 8 streams, {x(ratios['tbmesh_3/tbmesh_1']['16'])} at 16.** Each stage works on one lane
  while the others are on their way, so the pipeline fills: three processes use both vCPUs
  where one process uses one. With a core per stage (three Macs) the fill would approach 3x
  of one stage's throughput at the same per-Mac batch; here two vCPUs cap it near 2x. One
  request alone has nothing to fill the pipeline with and runs at the speed of its split
  ({x(ratios['tbmesh_3/tbmesh_1']['1'])} here; see *Inference through the pipeline* for the floor of a split).
- **The prefix cache.** Turn 2 of a conversation and a repeated system prompt start from the
  cache on both servers. The random model's answers are mostly bytes that are not whole
  characters and come back as U+FFFD, so the answer sent back re-tokenizes to other tokens
  and turn 2 re-prefills it ({span(turn2, lambda v: f'{v:.2f}')} of turn 1 on both servers). Sent back as its own
  tokens, as a real model's answer comes back, turn 2 prefills only the new question: {exact['tbmesh_1']['turn2/turn1']:.2f}
  of turn 1.
- **One request alone**: {x(one['decode_tokens_per_s'])} decode and {x(one['ttft'])} time to first token here; a {solo['one_request']['rounds']}-round run of
  one request (`{solo_args}`, bench/results/serving-one.json, before the
  step built ahead) gave {x(solo_ratio['decode_tokens_per_s'])} and {x(solo_ratio['ttft'])}.

{source(r, 'serving.json', 'serving-one.json')}"""


def reassign(r: Results) -> str:
    d = r["reassign.json"]
    rec, join = d["recovery"], d["join"]
    f, lead = rec["follower"], rec["leader"]
    fp, lp = f["phases_s"], lead["phases_s"]

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f}"

    model = d["model"]
    runs = join["matched"]
    stages = len(f["runs"][0]["old_plan"])  # ["n1 0-7", "n0 8-15", "n2 16-23"]
    middles = [run["bytes_over_least"] for run, victim in zip(f["runs"], f["victim_stages"]) if 0 < victim < stages - 1]
    middle = f"; {statistics.median(middles):.2f}× when the middle stage dies" if middles else ""
    return f"""A {model['layers']}-layer × {model['hidden']} {model['dtype']} llama of {model['weight_bytes'] / 1e6:.0f} MB, a {rec['tokens']}-token greedy answer, fresh daemons
for each of {f['matched']} runs, medians; every answer equal to single-process mlx-lm's:

| what | measured | baseline in the same run |
| --- | --- | --- |
| `kill -9` of a stage (3 daemons, loopback) → next token at the client | {f['recovery_s']:.2f} s | a normal gap between tokens: {ms(f['normal_gap_s'])} ms |
| … of which detection / planning / loading / resume | {ms(fp['detection'])} / {ms(fp['planning'])} / {ms(fp['loading'])} / {ms(fp['resume'])} ms | |
| … of which re-prefill of the prompt + tokens so far, and the next token | {f['reprefill_s']:.2f} s | a fresh request with that prompt: {f['fresh_ttft_s']:.2f} s ({f['reprefill_over_fresh_ttft']:.2f}×) |
| the same with the leader killed: detection / election / planning / loading | {ms(lp['detection'])} / {ms(lp['election'])} / {ms(lp['planning'])} / {ms(lp['loading'])} ms ({lead['recovery_s']:.2f} s in all) | |
| bytes read by the survivors | {f['bytes_read_total'] / 1e6:.1f} MB | the dead stage's {f['bytes_least'] / 1e6:.1f} MB ({f['bytes_over_least']:.2f}×{middle}) |
| join (namespaces): cable plugged → new Mac seen / plan prepared / committed | {ms(join['marks_s']['joined_at_leader'])} / {ms(join['marks_s']['prepare'])} / {ms(join['marks_s']['commit'])} ms | |
| join: pause of the running answer (largest gap after the commit − normal gap) | {ms(join['pause_largest_s'])} ms (target < {ms(join['target_pause_s'])} ms) | normal gap {ms(join['normal_gap_s'])} ms |
| join: layers read from disk | only those new to each Mac in {join['only_new_layers_read']} of {runs} runs | |

{source(r, 'reassign.json')}"""


def reassign_notes(r: Results) -> str:
    f = r["reassign.json"]["recovery"]["follower"]
    return f"""The re-prefill dominates a recovery, and it costs what a fresh request with the same prompt
costs: MLX's CPU backend on this machine gains nothing from batching a prefill, where a Mac's
GPU does it in one pass. A join costs a running answer no re-prefill: it finishes on the route
it started on, while the nodes keep the layers it uses; its pause is the loads of the new plan
sharing this machine's two cores. The {f['bytes_over_least']:.2f}× is the planner's objective (balance first, then
fewest bytes moved): when an end stage dies, the layers are spread over both survivors."""


API_NAMES = {"openai": "OpenAI", "anthropic": "Anthropic", "ollama": "Ollama", "tbmesh": "tbmesh's own"}


def fuzz_api(r: Results) -> str:
    d, pos = r["fuzz_api.json"], r["fuzz_api-positive.json"]

    def statuses(run: dict) -> str:
        return ", ".join(f"{num(n)} × {status}" for status, n in run["by_status"].items())

    def clean(run: dict) -> str:
        failures = "no failure" if not run["failures"] else f"failures: {run['failures']}"
        return f"{num(run['5xx'])} × 5xx, {num(run['schema_violations'])} schema violations, {failures}"

    def breakdown(run: dict) -> str:
        """Written by bench/fuzz_api.py since the runs above: the answers generated, and per API."""
        b = run.get("breakdown")
        if not b:
            return ""
        codes = ", ".join(f"{num(n)} `{code}`" for code, n in b["error_codes"].items())
        apis = "; ".join(f"{API_NAMES.get(api, api)}: {num(c['requests'])} requests, {statuses(c)}, {num(c['generated'])} "
                         f"generated answers ({num(c['streamed'])} streamed)" for api, c in b["by_api"].items())
        return (f" ({num(b['generated'])} generated answers, {num(b['streamed'])} of them streamed; "
                f"the 400s' codes: {codes or 'none'}; {apis})")

    s, p = d["settings"], pos["settings"]
    return f"""**Fuzzing the API** (`.venv/bin/python bench/fuzz_api.py --examples {s['examples']}`; {d['seconds'] / 60:.0f} minutes on
this machine while other work shared it): schemathesis (`st run`: examples, coverage,
fuzzing and stateful phases) against one daemon serving the tiny model with `--context {s['context']}`,
from the daemon's own `/openapi.json` (the OpenAI, Anthropic and Ollama endpoints and ours),
with every check of schemathesis and two of ours (tests/api_fuzz.py): every error in the
API's format, a valid request served or refused only for a model-dependent reason. Valid and
invalid requests (bench/results/fuzz_api.json, seed {s['seed']}, {d['date'][:10]}): **{num(d['requests'])} requests**,
{statuses(d)}{breakdown(d)}; **{clean(d)}**, the daemon {'alive' if d['daemon_alive_after'] else 'dead'} after. Valid requests only
(`--examples {p['examples']} --mode {p['mode']}`, bench/results/fuzz_api-positive.json, seed {p['seed']}, {pos['date'][:10]}, before
the Anthropic and Ollama endpoints): {num(pos['requests'])} requests, {statuses(pos)}{breakdown(pos)}; {clean(pos)}.

{source(r, 'fuzz_api.json', 'fuzz_api-positive.json')}"""


def rate(row: dict) -> str:
    return row["rate"].replace("mbit", " Mbit/s").replace("gbit", " Gbit/s")


def probe(r: Results) -> str:
    rows = r["probe.json"]["rows"]
    shaped = [row for row in rows if row["rate"] != "unshaped"]
    at1500 = [row for row in shaped if row["mtu"] == 1500]
    unshaped = [row["probe_gbit_median"] for row in rows if row["rate"] == "unshaped"]
    lost = {mtu: -statistics.median(row["error_vs_rate_pct"] for row in shaped if row["mtu"] == mtu) for mtu in (1500, 9000)}
    vs_ref = [row["probe_over_reference"] for row in shaped]
    probe_s = [row["probe_s_median"] for row in shaped] + [row["probe_s_max"] for row in shaped]
    return f"""**Bandwidth probe** (`.venv/bin/python bench/probe.py`; cables shaped with `tc tbf`):
the probe measures {', '.join(f"{row['probe_gbit_median']:.3f}" for row in at1500[:-1])} and {at1500[-1]['probe_gbit_median']:.3f} Gbit/s on {', '.join(rate(row) for row in at1500[:-1])} and {rate(at1500[-1])} cables at MTU 1500,
which is what TCP can carry through them (frame headers take {lost[1500]:.1f}% at MTU 1500,
{lost[9000]:.1f}% at MTU 9000), and {min(vs_ref):.3f} to {max(vs_ref):.3f}× a {r['probe.json']['reference_seconds']:g} s bulk TCP transfer through the same cable; each
probe takes {min(probe_s):.2f} to {max(probe_s):.2f} s. Its asyncio loop tops out near {statistics.median(unshaped):.0f} Gbit/s on this machine (unshaped), so
on faster links it reports that ceiling, not the cable's.

{source(r, 'probe.json')}"""


def secure(r: Results) -> str:
    d = r["secure.json"]
    hb, t8, dec, bulk = d["control"]["heartbeat"], d["control"]["tensor_8KiB"], d["decode"], d["bulk"]
    extra = [(c["rtt_us_on"] - c["rtt_us_off"]) for c in (hb, t8)]
    cpu = bulk["cpu_s_per_gb"]
    return f"""| figure | secret off | secret on | on / off |
| --- | --- | --- | --- |
| control round trip, a heartbeat (`peers.Channel` on loopback) | {hb['rtt_us_off']:.1f} µs | {hb['rtt_us_on']:.1f} µs | {x(hb['on_over_off'])} |
| control round trip, an 8 KiB tensor frame (a 1x1x2048 hidden state) | {t8['rtt_us_off']:.1f} µs | {t8['rtt_us_on']:.1f} µs | {x(t8['on_over_off'])} |
| decode through {dec['stages']} daemons on loopback ({dec['model']}, {dec['tokens']} tokens) | {dec['tok_s_off']:.2f} tok/s | {dec['tok_s_on']:.2f} tok/s | **{x(dec['on_over_off'], 3)}** |
| bulk fetch of {bulk['bytes'] / 1e6:.0f} MB over a {bulk['cable'].replace('gbit', ' Gbit/s')} cable (probe: {bulk['probe_gbit_s']:.3f} Gbit/s) | {bulk['fetch_gbit_s_off']:.3f} Gbit/s | {bulk['fetch_gbit_s_on']:.3f} Gbit/s | {x(bulk['on_over_off'], 3)}; **{x(bulk['on_over_probe'])}** of the cable |

{source(r, 'secure.json')}

A round trip with the secret seals and opens two records, with Python's `ssl` over memory
BIOs: {min(extra):.0f}-{max(extra):.0f} µs more here. A decode step here takes tens of ms, so a token through
{dec['stages']} stages does not notice (target: at most 5% on decode); on a Mac a step of a 600 GB model is
longer still. Bulk transfers are no longer `sendfile` with a secret: the file is read and
sealed a MiB at a time, which costs more CPU a fetched GB here ({cpu['on']:.1f} against {cpu['off']:.1f} CPU-s/GB
for both ends together) but keeps the cable full (target: at least 0.9x of the cable)."""


def sim(r: Results) -> str:
    rows = "\n".join(
        f"| {row['nodes']} | {row['crash']} | {row['detected_s']:.2f} s ({row['detected_heartbeats']:.1f} hb) | "
        f"{row['leader_s']:.2f} s ({row['leader_heartbeats']:.1f} hb) | {row['plan_s']:.2f} s ({row['plan_heartbeats']:.1f} hb) | "
        f"{row['plan_over_detected']:.2f} |" for row in r["sim.json"]["rows"])
    return ("| nodes | crash | detected | new leader | new plan | plan / detected |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + rows + "\n\n" + source(r, "sim.json"))


def weights(r: Results) -> str:
    d = r["weights.json"]
    rows = {row["mode"]: row for row in d["rows"]}
    lo = rows["loopback"]

    def shaped(mode: str) -> str:
        row = rows[mode]
        ok = "✓" if row["fetch_over_probe"] >= 0.9 else "(missed)"
        return (f"| cable shaped to {mode.replace('gbit', ' Gbit/s')} | {row['fetch_gbit_s']:.2f} Gbit/s | tbmesh's link probe "
                f"{row['probe_gbit_s']:.2f} Gbit/s; a bare sendfile copy + sha256 on the cable {row['sendfile_sha256_gbit_s']:.2f} | "
                f"**{x(row['fetch_over_probe'])}** / {x(row['fetch_over_sendfile_sha256'])} | ≥ 0.9x {ok} |")

    cp_ok = "✓" if lo["fetch_over_cp"] >= 0.8 else "(missed)"
    return f"""| | fetch | baseline (same run) | ratio | target |
| --- | --- | --- | --- | --- |
{shaped('1gbit')}
{shaped('5gbit')}
| loopback, unshaped | {lo['fetch_gbyte_s']:.2f} GB/s | `cp` {lo['cp_gbyte_s']:.2f} GB/s; a bare `sendfile` socket copy {lo['sendfile_gbyte_s']:.2f} GB/s; that copy + sha256 (one stream) {lo['sendfile_sha256_gbyte_s']:.2f} GB/s | {x(lo['fetch_over_cp'])} / {x(lo['fetch_over_sendfile'])} / **{x(lo['fetch_over_sendfile_sha256'])}** | ≥ 0.8x of cp {cp_ok} |

{source(r, 'weights.json')}"""


def weights_notes(r: Results) -> str:
    rows = {row["mode"]: row for row in r["weights.json"]["rows"]}
    lo, one, five, join, kimi = rows["loopback"], rows["1gbit"], rows["5gbit"], rows["join"], rows["kimi"]
    cpu = lo["cpu_s_per_gb"]
    j = join["median_s"]
    shards, copies = kimi["shard_gb"].values(), sorted(kimi["with_copies_gb"].values())
    return f"""On loopback nothing but the CPU bounds it, and `cp` does not verify: sha256 over every byte
costs about a CPU-second per GB here (a bare copy {cpu['sendfile']:.2f} CPU-s/GB, the same copy with sha256
{cpu['sendfile_sha256']:.2f}, the fetch {cpu['fetch']:.2f}: it also frames, queues and writes each object apart; `cp` {cpu['cp']:.2f}). The
fetch, with one connection per core (2 here), each hashing its own objects, keeps both
vCPUs busy ({lo['fetch_gbyte_s']:.2f} GB/s × {cpu['fetch']:.2f} CPU-s/GB = {lo['fetch_gbyte_s'] * cpu['fetch']:.1f} cores) and goes {x(lo['fetch_over_sendfile_sha256'])} as fast as a verified
copy on one stream; it cannot reach 0.8x of an unverified `cp` on two vCPUs.
The control connection on the same saturated cables: round trips median {one['control_rtt_ms']['fetching_median']:.1f} ms ({one['mode'].replace('gbit', ' Gbit/s')})
and {five['control_rtt_ms']['fetching_median']:.1f} ms ({five['mode'].replace('gbit', ' Gbit/s')}), max {max(one['control_rtt_ms']['fetching_max'], five['control_rtt_ms']['fetching_max']):.0f} ms (the tbf queue bounds them).

A Mac with no weights plugged into a serving one (`bench/weights.py --modes join`, a {join['fetched_mb']} MB
stage over a {join['cable'].replace('gbit', ' Gbit/s')} cable, medians of {len(join['rounds'])}): discovered {j['discovery']:.2f} s after the cable is plugged,
the plan at {j['plan']:.2f} s, fetched at {j['fetch']:.2f} s, loaded and serving at {j['serving']:.2f} s.

Disk per Mac for Kimi-K2-Thinking ({kimi['model_gb']:.0f} GB) on four 512 GB Studios (`--modes kimi`, from the
planner, no bytes): every Mac holding the whole model, as exo and mlx-lm's distributed tools
expect, is {num(round(kimi['full_copies_gb']))} GB; tbmesh's shards are {min(shards):.0f}-{max(shards):.0f} GB each ({sum(shards):.0f} GB in all); with 2 copies of
each layer, one Mac that pulled the whole model keeps it and the other three keep {copies[0]:.0f}-{copies[-2]:.0f} GB
({num(round(kimi['total_with_copies_gb']))} GB in all).

{source(r, 'weights.json')}"""


def manifest(r: Results) -> str:
    d = r["weights.json"]
    return (f"{d['checkpoint_bytes'] / 1e9:.2f} GB took {d['manifest_build_s']:.1f} s here, "
            f"bench/results/weights.json, {commit_words(d)}")


def tensor(r: Results) -> str:
    d = r["tensor.json"]["daemons"]
    t, gp, gl = d["tokens_per_s"], d["group_vs_process"], d["group_vs_pipeline"]
    shapes = {"1 process": "1 process", "pipeline of 2": "pipeline of 2 daemons", "group of 2": "tensor group of 2 (`ring`)"}
    rows = "\n".join(f"| {label} | {t[shape + ', 1 request']:.1f} | {t[shape + ', 8 requests']:.1f} |"
                     for shape, label in shapes.items())
    return f"""| served by daemons on loopback | 1 request | 8 requests |
| --- | --- | --- |
{rows}
| group vs 1 process | **{x(gp['1 request'])}** | **{x(gp['8 requests'])}** |
| group vs pipeline of 2 | **{x(gl['1 request'])}** | **{x(gl['8 requests'])}** |

{source(r, 'tensor.json daemons')}"""


def tensor_notes(r: Results) -> str:
    d = r["tensor.json"]
    spread = [run["tokens_per_s"] for run in d["daemons"]["figures"]["1 process, 8 requests"]]
    t, g = d["tokens_per_s"], d["group_vs_process"]
    idle = "uses no CPU" if max(d["idle_cpu_share_per_rank"]) < 0.01 else \
        f"uses {max(d['idle_cpu_share_per_rank']):.0%} of a core a rank"
    return f"""The rounds spread widely (1 process, 8 requests: {min(spread):.1f}-{max(spread):.1f} tokens/s). Without the daemons
(the workers driven by the scheduler in one process, `--modes workers`): the group of 2 gives
{x(g['1 request'])} of one process for 1 request and {x(g['8 requests'])} for 8 ({t['group of 2, 1 request']:.1f} vs {t['process, 1 request']:.1f} and {t['group of 2, 8 requests']:.1f} vs {t['process, 8 requests']:.1f} tokens/s),
a bare group without workers {x(d['bare_group_vs_process'])}; an idle group {idle}. What it costs here: two ranks
on two cores each read half the weights but wait for two TCP all-reduces a layer and for each
other, and the pipeline of two processes also keeps both cores busy once 8 requests fill it,
without the all-reduces. On Macs the speed-up comes from memory bandwidth (each rank reads
half of what a token needs) over RDMA's few-µs all-reduces (see the cost model above).

{source(r, 'tensor.json daemons', 'tensor.json')}"""


def tensor_projection(r: Results) -> str:
    """Not a measurement: tbmesh.core.tensor_cost's projection, computed here as
    `python -m tbmesh.core.tensor_cost` prints it (the cost model is pure)."""
    from tbmesh.core import tensor_cost as tc

    cal, kimi = tc.calibration(), "kimi-k2-thinking"
    shard, split = tc.decode_work(kimi), tc.decode_work(kimi, split_all=True)

    def up(work: Any, n: int, link: Any) -> str:
        return x(tc.speedup(work, n, link, cal))

    return f"""- `tbmesh/core/tensor_cost.py`: a decode cost model (bytes read per token over memory
  bandwidth; per layer two all-reduces at the link's latency), calibrated on exo's published
  {x(tc.EXO_SPEEDUP[2], 1)} on 2 M3 Ultra Studios and {tc.KIMI_4_STUDIOS_TOKENS_PER_S} tokens/s for Kimi-K2-Thinking on 4 (it gives {up(split, 4, tc.TB5_RDMA)}
  against exo's {x(tc.EXO_SPEEDUP[4], 1)}). **A projection, not a measurement**, for Kimi-K2-Thinking on M3
  Ultras over TB5 RDMA: {up(shard, 2, tc.TB5_RDMA)} the pipeline on 2 Macs and {up(shard, 4, tc.TB5_RDMA)} on 4 with mlx-lm's split
  (it keeps the head, router and MLA down-projections whole on every rank: {shard.whole_bytes / 1e9:.1f} GB of the
  {shard.weight_bytes / 1e9:.1f} GB a token reads); {up(split, 2, tc.TB5_RDMA)} and {up(split, 4, tc.TB5_RDMA)} if every weight were split. Over TB4 without RDMA:
  {up(shard, 2, tc.TB4_TCP)} and {up(shard, 4, tc.TB4_TCP)}. `python -m tbmesh.core.tensor_cost` prints it (this README's figures are computed
  from it by bench/readme_tables.py)."""


FAULTS = {"kill": "`kill -9` (then started again)", "restart": "restarted as itself", "stop": "SIGSTOP 0.3-4 s",
          "cable": "cable pulled 0.3-4 s", "partition": "partition 1-5 s", "flap": "cable flapping 3-10 times",
          "memory": "memory shrunk 1-4 s"}


SHORT = {"kill": "a `kill -9`", "restart": "a restart", "stop": "a SIGSTOP", "cable": "a cable pulled",
         "partition": "a partition", "flap": "a flapping cable", "memory": "a memory fault"}


def seconds3(q: dict) -> str:
    return " / ".join(f"{q[k]:.2f}" if q[k] < 1 else f"{q[k]:.1f}" for k in ("p50", "p95", "max")) + " s"


def chaos_campaign(r: Results) -> str:
    c = r["chaos.json"]["campaign"]
    rows = []
    for kind, label in FAULTS.items():
        f = c["by_fault"][kind]
        converged = seconds3(f["converge_s"])
        if "survivors_converge_s" in f:
            converged += f" (the survivors alone: {seconds3(f['survivors_converge_s'])})"
        rows.append(f"| {label} | {f['faults']} | {converged} | {seconds3(c['stall_s'][kind])} | "
                    f"{f['rss_growth_mb_max']:.0f} MB |")
    rows.append(f"| none (between faults) | | | {seconds3(c['stall_s']['none'])} | |")
    req = c["requests"]
    admitted = req.get("exact", 0) + req.get("entry died", 0) + req.get("wrong", 0) + req.get("lost", 0) + req.get("stalled", 0)
    longest = max(q["max"] for q in c["stall_s"].values())
    overlapped = " and ".join(SHORT[k] for k, q in c["stall_s"].items() if q["max"] == longest and k in SHORT)
    slowest = max(c["by_fault"].items(), key=lambda kv: kv[1]["converge_s"]["max"])
    stalls = [f for f in c["findings"] if f.get("what", "").startswith("stall")]
    return f"""**The figures** (`campaign --faults {c['faults']} --seed {c['seed']}`, {c['minutes']:.0f} minutes, {c['macs']} Macs, {c['clients']} clients,
load average {min(c['load_average']):.1f}-{max(c['load_average']):.1f} at the end):

| fault | faults | converged after the heal, p50 / p95 / max | longest stall of a request it overlapped, p50 / p95 / max | survivors' RSS, largest growth |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Requests checked: {num(admitted)} admitted; **{num(req.get('exact', 0))} exact, {req.get('wrong', 0)} wrong, {req.get('lost', 0)} lost** (the goal: {c['faults']} faults, 0
wrong, 0 lost); {req.get('entry died', 0)} entered a node that was killed (each ended for that reason, its text so
far a prefix of the reference); **{len(stalls)} stalls over the bound** (the longest, {longest:.1f} s, overlapped
{overlapped or 'no fault'}); {'every fault converged' if not c['not_converged'] else str(c['not_converged']) + ' faults did not converge'}, the slowest {slowest[1]['converge_s']['max']:.2f} s after its heal (a {slowest[0]});
{'no daemon crashed or logged an error' if not c['crashed'] and not c['error_lines'] else 'daemons crashed or logged errors'}; {'no survivor' + chr(39) + 's memory stayed up' if not c['memory_not_back'] else 'memory stayed up on ' + str(c['memory_not_back'])}.

{source(r, 'chaos.json campaign')}"""


def chaos_hostile(r: Results) -> str:
    c = r["chaos.json"]["campaign_hostile"]
    f, req = c["by_fault"], c["requests"]
    hostile = {k: f[k]["faults"] for k in ("relay", "stranger", "stray")}
    stalls = sorted((fd for fd in c["findings"] if fd.get("what", "").startswith("stall")),
                    key=lambda fd: float(fd["what"].split()[2]))
    by_bound: dict[str, list[str]] = {}  # "stall of 29.97 s > 12.42 s": the bound is 10 s + any SIGSTOP overlapped
    for fd in stalls:
        took, bound = re.fullmatch(r"stall of ([\d.]+) s > ([\d.]+) s", fd["what"]).groups()
        by_bound.setdefault(f"{float(bound):.1f}", []).append(f"{float(took):.1f}")
    stalled = "; ".join(f"{', '.join(took)} s against a bound of {bound} s" for bound, took in by_bound.items())
    longest = max(v["max"] for v in c["stall_s"].values())
    stall_text = (f"**no request stalled past its bound** (the longest wait for a piece: {longest:.1f} s)" if not stalls
                  else f"**{len(stalls)} requests stalled past the bound** ({stalled})")
    return f"""**With the stranger** (`sudo .venv/bin/python bench/chaos.py campaign --faults {c['faults']} --seed {c['seed']}
--hostile`, {c['minutes']:.1f} minutes): {c['faults']} faults in {c['groups']} groups, {sum(hostile.values())} of them hostile ({hostile['relay']} relays,
{hostile['stranger']} strangers dialling, {hostile['stray']} stray records): **{num(req.get('exact', 0))} answers exact, {req.get('wrong', 0)} wrong, {req.get('lost', 0)} lost,
{len(c['hostile_breaches'])} breaches** (no stranger's dial welcomed, no member listing the stranger), {req.get('entry died', 0)} into a node
that was killed (each a prefix of the reference), {'every fault converged' if not c['not_converged'] else str(c['not_converged']) + ' faults not converged'} (relay p95 {f['relay']['converge_s']['p95']:.2f} s,
stranger {f['stranger']['converge_s']['p95']:.2f} s, stray {f['stray']['converge_s']['p95']:.2f} s), {'no crash, no error line' if not c['crashed'] and not c['error_lines'] else 'crashes or error lines'}, and {stall_text}.

{source(r, 'chaos.json campaign_hostile')}"""


def chaos_flap(r: Results) -> str:
    c = r["chaos.json"]["flap"]
    stall = c["stall_s"]["flap"]
    return f"""**Cable flapping** (`flap --minutes {c['minutes']:g} --per-minute {c['per_minute']:g} --seed {c['seed']}`): the cable between
two consecutive stages went down and up {c['flaps']} times in {c['minutes']:g} minutes while the clients streamed:
{c['requests'].get('exact', 0)} answers, {'all exact' if set(c['requests']) == {'exact'} else c['requests']}; {c['plans_committed']} plans committed (no plan storm: the nodes stay
reachable through the others, and a short outage is no death); converged {c['converge_after_last_flap_s']:.2f} s after
the last flap (goal ≤ 1 s); the longest stall of a request p50 {stall['p50']:.2f} s, max {stall['max']:.2f} s;
{'no crash, no error line' if not c['crashed'] and not c['error_lines'] else 'crashes or error lines'}.

{source(r, 'chaos.json flap')}"""


def chaos_soak(r: Results) -> str:
    c = r["chaos.json"]["soak"]
    stall = c["stall_s"]["none"]
    growth = ", ".join(f"{v:+.1f}" for v in c["rss_growth_mb"].values())
    return f"""**{c['clients']} streams for {c['minutes']:g} minutes** (`soak`): {num(c['completed'])} answers, {'all exact' if set(c['requests']) == {'exact'} else c['requests']};
{'no error, no crash' if not c['crashed'] and not c['error_lines'] else 'errors or crashes'}; each daemon's RSS in the last minute against the second: {growth} MB.
{c['pieces_per_s']:.0f} pieces/s in all; {c['clients']} streams overload the KV room of 4096 tokens a stage, so requests
queue for it: a request's longest wait p50 {stall['p50']:.1f} s, max {stall['max']:.0f} s (a queue, not a stall: not judged).

{source(r, 'chaos.json soak')}"""


def fuzz_wire(r: Results) -> str:
    d = r["fuzz_wire.json"]
    c, a = d["campaign"], d["atheris"]
    m, mode = c["modes"], c["by_mode"]
    recorded = m["tls_listener"]["by_outcome"]["recorded refused"] + m["tls_dialer"]["by_outcome"]["recorded refused"]

    def accepted(side: str) -> int:
        o = m[side]["by_outcome"]
        return o["first accepted"] + o["second accepted"]

    rec = m["tls_records"]["by_outcome"]
    probes, alloc = c["allocation"]["probes"], c["allocation"]
    return f"""**Fuzzing the wire** (`{c['command'].removeprefix('python ')}`, bench/results/fuzz_wire.json):
mutations of valid frames of every message type (bit flips, insertions, truncations, splices,
length prefixes up to 4 GiB, msgpack type confusion), random bytes and streams cut at random
points, fed to the frame decoder, the handshake and the serving messages in-process; and, with
a cluster secret, real TLS 1.3 bytes between two sessions (recorded, or live for the case)
mutated byte by byte and record by record (dropped, replayed, reordered, cut, forged, taken
from another session, re-fragmented): first flights to a listener, server flights to a dialer,
and the sealed frames of an established pair. {num(c['cases'])} cases in {c['seconds']:.0f} s ({num(mode['frames'])} of frames, {num(mode['tls_listener'])}
TLS listener, {num(mode['tls_dialer'])} TLS dialer, {num(mode['tls_records'])} sealed frames), **{c['other_exceptions']} exceptions other than the protocol
error**. None of the {num(recorded)} replayed recorded flights completed a handshake; the mutated live
flights that did ({num(accepted('tls_listener'))} to a listener, {num(accepted('tls_dialer'))} to a dialer: re-fragmented handshake records, a
changed legacy record version, a dropped or extra ChangeCipherSpec, all allowed by TLS 1.3)
gave exactly the greeting sent; of the mutated sealed frames, {num(rec['refused'])} were refused and {num(rec['cut short'])}
stopped short (a last record incomplete, as from a slow peer) with a prefix of what was sent,
{num(rec['whole'])} mutations changed nothing: no changed record gave a byte of plaintext. A length prefix
claiming 4 GiB costs {probes['header_claims_4GiB']['peak_traced'] / 1000:.1f} KB, a tensor header announcing 512 MiB
{probes['tensor_claims_MAX_PAYLOAD_header_only']['peak_traced'] / 1000:.1f} KB (the payload buffer grows as bytes arrive); the largest traced peak of {num(alloc['measured_cases'])}
sampled cases is {alloc['closest_to_bound']:.1%} of the frame's own bound. A coverage-guided run (atheris,
`bench/atheris_wire.py`, `pip install -e '.[fuzz]'`, `{a['command'].removeprefix('python ')}`:
{num(a['executions'])} inputs, {a['coverage_edges']} edges covered) {'found nothing more' if not a['crashed'] else 'crashed'}.

{source(r, 'fuzz_wire.json campaign', 'fuzz_wire.json atheris')}"""


def finite_check(r: Results) -> str:
    data = r["finite_check.json"]
    rows = data["rows"] if isinstance(data, dict) else data  # a list before it recorded its commit

    def cost(stages: int, n: int) -> list[float]:
        row = next(x for x in rows if x["stages"] == stages and x["rows"] == n)
        return [row["median_cost"] * 100, row["mean_cost"] * 100]

    def pct(values: list[float]) -> str:
        low, high = min(values), max(values)
        return f"{low:+.1f}%" if f"{low:.1f}" == f"{high:.1f}" else f"{low:+.1f} to {high:+.1f}%"

    return (f"`bench/finite_check.py`, bench/results/finite_check.json, {commit_words(data)}: median and mean "
            f"{pct(cost(1, 1))} of a decode step of the 12 x 256 test model on one stage, {pct(cost(3, 1))} through "
            f"3 stages with one row, {pct(cost(3, 4))} with 4 rows; CPU time on this 2-vCPU machine")


RENDERERS: dict[str, Callable[[Results], str]] = {
    "planner": planner, "daemon": daemon, "inference": inference, "inference-notes": inference_notes,
    "serving": serving, "serving-memory": serving_memory, "serving-notes": serving_notes,
    "reassign": reassign, "reassign-notes": reassign_notes, "fuzz-api": fuzz_api, "probe": probe,
    "secure": secure, "sim": sim, "weights": weights, "weights-notes": weights_notes, "manifest": manifest,
    "tensor": tensor, "tensor-notes": tensor_notes, "tensor-projection": tensor_projection, "chaos-campaign": chaos_campaign,
    "chaos-hostile": chaos_hostile, "chaos-flap": chaos_flap, "chaos-soak": chaos_soak,
    "fuzz-wire": fuzz_wire, "finite-check": finite_check,
}


# --- the README ----------------------------------------------------------------------------------


def render(text: str, results: Results) -> str:
    """The README with every block rendered from the results; an unknown block is an error."""
    def one(match: re.Match) -> str:
        name = match.group(2)
        if name not in RENDERERS:
            raise KeyError(f"README block {name!r} has no renderer in bench/readme_tables.py")
        body = RENDERERS[name](results)
        if not match.group(3) and "\n" in body:
            raise ValueError(f"README block {name!r} is inline, and its rendering has more than one line")
        return f"{match.group(1)}{body}{match.group(5)}"

    return BLOCK.sub(one, text)


def blocks(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a block differs from its files")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    text = args.readme.read_text()
    rendered = render(text, Results(args.results))
    missing = sorted(set(RENDERERS) - set(blocks(text)))
    if missing:
        print(f"renderers with no block in {args.readme}: {', '.join(missing)}", file=sys.stderr)
    if args.check:
        if rendered != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True),
                                                       "README.md", "rendered from bench/results"))
            return 1
        return 1 if missing else 0
    if rendered != text:
        args.readme.write_text(rendered)
        print(f"rewrote {args.readme}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
