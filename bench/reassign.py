"""Hot re-assignment through real daemons: how long a running answer stops when a stage dies
or a Mac joins, where that time goes, and what is read from disk.

One random llama (tbmesh.testbed.tiny.make_tiny_model, 24 layers x 512 hidden, float32,
~300 MB; built once, cached under /tmp/tbmesh-bench, as bench/inference.py's) and one
temperature-0 prompt whose greedy answer has no end-of-sequence token for `--tokens` tokens
(bench/inference.py's pick_prompts). Every answer is compared with single-process mlx-lm's
(bench/inference.py's Baseline worker: mlx_lm.load + generate_step on the whole model).
Fresh daemons for every repetition; medians over `--reps`, each rep's raw figures kept.

  recovery  3 daemons on loopback (`--interface lo --memory 8GB --no-probe`). A streamed
            answer enters at stage 0's node; after `--kill-after` text pieces a stage is
            killed with `kill -9`:
              follower the middle stage, or the last when the middle one leads (never the
                       entry, never the leader: detection and election do not mix)
              leader   the leader (the entry is then another node)
            From the kill to the next piece the client receives, split by the daemons' own
            event stamps: detection (kill -> the victim's "dead" event at the leader, the
            new one for `leader`), election (-> the new leader's "leader" event; `leader`
            only), planning (-> "prepare" at the leader), loading (-> the "plan" commit at
            the leader), resume (-> "resumed" at the entry, once every stage serves the new
            plan), re-prefill + first token (-> the next piece at the client).
            Bytes loaded: the survivors' increase of runtime.bytes_read, against the least
            any plan must read (the dead stage's bytes in the old plan).
            Baselines measured in the same rep: the median gap between pieces before the
            kill, and the time to first token of a fresh request (on the survivors' plan,
            entering at the same node) whose prompt is the resumed attempt's prefill
            (prompt + the tokens streamed before the resume): re-prefill / fresh TTFT and
            recovery / normal gap.
  join      network namespaces (needs root; tests/netns.py): Macs a, b, c cabled as a mesh,
            Mac d with its daemon running alone (no cable; it loads the whole model for
            itself). A streamed answer enters at stage 0's node; after `--kill-after` pieces a
            cable c-d is plugged. From the cable's creation: "joined" (d, at the leader) ->
            "prepare" (a plan with d) -> "plan" (its commit) -> "resumed" at the entry, if the
            answer was moved (since requests in flight finish on their route, it is not). The
            pause the answer sees at the switch: the largest gap after the commit (and the
            gap around a "resumed" event, if any), minus the median gap before the plug
            (target < 100 ms); for a moved answer, as for recovery, the time to first token
            of a fresh request with the same prefill as the resumed attempt. Per
            node: bytes and layers read and layers kept (runtime counters) across the join,
            against the layers new to it (not in its plan's stage, nor held, before).

Event times are time.monotonic() in every daemon (CLOCK_MONOTONIC, one clock for every
process and network namespace), so they compare directly with this script's kill, plug and
piece-arrival times. Pieces are the API's text events (a token that ends inside a UTF-8
character sends none; this tokenizer's rarely do).

    .venv/bin/python bench/reassign.py recovery [--reps 5] [--variants follower,leader]
    .venv/bin/python bench/reassign.py join [--reps 5]
    .venv/bin/python bench/reassign.py all

--cold drops the model's files (only them) from the page cache just before the kill or plug,
so the survivors read their new layers from disk (results under recovery_cold, join_cold).
Results go to bench/results/reassign.json (a mode run alone replaces only its own key).
Every daemon and namespace is removed at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from daemon import RESULTS, kill9, median, ratio, rounded, source_version, workdir  # noqa: E402
from daemons import DaemonProcess, agreed, start_all, wait_for  # noqa: E402
from inference import Baseline, model_dir, pick_prompts  # noqa: E402
from netns import Lab, Mac, unavailable_reason  # noqa: E402
from serving import Stream  # noqa: E402

from tbmesh.core.membership import Timing  # noqa: E402

OUT = RESULTS / "reassign.json"
Status = dict[str, Any]
Reference = tuple[list[int], list[int], str]  # prompt, mlx-lm's tokens, their streamed text


# ----- daemons, streams, events ---------------------------------------------------------


def make_daemon(work: Path, cluster: str, name: str, model: Path, interface: str,
                mac: Mac | None = None) -> DaemonProcess:
    args = ["--interface", interface, "--memory", "8GB", "--no-probe", "--model", str(model),
            "--cluster", cluster, "--log-level", "info"]
    return DaemonProcess(name, work / cluster / name, args, mac=mac, log_dir=work / cluster)


def kill_all(daemons: Sequence[DaemonProcess]) -> None:
    for daemon in daemons:
        try:
            daemon.kill()
        except Exception as error:  # keep killing the others
            print(f"killing {daemon.name}: {error}", file=sys.stderr)


def serving(daemons: Sequence[DaemonProcess], stages: int, timeout: float = 120) -> Status:
    """One leader and one committed plan of `stages` stages over exactly these daemons,
    nothing being prepared, every stage serving the plan's epoch."""
    def ready() -> Status | None:
        view = agreed(list(daemons))
        if view is None or view["preparing"] is not None or len(view["plan"]["stages"]) != stages:
            return None
        epoch = view["plan"]["epoch"]
        on = {n["id"] for n in view["nodes"] if n["shard"] and n["shard"]["serving"] == epoch}
        return view if {s["node"] for s in view["plan"]["stages"]} <= on else None

    return wait_for(ready, timeout, f"a committed plan of {stages} stages that every stage serves",
                    step=0.1)


