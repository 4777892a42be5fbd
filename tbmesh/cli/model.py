"""`tbmesh model tiny` and `tbmesh model pull`: make or download model directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from tbmesh.cli.app import fail_usage
from tbmesh.core.units import format_bytes
from tbmesh.testbed.sizes import ARCHITECTURES, DTYPES, HEAD_DIM, RANDOM_SIZES, TAUGHT_SIZES


model_app = typer.Typer(help="Make or download model directories.", no_args_is_help=True)


@model_app.command("tiny")
def model_tiny(
    directory: Path = typer.Argument(..., help="Where to write the model (a new or empty directory)."),
    arch: str = typer.Option(ARCHITECTURES[0], "--arch", help=f"{', '.join(ARCHITECTURES[:-1])} or {ARCHITECTURES[-1]} (qwen3_moe: 8 experts, 2 per token)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Transformer layers.", show_default=f"{RANDOM_SIZES['layers']}; taught: {TAUGHT_SIZES['layers']}"),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden size.", show_default=f"{RANDOM_SIZES['hidden']}, heads of {HEAD_DIM}; taught: {TAUGHT_SIZES['hidden']}, {TAUGHT_SIZES['heads']} heads"),
    vocab: Optional[int] = typer.Option(None, "--vocab", help="Vocabulary size, at least 260.", show_default=f"{RANDOM_SIZES['vocab']}; taught: {TAUGHT_SIZES['vocab']}"),
    seed: int = typer.Option(0, "--seed", help="The same seed writes the same bytes."),
    dtype: str = typer.Option(DTYPES[0], "--dtype", help=f"{', '.join(DTYPES[:-1])} or {DTYPES[-1]}."),
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
        fail_usage(f"{error}; --force writes into it")
    except (ValueError, OSError) as error:  # bad sizes or conversations, a directory in use, a disk problem
        fail_usage(str(error))
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
    directory: Optional[Path] = typer.Option(None, "--dir", help="Where to put it.", show_default="models/OWNER/NAME in the "
                                             "state directory, ~/Library/Application Support/tbmesh on a Mac"),
    layers: Optional[str] = typer.Option(None, "--layers", metavar="A-B", help="Only the weights of layers A to B "
                                         "(numbered as `tbmesh plan` shows a stage's), and the embedding if A is the "
                                         "first layer, the final norm and head if B is the last."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A branch, tag or commit.", show_default="main"),
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
        fail_usage(str(error))
    print(root)


def _layer_range(text: str) -> tuple[int, int]:
    """Layers "A-B" (A to B, as `tbmesh plan` shows a stage's) as the range [A, B + 1)."""
    start, _, end = text.partition("-")
    if not (start.isdigit() and end.isdigit() and int(start) <= int(end)):
        fail_usage(f"bad --layers {text!r}: give A-B, the first and the last layer, e.g. 0-30")
    return int(start), int(end) + 1

