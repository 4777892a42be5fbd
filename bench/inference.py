"""Inference through real daemons on loopback against single-process mlx-lm.

One random llama (tbmesh.testbed.tiny.make_tiny_model, float32; built once, cached under
/tmp/tbmesh-bench) served by clusters of 1, 2 and 3 `tbmesh daemon` processes on `lo`
(`--interface lo --memory 8GB --no-probe`, a cluster name each), all started at once and
measured in interleaved rounds, in rotating order, so that the load of this shared machine
drifts over every variant alike. The baseline, mlx-lm on the whole model (mlx_lm.load,
generate_step, temperature 0, the same prompt), runs in a worker process of its own, as a
daemon does, so that neither the HTTP clients nor this script share its interpreter.

  forward   one decode step of the whole model (model(token, cache), evaluated): the work a
            pipeline spreads over its stages
  decode    tokens/s from the first to the last token of a `--tokens`-token greedy answer;
            tbmesh through POST /v1/completions (streaming, the prompt as token ids, entering
            at the node of stage 0). The times of the server-sent events are mapped to token
            indices with the model's own streaming detokenizer (a token that ends inside a
            UTF-8 character sends no event), and every answer is checked to be mlx-lm's.
            Also, for reference, `mlx_sync`: the same model in a plain loop (forward, argmax,
            .item(), next token), i.e. without generate_step's async_eval overlap, which is
            how a pipeline stage must run (it needs the token before the next step); and
            `pipes_N`, the floor of an N-stage pipeline on this machine: N processes, each
            running tbmesh's Shard on its layers (the plan's split), joined by OS pipes in a
            ring, with no daemon, asyncio, threads or sockets: what splitting the model over
            processes costs here by itself
  ttft      time to first token of a `--prompt-tokens`-token prompt (max_tokens 1): request
            sent -> first event; mlx-lm: generate_step called -> first token
  aggregate tokens/s of 1, 4 and 8 concurrent streamed requests (distinct prompts, each
            `--concurrent-tokens` tokens) on the 3-stage cluster, and on the 1-stage one for
            reference: all tokens / (first request sent -> last token received)
  memory    per daemon: the plan's shard bytes; runtime.weight_bytes and active_memory from
            GET /status when loaded, and the largest active_memory seen while polling /status
            every 0.25 s during the prefill and concurrency runs; RSS when loaded, and peak RSS
            (the kernel's VmHWM) during the runs, counted afresh once the clusters serve: before
            that, every daemon's peak is its start-up, when it is alone for a moment, plans the
            whole model onto itself and loads it (shown apart). The baseline: MLX active memory
            of the whole model, MLX peak, RSS when loaded, peak RSS.

    .venv/bin/python bench/inference.py [--rounds 7] [--out bench/results/inference.json]

Every daemon is stopped at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

CACHE = Path(tempfile.gettempdir()) / "tbmesh-bench"
WORKER = "--baseline-worker"
RING = "--ring-stage"


# --- the single-process baseline, in a worker process --------------------------------------------


def worker_main(path: str) -> None:
    """mlx-lm on the whole model; answers JSON commands, one a line, on stdin."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr, not into the replies

    model, tokenizer = load(path)
    mx.eval(model.parameters())
    loaded = {"weight_bytes": sum(a.nbytes for _, a in tree_flatten(model.parameters())),
              "active_memory": mx.get_active_memory()}
    eos = set(tokenizer.eos_token_ids)

    def forward_ms(steps: int = 40) -> list[float]:
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([list(range(1, 33))]), cache=cache))
        times = []
        for i in range(steps):
            start = time.perf_counter()
            mx.eval(model(mx.array([[40 + i]]), cache=cache))
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def generate(prompt: list[int], max_tokens: int) -> dict[str, Any]:
        """generate_step as mlx-lm runs it: the next step is queued (async_eval) before the
        current token is returned. Times are seconds after the call."""
        tokens, times = [], []
        start = time.perf_counter()
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens):
            times.append(time.perf_counter() - start)
            if token in eos:
                break
            tokens.append(token)
        return {"tokens": tokens, "times": times}

    def sync(prompt: list[int], max_tokens: int) -> dict[str, Any]:
        """One step after the other, each evaluated before the next is built (as a stage)."""
        cache = make_prompt_cache(model)
        tokens, times = [], []
        start = time.perf_counter()
        x = mx.array(prompt)
        while x.size > 1:  # generate_step's prefill chunks
            n = min(2048, x.size - 1)
            model(x[:n][None], cache=cache)
            mx.eval([c.state for c in cache])
            x = x[n:]
        for _ in range(max_tokens):
            logits = model(x[None], cache=cache)[:, -1, :]
            token = mx.argmax(logits - mx.logsumexp(logits, keepdims=True), axis=-1).item()
            times.append(time.perf_counter() - start)
            if token in eos:
                break
            tokens.append(token)
            x = mx.array([token])
        return {"tokens": tokens, "times": times}

    def events(tokens: list[int]) -> dict[str, Any]:
        """The text of `tokens` and the index of the token that sends each piece of text the
        API streams (its streaming detokenizer, fed the same way)."""
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        emitted = []
        for i, token in enumerate(tokens):
            detokenizer.add_token(token)
            if detokenizer.last_segment:
                emitted.append(i)
        detokenizer.finalize()
        if detokenizer.last_segment:
            emitted.append(len(tokens) - 1)
        return {"text": detokenizer.text, "emitted": emitted}

    def batch(prompts: list[list[int]], max_tokens: int) -> list[list[float]]:
        """mlx-lm's own continuous batching in this process (BatchGenerator, as mlx_lm.server
        drives it: 32 decodes and 16 prompts at once): the time of each token of each prompt,
        in seconds after the call."""
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in eos],
                                   completion_batch_size=32, prefill_batch_size=16)
        start = time.perf_counter()
        uids = generator.insert(prompts, max_tokens=[max_tokens] * len(prompts))
        times: dict[int, list[float]] = {uid: [] for uid in uids}
        open_ = set(uids)
        while open_:
            for response in generator.next_generated():
                if response.finish_reason != "stop":  # an end token is no token of the answer
                    times[response.uid].append(time.perf_counter() - start)
                if response.finish_reason is not None:
                    open_.discard(response.uid)
        generator.close()
        return [times[uid] for uid in uids]

    def memory() -> dict[str, Any]:
        return {**loaded, "peak_memory": mx.get_peak_memory(), "vmhwm": vmhwm(os.getpid()),
                "vmrss": vmhwm(os.getpid(), "VmRSS")}

    def reset_peak() -> None:
        mx.reset_peak_memory()

    handlers = {"forward_ms": forward_ms, "generate": generate, "sync": sync, "events": events, "batch": batch,
                "encode": lambda text: tokenizer.encode(text), "memory": memory, "reset_peak": reset_peak}
    for line in sys.stdin:
        command = json.loads(line)
        try:
            replies.write(json.dumps({"ok": handlers[command["op"]](**command.get("args", {}))}) + "\n")
        except Exception as error:  # reported in the parent
            replies.write(json.dumps({"error": repr(error)}) + "\n")