class Answer(Stream):
    """tests/serving.py's Stream (pieces and their time.monotonic() arrivals) for our model,
    the prompt given as token ids."""

    def __init__(self, daemon: DaemonProcess, model: str, prompt: list[int], max_tokens: int,
                 timeout: float = 180) -> None:
        self.model = model  # read by run(), which Stream.__init__ starts
        super().__init__(daemon, prompt, max_tokens, timeout, temperature=0)

    def run(self) -> None:
        self.body["model"] = self.model
        super().run()


def fresh_ttft(daemon: DaemonProcess, model: str, prompt: list[int], runs: int) -> list[float]:
    """Time to first piece of fresh one-token requests with this prompt (the same client
    and path as the streamed answers)."""
    out = []
    for _ in range(runs):
        sent = time.monotonic()
        answer = Answer(daemon, model, prompt, 1)
        answer.join(120)
        if answer.arrivals:
            out.append(answer.arrivals[0] - sent)
    return out


def outcome(answer: Answer, text: str) -> dict[str, Any]:
    """Whether the streamed answer is mlx-lm's (and how it ended when it is not)."""
    return {"matched": answer.text == text and answer.error is None and not answer.is_alive(),
            "pieces": len(answer.pieces), "error": answer.error,
            "prefix_of_reference": text.startswith(answer.text)}


def first_event(status: Status, kind: str, since: float, node: str | None = None,
                text: str | None = None) -> dict | None:
    """The first `kind` event at or after `since` (about `node`, with `text` in its detail)."""
    found = [e for e in status["events"] if e["kind"] == kind and e["at"] >= since
             and (node is None or e["node"] == node) and (text is None or text in e["detail"])]
    return min(found, key=lambda e: e["at"], default=None)


def at(event: dict | None) -> float | None:
    return None if event is None else event["at"]


def since(t: float | None, t0: float | None) -> float | None:
    return None if t is None or t0 is None else t - t0


def epoch_of(event: dict | None) -> int | None:
    m = re.match(r"epoch (\d+)", event["detail"]) if event else None
    return int(m.group(1)) if m else None


