"""What the serving engine counts (in its status), kept by its parts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counters:
    loads: int = 0  # shards loaded
    layers_read: int = 0  # layers read from disk
    layers_kept: int = 0  # layers a new shard took from one already in memory
    peak_weight_bytes: int = 0  # the most weight bytes held at once (at the end of a load)
    bytes_read: int = 0
    resumed: int = 0  # attempts started again on another route
    tokens: int = 0  # tokens streamed by this entry
    steps: int = 0  # steps this node's stages ran
    refused_nonfinite: int = 0  # rows of steps refused here: activations or outputs not finite
