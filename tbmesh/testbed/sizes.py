"""The shapes a tiny model can take, and their defaults, without MLX: `tbmesh model tiny`
shows them in its --help, which must not import MLX (tbmesh.testbed.tiny makes the model)."""

from __future__ import annotations

ARCHITECTURES = ("llama", "qwen3", "qwen3_moe")  # the first is the default
DTYPES = ("float32", "bfloat16", "float16")  # the first is the default
HEAD_DIM = 64  # as in real models: a narrow model gets fewer heads, not narrower ones
RANDOM_SIZES = {"layers": 8, "hidden": 256, "vocab": 512}
# A taught model is narrow, so a CPU trains it in seconds, has 6 layers to split over stages,
# and a vocabulary that holds the corpus' words (fewer tokens to learn: 15 to 20 steps).
TAUGHT_SIZES = {"layers": 6, "hidden": 64, "heads": 2, "kv_heads": 1, "intermediate": 128, "vocab": 768}