def gaps(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def normal_gap(arrivals: Sequence[float], until: float, skip: int = 3) -> float | None:
    """Median gap between pieces that arrived before `until`, the first `skip` gaps left out
    (the first steps of a request are slower)."""
    return median(gaps([t for t in arrivals if t < until])[skip:])


def gap_around(arrivals: Sequence[float], t: float) -> tuple[float, float] | None:
    """The pieces just before and just after time `t`."""
    after = next((i for i, a in enumerate(arrivals) if a > t), None)
    if after is None or after == 0:
        return None
    return arrivals[after - 1], arrivals[after]


def stage_names(plan: dict, names: dict[str, str]) -> list[str]:
    return [f"{names.get(s['node'], s['node'])} {s['start']}-{s['end'] - 1}" for s in plan["stages"]]


def phases(t0: float, marks: list[tuple[str, float | None]]) -> dict[str, float | None]:
    """Each phase: from the previous mark (the first: from t0) to its own mark."""
    out, last = {}, t0
    for name, t in marks:
        out[name] = since(t, last)
        last = t if t is not None else None
    return out


def evict_from_page_cache(model: Path) -> None:
    """Drop the model's files (only them) from the page cache, so the next load reads disk."""
    for file in model.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----- recovery ---------------------------------------------------------------------------


def pick_victim(view: Status, variant: str) -> tuple[str, str]:
    """(victim, entry) node ids. follower: the middle stage unless it leads (then the last),
    entering at stage 0; leader: the leader, entering at stage 0 unless that is the leader."""
    stages = [s["node"] for s in view["plan"]["stages"]]
    leader = view["leader"]
    if variant == "follower":
        return next(n for n in stages[1:] if n != leader), stages[0]
    return leader, next(n for n in stages if n != leader)


def recovery_rep(work: Path, model: Path, variant: str, prompt: list[int], expected: list[int],
                 text: str, args: argparse.Namespace) -> dict[str, Any]:
    cluster = f"reassign-{uuid.uuid4().hex[:8]}"
    daemons = [make_daemon(work, cluster, f"n{i}", model, "lo") for i in range(3)]
    try:
        start_all(daemons)
        view = serving(daemons, 3)
        ids = {d.node_id: d for d in daemons}
        names = {i: d.name for i, d in ids.items()}
        victim_id, entry_id = pick_victim(view, variant)
        victim, entry = ids[victim_id], ids[entry_id]
        survivors = [d for d in daemons if d is not victim]
        old_stages = view["plan"]["stages"]
        victim_stage = next(i for i, s in enumerate(old_stages) if s["node"] == victim_id)
        before = {d.name: d.status()["runtime"] for d in survivors}

        answer = Answer(entry, model.name, prompt, args.tokens)
        answer.wait_pieces(args.kill_after)
        if args.cold:
            evict_from_page_cache(model)
        t0 = kill9(victim)
        answer.join(180)
        after_view = serving(survivors, 2, timeout=60)
        statuses = {d.name: d.status() for d in survivors}

        leader_id = after_view["leader"]
        lead, ent = statuses[names[leader_id]], statuses[entry.name]
        dead = first_event(lead, "dead", t0, victim_id)
        elected = first_event(lead, "leader", t0, leader_id) if variant == "leader" else None
        prepare = first_event(lead, "prepare", t0)
        commit = first_event(lead, "plan", at(prepare) or t0, text=f"epoch {epoch_of(prepare)} ")
        resumed_all = [e for e in ent["events"] if e["kind"] == "resumed" and e["at"] >= t0]
        resumed = resumed_all[0] if resumed_all else None
        next_piece = next((a for a in answer.arrivals if a > at(resumed)), None) if resumed else None
        prefill_tokens = int(re.search(r"after (\d+) tokens", resumed["detail"]).group(1)) if resumed else None
        marks = [("detection", at(dead))] + ([("election", at(elected))] if variant == "leader" else []) + [
            ("planning", at(prepare)), ("loading", at(commit)), ("resume", at(resumed)),
            ("prefill_first_token", next_piece)]

        # baselines, on the same machine a moment later: a fresh request with the same prefill
        ttft = [] if prefill_tokens is None else \
            fresh_ttft(entry, model.name, prompt + expected[:prefill_tokens], args.ttft_runs)
        gap = normal_gap(answer.arrivals, t0)
        read = {d.name: statuses[d.name]["runtime"]["bytes_read"] - before[d.name]["bytes_read"]
                for d in survivors}
        least = old_stages[victim_stage]["bytes"]
        recovery = since(next_piece, t0)
        prefill = since(next_piece, at(resumed))
        return {
            "victim": {"name": victim.name, "stage": victim_stage, "was_leader": victim_id == view["leader"]},
            "entry": entry.name, "leader_after": names[leader_id],
            "old_plan": stage_names(view["plan"], names), "new_plan": stage_names(after_view["plan"], names),
            "pieces_before_kill": len([a for a in answer.arrivals if a <= t0]),
            "pieces_between_kill_and_resume": len([a for a in answer.arrivals if t0 < a <= (at(resumed) or 1e18)]),
            "resumed_events": len(resumed_all), "resumed_detail": resumed and resumed["detail"],
            "prefill_tokens": None if prefill_tokens is None else len(prompt) + prefill_tokens,
            "marks_s": {
                "suspect_at_entry": since(at(first_event(ent, "suspect", t0, victim_id)), t0),
                "dead_at_entry": since(at(first_event(ent, "dead", t0, victim_id)), t0),
                "dead_at_leader": since(at(dead), t0),
                "leader_elected": since(at(elected), t0),
                "prepare": since(at(prepare), t0), "commit": since(at(commit), t0),
                "commit_at_entry": since(at(first_event(ent, "plan", at(prepare) or t0)), t0),
                "resumed": since(at(resumed), t0), "next_piece": recovery},
            "phases_s": phases(t0, marks),
            "recovery_s": recovery, "kill_to_resumed_s": since(at(resumed), t0), "normal_gap_s": gap, "recovery_over_gap": ratio(recovery, gap),
            "reprefill_s": prefill, "fresh_ttft_s": median(ttft), "fresh_ttft_runs_s": ttft,
            "reprefill_over_fresh_ttft": ratio(prefill, median(ttft)),
            "bytes_read": read, "bytes_read_total": sum(read.values()), "bytes_least": least,
            "bytes_over_least": ratio(sum(read.values()), least),
            **outcome(answer, text),
        }
    finally:
        kill_all(daemons)


def print_recovery_rep(i: int, r: dict) -> None:
    p = {k: (v or 0) * 1e3 for k, v in r["phases_s"].items()}
    print(f"  rep {i + 1}: killed {r['victim']['name']} (stage {r['victim']['stage']}"
          f"{', leader' if r['victim']['was_leader'] else ''}); next piece after "
          f"{ms(r['recovery_s'])} = " + " + ".join(f"{k} {v:.0f}" for k, v in p.items())
          + f"; normal gap {ms(r['normal_gap_s'])}, re-prefill {ms(r['reprefill_s'])} vs fresh "
          f"TTFT {ms(r['fresh_ttft_s'])}; read {r['bytes_read_total'] / 1e6:.1f} MB "
          f"(least {r['bytes_least'] / 1e6:.1f}); answer {'= mlx-lm' if r['matched'] else 'DIFFERS'}",
          flush=True)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def summarize_recovery(reps: list[dict]) -> dict[str, Any]:
    keys = list(reps[0]["phases_s"])
    out = {
        "reps": len(reps),
        "phases_s": {k: median([r["phases_s"][k] for r in reps]) for k in keys},
        "marks_s": {k: median([r["marks_s"][k] for r in reps]) for k in reps[0]["marks_s"]},
    }
    for k in ("recovery_s", "kill_to_resumed_s", "normal_gap_s", "recovery_over_gap", "reprefill_s", "fresh_ttft_s",
              "reprefill_over_fresh_ttft", "bytes_read_total", "bytes_least", "bytes_over_least"):
        out[k] = median([r[k] for r in reps])
    out["matched"] = sum(r["matched"] for r in reps)
    out["victim_stages"] = [r["victim"]["stage"] for r in reps]
    return out


def bench_recovery(args: argparse.Namespace, model: Path, reference: Reference, work: Path) -> dict:
    prompt, expected, text = reference
    out: dict[str, Any] = {"command": command(), "prompt_tokens": len(prompt), "tokens": args.tokens,
                           "kill_after_pieces": args.kill_after}
    for variant in args.variants.split(","):
        print(f"-- recovery, victim: {variant}", flush=True)
        reps = []
        for i in range(args.reps):
            reps.append(recovery_rep(work, model, variant, prompt, expected, text, args))
            print_recovery_rep(i, reps[-1])
        out[variant] = {**summarize_recovery(reps), "runs": reps}
    return out


def report_recovery(result: dict) -> None:
    print(f"\nrecovery: 3 daemons on loopback, {result['tokens']}-token greedy answer, a stage killed "
          f"(kill -9) after {result['kill_after_pieces']} pieces; medians (ms)")
    for variant in ("follower", "leader"):
        if variant not in result:
            continue
        s = result[variant]
        print(f"  victim {variant} ({s['reps']} reps, stages killed {s['victim_stages']}; answers equal "
              f"to mlx-lm's: {s['matched']}/{s['reps']})")
        print("    kill -> next piece   " + ms(s["recovery_s"]) +
              f"   ({fmt_x(s['recovery_over_gap'])} the normal gap of {ms(s['normal_gap_s'])}; "
              f"kill -> resumed, all but the re-prefill: {ms(s['kill_to_resumed_s'])})")
        for k, v in s["phases_s"].items():
            print(f"      {k:22s} {ms(v):>8s}")
        print(f"    re-prefill + first token {ms(s['reprefill_s'])} vs fresh-request TTFT "
              f"{ms(s['fresh_ttft_s'])} (same prefill): {fmt_x(s['reprefill_over_fresh_ttft'])}")
        print(f"    bytes read by the survivors {s['bytes_read_total'] / 1e6:.1f} MB vs the dead stage's "
              f"{s['bytes_least'] / 1e6:.1f} MB: {fmt_x(s['bytes_over_least'])}")
        m = s["marks_s"]
        print(f"    (marks after the kill: suspect at entry {ms(m['suspect_at_entry'])}, dead at entry "
              f"{ms(m['dead_at_entry'])}, at leader {ms(m['dead_at_leader'])}, commit seen at entry "
              f"{ms(m['commit_at_entry'])})")


def signed_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:+.0f} ms"


def fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ----- join -------------------------------------------------------------------------------


def join_rep(work: Path, model: Path, reference: Reference, args: argparse.Namespace) -> dict:
    prompt, expected, text = reference
    cluster = f"reassign-{uuid.uuid4().hex[:8]}"
    with Lab() as lab:
        daemons: list[DaemonProcess] = []
        try:
            a, b, c, d = (lab.add_mac(n) for n in "abcd")
            for x, y in ((a, b), (b, c), (a, c)):
                lab.cable(x, y)
            daemons = [make_daemon(work, cluster, m.name, model, "tb*", m) for m in (a, b, c, d)]
            start_all(daemons)
            three, joiner = daemons[:3], daemons[3]
            view = serving(three, 3)
            wait_for(lambda: (rt := joiner.status()["runtime"])["held"] and rt["loading"] is None,
                     120, "d to load its own plan")
            ids = {x.node_id: x for x in daemons}
            names = {i: x.name for i, x in ids.items()}
            d_id = joiner.node_id
            entry = ids[view["plan"]["stages"][0]["node"]]
            before = {x.name: x.status()["runtime"] for x in daemons}

            answer = Answer(entry, model.name, prompt, args.tokens)
            answer.wait_pieces(args.kill_after)
            if args.cold:
                evict_from_page_cache(model)
            t0 = time.monotonic()
            lab.cable(c, d)
            plugged = time.monotonic()
            view4 = serving(daemons, 4, timeout=60)
            answer.join(180)
            statuses = {x.name: x.status() for x in daemons}

            lead, ent = statuses[names[view4["leader"]]], statuses[entry.name]
            joined = first_event(lead, "joined", t0, d_id)
            prepare = first_event(lead, "prepare", t0, text=f" {joiner.name} ")
            prepare = prepare or first_event(lead, "prepare", t0)
            commit = first_event(lead, "plan", at(prepare) or t0, text=f"epoch {epoch_of(prepare)} ")
            resumed = first_event(ent, "resumed", t0)
            prefill_tokens = int(re.search(r"after (\d+) tokens", resumed["detail"]).group(1)) if resumed else None
            ttft = [] if prefill_tokens is None else \
                fresh_ttft(entry, model.name, prompt + expected[:prefill_tokens], args.ttft_runs)
            around = gap_around(answer.arrivals, at(resumed)) if resumed else None
            switch_gap = None if around is None else around[1] - around[0]
            after_commit = [g for g, end in zip(gaps(answer.arrivals), answer.arrivals[1:])
                            if commit and end > at(commit)]
            largest = max(after_commit, default=None)
            gap = normal_gap(answer.arrivals, t0)
            later = median(gaps([x for x in answer.arrivals if around and x >= around[1]])[1:])
            old = {s["node"]: set(range(s["start"], s["end"])) for s in view["plan"]["stages"]}
            old[d_id] = set(range(*before[joiner.name]["held"][0])) if before[joiner.name]["held"] else set()
            nodes = {}
            for s in view4["plan"]["stages"]:
                name, new = names[s["node"]], set(range(s["start"], s["end"]))
                rt0, rt1 = before[name], statuses[name]["runtime"]
                nodes[name] = {
                    "old_layers": span(old.get(s["node"], set())), "new_layers": span(new),
                    "layers_new_to_it": len(new - old.get(s["node"], set())),
                    "held_before": rt0["held"],
                    "layers_read": rt1["layers_read"] - rt0["layers_read"],
                    "layers_kept": rt1["layers_kept"] - rt0["layers_kept"],
                    "bytes_read": rt1["bytes_read"] - rt0["bytes_read"],
                    "loads": rt1["loads"] - rt0["loads"], "stage_bytes": s["bytes"],
                    "held_after": rt1["held"]}
            return {
                "entry": entry.name, "leader": names[view4["leader"]],
                "old_plan": stage_names(view["plan"], names), "new_plan": stage_names(view4["plan"], names),
                "pieces_before_plug": len([x for x in answer.arrivals if x <= t0]),
                "marks_s": {"cable_created": plugged - t0,
                            "joined_at_leader": since(at(joined), t0),
                            "prepare": since(at(prepare), t0), "commit": since(at(commit), t0),
                            "commit_at_entry": since(at(first_event(ent, "plan", at(prepare) or t0)), t0),
                            "resumed_at_entry": since(at(resumed), t0),
                            "next_piece": None if around is None else around[1] - t0},
                "phases_s": phases(t0, [("cable_to_joined", at(joined)), ("joined_to_prepare", at(prepare)),
                                        ("prepare_to_commit", at(commit)), ("commit_to_resumed", at(resumed))]),
                "normal_gap_s": gap, "gap_after_switch_s": later,
                "switch_gap_s": switch_gap, "pause_s": since(switch_gap, gap),
                "largest_gap_after_commit_s": largest, "pause_largest_s": since(largest, gap),
                "resumed_detail": resumed and resumed["detail"],
                "prefill_tokens": None if prefill_tokens is None else len(prompt) + prefill_tokens,
                "fresh_ttft_s": median(ttft), "fresh_ttft_runs_s": ttft,
                "switch_gap_over_fresh_ttft": ratio(switch_gap, median(ttft)),
                "switch_gap_minus_fresh_ttft_s": since(switch_gap, median(ttft)),
                "nodes": nodes,
                "layers_read_beyond_new": sum(max(0, n["layers_read"] - n["layers_new_to_it"])
                                              for n in nodes.values()), "only_new_layers_read": all(n["layers_read"] == n["layers_new_to_it"]
                                                            for n in nodes.values()),
                "bytes_read_total": sum(n["bytes_read"] for n in nodes.values()),
                **outcome(answer, text),
            }
        finally:
            kill_all(daemons)


