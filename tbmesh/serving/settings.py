"""The serving engine's settings, each default documented once."""

from __future__ import annotations

from dataclasses import dataclass

# mlx-lm's KV caches grow by blocks of positions (KVCache.step, 256 there); ours by 32, so a
# short request does not hold 256 positions of room it never uses. A live cache of n tokens
# holds at most n + KV_BLOCK positions: the budget counts it so (scheduler.py).
KV_BLOCK = 32
DISK_RESERVE = 0.10  # of the disk left free: copies of layers never fill a Mac's disk (disk.py)


@dataclass(frozen=True)
class ServingSettings:
    context: int = 4096  # KV room of each stage, in tokens, across every request it holds
    prefill_chunk: int = 512  # the most prompt tokens one step prefills; a decode step runs between two
    max_batch: int = 32  # the most requests one decode step runs (mlx-lm's completion_batch_size)
    resume_wait: float = 30.0  # s a request waits for the cluster to serve again before it fails
    prefix_cache: bool = True  # keep the KV of recent prompts and answers to start new ones from