class Baseline:
    """The parent's end of the worker."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, WORKER, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def call(self, op: str, **args: Any) -> Any:
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline worker exited ({self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"baseline {op}: {reply['error']}")
        return reply["ok"]

    def generate(self, prompt: list[int], max_tokens: int, sync: bool = False) -> tuple[list[int], list[float]]:
        reply = self.call("sync" if sync else "generate", prompt=prompt, max_tokens=max_tokens)
        return reply["tokens"], reply["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --- the floor: the same split over N processes joined by pipes, no daemon -------------------------


def ring_stage_main(path: str, start: int, end: int, read_fd: int, write_fd: int) -> None:
    """One stage of the pipe ring: frames in, our layers, frames out. A frame is a kind byte
    (P: a prompt, fresh cache; D: one decode step; Q: quit), a length and the payload:
    token ids into the first stage, float32 hidden states between stages, the argmax token
    out of the last."""
    import mlx.core as mx
    import numpy as np

    from tbmesh.runtime.shard import load_shard

    shard = load_shard(path, start, end)
    hidden = json.loads((Path(path) / "config.json").read_text())["hidden_size"]
    into, out = os.fdopen(read_fd, "rb", buffering=0), os.fdopen(write_fd, "wb", buffering=0)
    cache = shard.make_cache()
    while True:
        kind, payload = read_frame(into)
        if kind == b"Q":
            write_frame(out, kind, b"")
            return
        if kind == b"P":
            cache = shard.make_cache()
        x = np.frombuffer(payload, dtype=np.int32 if shard.first else np.float32)
        h = shard.forward(mx.array(x.reshape(1, -1) if shard.first else x.reshape(1, -1, hidden)), cache)
        if shard.last:
            payload = np.array([mx.argmax(h, axis=-1).item()], dtype=np.int32).tobytes()
        else:
            mx.eval(h)
            payload = np.array(h).tobytes()
        write_frame(out, kind, payload)


def read_frame(stream: Any) -> tuple[bytes, bytes]:
    head = stream.read(5)
    size = int.from_bytes(head[1:], "little")
    payload = b""
    while len(payload) < size:
        payload += stream.read(size - len(payload))
    return head[:1], payload


def write_frame(stream: Any, kind: bytes, payload: bytes) -> None:
    stream.write(kind + len(payload).to_bytes(4, "little") + payload)


class PipeRing:
    """N stage processes in a ring of pipes, this process at its ends; `prefix` goes before
    each stage's command (e.g. taskset)."""

    def __init__(self, path: Path, splits: list[tuple[int, int]], prefix: list[str] | None = None) -> None:
        self.size = len(splits)
        pipes = [os.pipe() for _ in range(self.size + 1)]
        self.procs = [subprocess.Popen([*(prefix or []), sys.executable, __file__, RING, str(path), str(a), str(b),
                                        str(pipes[i][0]), str(pipes[i + 1][1])],
                                       pass_fds=(pipes[i][0], pipes[i + 1][1]))
                      for i, (a, b) in enumerate(splits)]
        for r, w in pipes[1:-1]:
            os.close(r)
            os.close(w)
        os.close(pipes[0][0])
        os.close(pipes[-1][1])
        self.into = os.fdopen(pipes[0][1], "wb", buffering=0)
        self.out = os.fdopen(pipes[-1][0], "rb", buffering=0)

    def generate(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens and the seconds after the call at which each arrived."""
        import numpy as np

        tokens, times = [], []
        start = time.perf_counter()
        write_frame(self.into, b"P", np.array(prompt, dtype=np.int32).tobytes())
        while True:
            _, payload = read_frame(self.out)
            times.append(time.perf_counter() - start)
            tokens.append(int(np.frombuffer(payload, dtype=np.int32)[0]))
            if len(tokens) == max_tokens:
                return tokens, times
            write_frame(self.into, b"D", payload)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            write_frame(self.into, b"Q", b"")
            read_frame(self.out)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def vmhwm(pid: int, field: str = "VmHWM") -> int | None:
    """The process's peak resident set size (bytes), as the kernel counts it (VmRSS: the
    current one)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int) -> None:
    """Start the kernel's peak-RSS count (VmHWM) afresh (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def model_dir(layers: int, hidden: int, vocab: int) -> Path:
    """The benchmark model, made once (a marker file says it is complete)."""
    from tbmesh.testbed.tiny import make_tiny_model

    root = CACHE / f"llama-{layers}x{hidden}-v{vocab}-f32"
    if not (root / ".complete").exists():
        make_tiny_model(root, layers=layers, hidden=hidden, vocab=vocab, seed=0, force=True)
        (root / ".complete").write_text("")
    return root


# --- clusters of daemons -----------------------------------------------------------------------


class Cluster:
    def __init__(self, size: int, path: Path, work: Path, args: list[str] | None = None) -> None:
        """`size` daemons of one cluster; `args`: more `tbmesh daemon` flags (e.g. --context)."""
        from daemons import DaemonProcess

        self.size = size
        self.name = f"bench-{size}-{uuid.uuid4().hex[:8]}"
        self.daemons = [DaemonProcess(f"s{size}n{i}", work / self.name / f"n{i}",
                                      ["--interface", "lo", "--memory", "8GB", "--no-probe", "--model", str(path),
                                       "--cluster", self.name, "--log-level", "info", *(args or [])], log_dir=work)
                        for i in range(size)]
        self.model = path.name
        self.view: dict[str, Any] = {}
        self.ids: dict[str, str] = {}

    def serving(self, timeout: float = 120) -> None:
        """Wait for one plan of `size` stages with every shard loaded."""
        from daemons import agreed, wait_for

        def ready() -> dict[str, Any] | None:
            view = agreed(self.daemons)
            if view is None or len(view["plan"]["stages"]) != self.size:
                return None
            shards = [n["shard"] for n in view["nodes"] if n["shard"]]
            return view if len(shards) == self.size and all(s["loaded"] for s in shards) else None

        self.view = wait_for(ready, timeout, f"{self.size} loaded stages", step=0.2)
        self.ids = {d.name: d.node_id for d in self.daemons}

    def stages(self) -> list[tuple[Any, dict[str, Any]]]:
        """(daemon, plan stage) in stage order."""
        by_id = {self.ids[d.name]: d for d in self.daemons}
        return [(by_id[s["node"]], s) for s in self.view["plan"]["stages"]]

    @property
    def entry(self) -> Any:
        return self.stages()[0][0]  # requests enter at the node of stage 0

    def stop(self) -> None:
        for daemon in self.daemons:
            if daemon.alive():
                try:
                    daemon.terminate(10)
                except Exception:
                    daemon.kill()


def stream(daemon: Any, model: str, prompt: list[int], max_tokens: int,
           timeout: float = 300) -> tuple[float, list[float], str, dict[str, Any]]:
    """A streamed /v1/completions request: (time sent, time of each text event, text, usage
    with the time of the first event of any kind)."""
    host, port = daemon.api_url().split("//")[1].split(":")
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    connection.connect()
    times: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    first_event = None
    try:
        start = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{daemon.name}: HTTP {response.status}: {response.read()[:500]!r}")
        while line := response.readline():
            if not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            first_event = first_event or now
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{daemon.name}: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                if choice.get("text"):
                    times.append(now)
                    pieces.append(choice["text"])
    finally:
        connection.close()
    usage["first_event"] = first_event
    return start, times, "".join(pieces), usage


class StatusPoller:
    """The largest runtime.active_memory each daemon reports while polling is on."""

    def __init__(self, daemons: list[Any], interval: float = 0.25) -> None:
        self.daemons = daemons
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StatusPoller:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for daemon in self.daemons:
                try:
                    active = daemon.status()["runtime"]["active_memory"]
                except Exception:
                    continue
                self.peak[daemon.name] = max(self.peak.get(daemon.name, 0), active)


# --- the measurements ------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rotate(items: list, i: int) -> list:
    return items[i % len(items):] + items[:i % len(items)]


def decode_rate(emitted: list[int], times: list[float]) -> float:
    """Tokens/s between the first and the last event (sent by tokens `emitted`)."""
    span = emitted[-1] - emitted[0]
    return span / (times[-1] - times[0]) if span > 0 else float("nan")


def pick_prompts(baseline: Baseline, n: int, tokens: int) -> list[list[int]]:
    """`n` short prompts (the first words of the sentences of tiny's corpus) whose greedy answers
    run `tokens` tokens without EOS, so that every run does the same work."""
    from tbmesh.testbed.tiny import CORPUS

    starts = dict.fromkeys(" ".join(s.split()[:4]) for s in CORPUS.replace("\n", " ").split(". ")
                           if len(s.split()) >= 4)
    found = []
    for start in starts:
        prompt = baseline.call("encode", text=start)
        if len(baseline.generate(prompt, tokens)[0]) == tokens:
            found.append(prompt)
            if len(found) == n:
                return found
    raise RuntimeError(f"only {len(found)} of the corpus's sentences give {tokens} tokens without EOS")


def measure_decode(baseline: Baseline, clusters: list[Cluster], rings: list[PipeRing], prompt: list[int],
                   tokens: int, rounds: int) -> dict[str, Any]:
    expected, _ = baseline.generate(prompt, tokens)
    shown = baseline.call("events", tokens=expected)
    text, emitted = shown["text"], shown["emitted"]
    names = ["mlx_lm", "mlx_sync", *(f"pipes_{r.size}" for r in rings), *(f"tbmesh_{c.size}" for c in clusters)]
    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    variants: list[Any] = ["mlx_lm", "mlx_sync", *rings, *clusters]
    for r in range(rounds):
        got: dict[str, float] = {}
        for variant in rotate(variants, r):
            if isinstance(variant, PipeRing):
                out, times = variant.generate(prompt, len(expected))
                if out != expected:
                    raise RuntimeError(f"the ring of {variant.size} pipes gave other tokens than generate_step")
                got[f"pipes_{variant.size}"] = (len(out) - 1) / (times[-1] - times[0])
            elif isinstance(variant, str):
                out, times = baseline.generate(prompt, tokens, sync=variant == "mlx_sync")
                if out != expected:
                    raise RuntimeError(f"{variant} gave other tokens than generate_step")
                got[variant] = (len(out) - 1) / (times[len(out) - 1] - times[0])  # every token is timed
            else:
                _, times, answer, usage = stream(variant.entry, variant.model, prompt, tokens)
                if answer != text or usage.get("completion_tokens") != tokens or len(times) != len(emitted):
                    raise RuntimeError(f"tbmesh {variant.size} stages answered {answer!r} ({usage.get('completion_tokens')}"
                                       f" tokens, {len(times)} events), mlx-lm {text!r} ({len(emitted)} events)")
                got[f"tbmesh_{variant.size}"] = decode_rate(emitted, times)
        for name in names:
            rates[name].append(got[name])
        for name in ratios:
            ratios[name].append(got[name] / got["mlx_lm"])
        print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{k} {got[k]:.1f}" for k in names), flush=True)
    med = {k: median(v) for k, v in rates.items()}
    return {
        "tokens": tokens, "rounds": rounds, "events_per_answer": len(emitted),
        "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
        "ms_per_token": {k: round(1e3 / v, 2) for k, v in med.items()},
        "ratio_vs_mlx_lm": {k: round(median(v), 3) for k, v in ratios.items()},  # medians of paired ratios
        "extra_ms_per_token_vs_mlx_lm": {k: round(1e3 / med[k] - 1e3 / med["mlx_lm"], 2) for k in ratios},
        "runs_tokens_per_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        # tbmesh against the floor of its split on this machine (paired by round)
        "ratio_vs_pipes": {f"tbmesh_{n}": round(median([a / b for a, b in zip(rates[f"tbmesh_{n}"], rates[f"pipes_{n}"])]), 3)
                           for n in (r.size for r in rings) if f"tbmesh_{n}" in rates},
    }


def measure_ttft(baseline: Baseline, clusters: list[Cluster], prompt: list[int], rounds: int) -> dict[str, Any]:
    names = ["mlx_lm", *(f"tbmesh_{c.size}" for c in clusters)]
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    variants: list[Any] = ["mlx_lm", *clusters]
    for r in range(rounds):
        got: dict[str, float] = {}
        for variant in rotate(variants, r):
            if variant == "mlx_lm":
                got["mlx_lm"] = baseline.generate(prompt, 1)[1][0]
            else:
                start, _, _, usage = stream(variant.entry, variant.model, prompt, 1)
                got[f"tbmesh_{variant.size}"] = usage["first_event"] - start
        for name in names:
            times[name].append(got[name])
        for name in ratios:
            ratios[name].append(got[name] / got["mlx_lm"])
        print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{k} {got[k] * 1e3:.0f} ms" for k in names), flush=True)
    return {
        "prompt_tokens": len(prompt), "rounds": rounds,
        "ms": {k: round(median(v) * 1e3, 1) for k, v in times.items()},
        "ratio_vs_mlx_lm": {k: round(median(v), 3) for k, v in ratios.items()},  # medians of paired ratios
        "runs_ms": {k: [round(x * 1e3, 1) for x in v] for k, v in times.items()},
    }


def run_concurrent(cluster: Cluster, prompts: list[list[int]], tokens: int) -> float:
    """Aggregate tokens/s of len(prompts) requests sent at once."""
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = stream(cluster.entry, cluster.model, prompts[i], tokens)
        except BaseException as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    if errors or len(results) != len(prompts):
        raise RuntimeError(f"concurrent requests failed: {errors[:1]!r}")
    total = sum(usage["completion_tokens"] for _, _, _, usage in results.values())
    return total / (max(times[-1] for _, times, _, _ in results.values()) - start)


def measure_concurrency(clusters: list[Cluster], baseline: Baseline, levels: list[int], tokens: int,
                        rounds: int) -> dict[str, Any]:
    prompts = pick_prompts(baseline, max(levels), tokens)
    runs = {f"tbmesh_{c.size}": {n: [] for n in levels} for c in clusters}
    single = []
    cases: list[Any] = ["mlx_lm", *((c, n) for c in clusters for n in levels)]
    for r in range(rounds):
        line = []
        for case in rotate(cases, r):
            if case == "mlx_lm":  # one request of mlx-lm alone, for scale (from the call, as a request's)
                out, times = baseline.generate(prompts[0], tokens)
                single.append(len(out) / times[len(out) - 1])
                line.append(f"mlx_lm {single[-1]:.1f}")
            else:
                cluster, n = case
                runs[f"tbmesh_{cluster.size}"][n].append(run_concurrent(cluster, prompts[:n], tokens))
                line.append(f"{cluster.size}st x{n} {runs[f'tbmesh_{cluster.size}'][n][-1]:.1f}")
        print(f"  round {r + 1}/{rounds}: " + "  ".join(line), flush=True)
    out: dict[str, Any] = {"tokens_per_request": tokens, "rounds": rounds,
                           "mlx_lm_one_request_tokens_per_s": round(median(single), 2)}
    for name, by_n in runs.items():
        one = median(by_n[levels[0]])
        out[name] = {str(n): {"tokens_per_s": round(median(v), 2), "vs_one_request": round(median(v) / one, 3),
                              "vs_mlx_lm_one_request": round(median(v) / median(single), 3),
                              "runs": [round(x, 2) for x in v]} for n, v in by_n.items()}
    return out


def leg_name(a: tuple, b: tuple) -> str:
    (_, sa, wa, *_), (_, sb, wb, *_) = a, b
    if wa == "cstart" and wb == "cend":
        return f"compute, stage {sa} (array in, forward, eval, array or token out)"
    if wa == "cend" and wb == "computed":
        return f"stage {sa}: worker thread -> event loop"
    if wa == "arrive" and wb == "cstart":
        return f"stage {sa}: event loop -> worker thread"
    if wa == "computed" and wb in ("arrive", "token"):
        where = "loopback TCP" if sa != sb else "same process"
        return f"stage {sa} -> {'entry' if wb == 'token' else f'stage {sb}'} ({where})"
    if wa == "token" and wb in ("sse", "send"):
        return "entry: token -> " + ("SSE event written" if wb == "sse" else "next step sent")
    if wa == "sse" and wb == "send":
        return "entry: SSE event -> next step sent"
    if wa == "send" and wb == "arrive":
        return "entry: next step sent -> at stage 0"
    if wa == "arrive" and wb == "sse":  # the entry holds stage 0: the step is there before the event
        return "entry: next step at stage 0 -> SSE event written"
    return f"{wa}[{sa}] -> {wb}[{sb}]"


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--ttft-rounds", type=int, default=3)
    parser.add_argument("--concurrent-tokens", type=int, default=32)
    parser.add_argument("--concurrent-rounds", type=int, default=3)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    sizes = [int(n) for n in args.stages.split(",")]
    out = Path(args.out or ROOT / "bench/results/inference.json")

    began = time.perf_counter()
    path = model_dir(args.layers, args.hidden, args.vocab)
    work = Path(tempfile.mkdtemp(prefix="tbmesh-bench-inference-"))
    baseline = Baseline(path)
    # raw speed: no prefix cache (the rounds send the same prompts; bench/serving.py measures the cache)
    clusters = [Cluster(n, path, work, ["--no-prefix-cache"]) for n in sizes]
    everyone = [d for c in clusters for d in c.daemons]
    rings: list[PipeRing] = []
    results: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "command": " ".join([".venv/bin/python", "bench/inference.py", *sys.argv[1:]]),
    }

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        for daemon in everyone:  # their imports and MLX start-up overlap the baseline's
            daemon.launch()
        info = baseline.call("memory")
        forward = baseline.call("forward_ms")
        results["model"] = {"dir": path.name, "layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                            "dtype": "float32", "weight_bytes": info["weight_bytes"],
                            "forward_ms": round(median(forward), 2), "forward_ms_min": round(min(forward), 2)}
        print(f"model {path.name}: {info['weight_bytes'] / 1e6:.1f} MB of weights; one decode step of the "
              f"whole model {median(forward):.1f} ms (median of {len(forward)}; min {min(forward):.1f})", flush=True)
        for daemon in everyone:
            daemon.wait_started()
        for cluster in clusters:
            cluster.serving()
        print(f"clusters up after {time.perf_counter() - began:.0f} s: " + "; ".join(
            f"{c.size} stage(s): " + ", ".join(f"{d.name} layers {s['start']}-{s['end'] - 1}" for d, s in c.stages())
            for c in clusters), flush=True)
        loaded = {d.name: d.status()["runtime"] for d in everyone}
        rss_loaded = {d.name: vmhwm(d.proc.pid, "VmRSS") for d in everyone}  # before any request
        # each daemon's peak so far is its start-up (a lone daemon plans and loads the whole model
        # before its peers are found): the runs' peak is counted from here, for the baseline too
        rss_startup = {d.name: vmhwm(d.proc.pid) for d in everyone}
        for pid in [d.proc.pid for d in everyone] + [baseline.proc.pid]:
            reset_peak_rss(pid)

        prompt = pick_prompts(baseline, 1, args.tokens)[0]
        rings.extend(PipeRing(path, [(s["start"], s["end"]) for _, s in c.stages()]) for c in clusters if c.size > 1)
        print(f"decode: {args.tokens} tokens, {len(prompt)}-token prompt, {args.rounds} rounds (tokens/s)", flush=True)
        results["decode"] = measure_decode(baseline, clusters, rings, prompt, args.tokens, args.rounds)

        from tbmesh.testbed.tiny import CORPUS

        long_prompt = baseline.call("encode", text=CORPUS)[: args.prompt_tokens]
        poller = StatusPoller(everyone)
        baseline.call("reset_peak")
        print(f"time to first token: {len(long_prompt)}-token prompt, {args.ttft_rounds} rounds", flush=True)
        with poller:
            results["ttft"] = measure_ttft(baseline, clusters, long_prompt, args.ttft_rounds)
        print(f"aggregate: {levels} concurrent requests of {args.concurrent_tokens} tokens, "
              f"{args.concurrent_rounds} rounds (tokens/s)", flush=True)
        concurrent = [c for c in clusters if c.size in (1, max(sizes))]
        with poller:
            results["concurrency"] = measure_concurrency(concurrent, baseline, levels, args.concurrent_tokens,
                                                         args.concurrent_rounds)
        nodes = []
        for cluster in clusters:
            for daemon, stage in cluster.stages():
                runtime = loaded[daemon.name]
                nodes.append({
                    "stages": cluster.size, "node": daemon.name, "layers": f"{stage['start']}-{stage['end'] - 1}",
                    "plan_bytes": stage["bytes"], "weight_bytes": runtime["weight_bytes"],
                    "active_memory_loaded": runtime["active_memory"],
                    "active_memory_max_seen": poller.peak.get(daemon.name),
                    "active_memory_end": daemon.status()["runtime"]["active_memory"],
                    "rss_loaded": rss_loaded[daemon.name], "rss_peak": vmhwm(daemon.proc.pid),
                    "rss_peak_startup": rss_startup[daemon.name],
                })
        mem = baseline.call("memory")
        results["memory"] = {"nodes": nodes, "mlx_lm": {
            "weight_bytes": mem["weight_bytes"], "active_memory_loaded": mem["active_memory"],
            "peak_memory_prefill_and_decode": mem["peak_memory"], "rss_loaded": info["vmrss"],
            "rss_peak_startup": info["vmhwm"],
            "rss_peak": mem["vmhwm"]}}
        report(results)
    finally:
        for cluster in clusters:
            cluster.stop()
        for ring in rings:
            ring.close()
        baseline.close()
        results["seconds"] = round(time.perf_counter() - began, 1)
        if "decode" in results:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {out} ({results['seconds']:.0f} s in all); daemon logs in {work}")


def report(r: dict[str, Any]) -> None:
    m = r["model"]
    print(f"\nmodel: llama, {m['layers']} layers x {m['hidden']} hidden, vocab {m['vocab']}, float32, "
          f"{m['weight_bytes'] / 1e6:.1f} MB; one decode step of the whole model {m['forward_ms']:.1f} ms (median)")
    d = r["decode"]
    print(f"\ndecode, {d['tokens']} tokens at temperature 0, medians of {d['rounds']} rounds "
          "(ratio: median of the rounds' ratios)")
    print(f"| {'':<9} | {'tokens/s':>8} | {'ms/token':>8} | {'vs mlx_lm':>9} | {'extra ms/token':>14} |")
    for name, rate in d["tokens_per_s"].items():
        ratio, extra = d["ratio_vs_mlx_lm"].get(name), d["extra_ms_per_token_vs_mlx_lm"].get(name)
        print(f"| {name:<9} | {rate:8.2f} | {d['ms_per_token'][name]:8.2f} | "
              f"{'' if ratio is None else f'{ratio:.3f}':>9} | {'' if extra is None else f'{extra:+.2f}':>14} |")
    for name, ratio in d["ratio_vs_pipes"].items():
        print(f"{name} vs the same split over pipes without a daemon (pipes_{name[7:]}): {ratio:.3f}")
    t = r["ttft"]
    print(f"\ntime to first token, {t['prompt_tokens']}-token prompt, medians of {t['rounds']} rounds")
    print(f"| {'':<9} | {'ms':>8} | {'vs mlx_lm':>9} |")
    for name, ms in t["ms"].items():
        ratio = t["ratio_vs_mlx_lm"].get(name)
        print(f"| {name:<9} | {ms:8.1f} | {'' if ratio is None else f'{ratio:.3f}':>9} |")
    c = r["concurrency"]
    print(f"\naggregate tokens/s, {c['tokens_per_request']} tokens per request, medians of {c['rounds']} rounds; "
          f"mlx_lm, one request alone: {c['mlx_lm_one_request_tokens_per_s']:.1f}")
    for name, by_n in ((k, v) for k, v in c.items() if k.startswith("tbmesh_")):
        print(f"| {name:<9} | " + " | ".join(
            f"{n} concurrent: {v['tokens_per_s']:5.1f} ({v['vs_one_request']:.2f}x one request)"
            for n, v in by_n.items()) + " |")
    mem = r["memory"]
    print("\nmemory per node, MB (MLX max seen: polling /status every 0.25 s during prefill and concurrency; "
          "peak RSS: the kernel's, during the runs; start-up peak: before the clusters served)")
    print(f"| {'stages':>6} | {'node':<5} | {'layers':<6} | {'plan':>6} | {'weights':>7} | {'MLX active':>10} | "
          f"{'MLX max seen':>12} | {'RSS loaded':>10} | {'peak RSS':>8} | {'start-up peak RSS':>17} |")
    for n in mem["nodes"]:
        seen = n["active_memory_max_seen"]
        print(f"| {n['stages']:>6} | {n['node']:<5} | {n['layers']:<6} | {n['plan_bytes'] / 1e6:6.1f} | "
              f"{n['weight_bytes'] / 1e6:7.1f} | {n['active_memory_loaded'] / 1e6:10.1f} | "
              f"{'' if seen is None else f'{seen / 1e6:.1f}':>12} | {(n['rss_loaded'] or 0) / 1e6:10.1f} | "
              f"{(n['rss_peak'] or 0) / 1e6:8.1f} | {(n['rss_peak_startup'] or 0) / 1e6:17.1f} |")
    b = mem["mlx_lm"]
    print(f"mlx_lm (whole model, one process): weights {b['weight_bytes'] / 1e6:.1f} MB, MLX active "
          f"{b['active_memory_loaded'] / 1e6:.1f} MB, MLX peak {b['peak_memory_prefill_and_decode'] / 1e6:.1f} MB, "
          f"RSS loaded {(b['rss_loaded'] or 0) / 1e6:.1f} MB, peak RSS {(b['rss_peak'] or 0) / 1e6:.1f} MB "
          f"(loading: {(b['rss_peak_startup'] or 0) / 1e6:.1f} MB)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER:
        worker_main(sys.argv[2])
    elif len(sys.argv) == 7 and sys.argv[1] == RING:
        ring_stage_main(sys.argv[2], *map(int, sys.argv[3:]))
    else:
        main()