def span(layers: set[int]) -> str:
    return f"{min(layers)}-{max(layers)}" if layers else "-"


def print_join_rep(i: int, r: dict) -> None:
    m = r["marks_s"]
    read = ", ".join(f"{n} {v['layers_read']}/{v['layers_new_to_it']}" for n, v in r["nodes"].items())
    print(f"  rep {i + 1}: joined {ms(m['joined_at_leader'])}, prepare {ms(m['prepare'])}, commit "
          f"{ms(m['commit'])}, resumed {ms(m['resumed_at_entry'])}; gap at the switch "
          f"{ms(r['switch_gap_s'])} (normal {ms(r['normal_gap_s'])}: pause {ms(r['pause_s'])}; largest "
          f"after the commit {ms(r['largest_gap_after_commit_s'])}); layers read/new: {read}; answer "
          f"{'= mlx-lm' if r['matched'] else 'DIFFERS'}", flush=True)


def bench_join(args: argparse.Namespace, model: Path, reference: Reference, work: Path) -> dict:
    if (reason := unavailable_reason()) is not None:
        print(f"join skipped: {reason}")
        return {"skipped": reason}
    prompt = reference[0]
    reps = []
    print("-- join", flush=True)
    for i in range(args.reps):
        reps.append(join_rep(work, model, reference, args))
        print_join_rep(i, reps[-1])
    out: dict[str, Any] = {"command": command(), "prompt_tokens": len(prompt), "tokens": args.tokens,
                           "plug_after_pieces": args.kill_after, "reps": len(reps)}
    out["marks_s"] = {k: median([r["marks_s"][k] for r in reps]) for k in reps[0]["marks_s"]}
    out["phases_s"] = {k: median([r["phases_s"][k] for r in reps]) for k in reps[0]["phases_s"]}
    for k in ("normal_gap_s", "gap_after_switch_s", "switch_gap_s", "pause_s",
              "largest_gap_after_commit_s", "pause_largest_s", "bytes_read_total", "fresh_ttft_s",
              "switch_gap_over_fresh_ttft", "switch_gap_minus_fresh_ttft_s", "layers_read_beyond_new"):
        out[k] = median([r[k] for r in reps])
    out["matched"] = sum(r["matched"] for r in reps)
    out["only_new_layers_read"] = sum(r["only_new_layers_read"] for r in reps)
    out["target_pause_s"] = 0.1
    out["runs"] = reps
    return out


def report_join(r: dict) -> None:
    if "skipped" in r:
        return
    print(f"\njoin: netns, a-b-c meshed, d plugged to c after {r['plug_after_pieces']} pieces of a "
          f"{r['tokens']}-token answer; medians of {r['reps']} (ms after the cable's creation)")
    for k, v in r["marks_s"].items():
        print(f"    {k:22s} {ms(v):>8s}")
    # A request that was not moved (it finishes on its route) has no switch gap: its pause is
    # the largest gap after the commit, the loads and the commit's bookkeeping included.
    pause = r["pause_s"] if r["pause_s"] is not None else r["pause_largest_s"]
    print(f"  pause at the switch: gap {ms(r['switch_gap_s'])} - normal gap {ms(r['normal_gap_s'])} = "
          f"{ms(r['pause_s'])} (largest gap after the commit {ms(r['largest_gap_after_commit_s'])}: "
          f"{ms(r['pause_largest_s'])}); target < 100 ms -> "
          f"{'met' if (pause if pause is not None else 9) < 0.1 else 'MISSED'}")
    print(f"  the switch's gap vs a fresh request's TTFT with the same prefill ({ms(r['fresh_ttft_s'])}): "
          f"{fmt_x(r['switch_gap_over_fresh_ttft'])} (difference {signed_ms(r['switch_gap_minus_fresh_ttft_s'])})")
    print(f"  gap between pieces on the 4-stage plan: {ms(r['gap_after_switch_s'])}")
    print(f"  answers equal to mlx-lm's: {r['matched']}/{r['reps']}; reps where every node read exactly "
          f"the layers new to it: {r['only_new_layers_read']}/{r['reps']}; bytes read in all "
          f"{r['bytes_read_total'] / 1e6:.1f} MB, layers read beyond those new to their node "
          f"{r['layers_read_beyond_new']} (medians)")
    last = r["runs"][-1]
    print(f"  last rep: {' | '.join(last['old_plan'])}  ->  {' | '.join(last['new_plan'])}")
    for name, n in last["nodes"].items():
        print(f"    {name}: layers {n['old_layers']} -> {n['new_layers']}: read {n['layers_read']} "
              f"({n['bytes_read'] / 1e6:.1f} MB), kept {n['layers_kept']}, new to it {n['layers_new_to_it']} "
              f"(held before: {n['held_before']})")


# ----- main -------------------------------------------------------------------------------


def command() -> str:
    return " ".join([".venv/bin/python", "bench/reassign.py", *sys.argv[1:]])


def write(results: dict[str, Any]) -> None:
    """bench/results/reassign.json: the modes run now replace theirs, the others stay."""
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    meta = {"benchmark": "reassign", "when": datetime.now().isoformat(timespec="seconds"),
            "source": source_version(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "timing": Timing().__dict__}
    merged = {**old, **meta, **{k: rounded(v) for k, v in results.items()}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["recovery", "join", "all"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", default="follower,leader", help="recovery: whom to kill")
    parser.add_argument("--tokens", type=int, default=96, help="tokens of the streamed answer")
    parser.add_argument("--kill-after", type=int, default=40, help="pieces before the kill (or plug)")
    parser.add_argument("--ttft-runs", type=int, default=2, help="fresh requests per rep (TTFT baseline)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--cold", action="store_true",
                        help="drop the model's files from the page cache just before the kill/plug")
    parser.add_argument("--keep", action="store_true", help="keep the daemons' logs and state dirs")
    args = parser.parse_args()
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so every finally block kills what it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    model = model_dir(args.layers, args.hidden, args.vocab)
    results: dict[str, Any] = {}
    with workdir(args.keep) as work:
        baseline = Baseline(model)
        try:
            info = baseline.call("memory")
            results["model"] = {"dir": model.name, "layers": args.layers, "hidden": args.hidden,
                                "vocab": args.vocab, "dtype": "float32", "weight_bytes": info["weight_bytes"]}
            print(f"model {model.name}: {info['weight_bytes'] / 1e6:.1f} MB of weights", flush=True)
            prompt = pick_prompts(baseline, 1, args.tokens)[0]
            expected, _ = baseline.generate(prompt, args.tokens)
            reference = (prompt, expected, baseline.call("events", tokens=expected)["text"])
            suffix = "_cold" if args.cold else ""
            for mode, run in (("recovery", bench_recovery), ("join", bench_join)):
                if args.which in (mode, "all"):
                    began = time.monotonic()
                    results[mode + suffix] = run(args, model, reference, work)
                    results[mode + suffix]["seconds"] = time.monotonic() - began
        finally:
            baseline.close()
    for key, result in results.items():
        if key.startswith("recovery"):
            report_recovery(result)
        elif key.startswith("join"):
            report_join(result)
    write(results)


if __name__ == "__main__":
    main()
