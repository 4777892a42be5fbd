"""The prefix cache's index: which token sequences the stages of one route keep the KV of.

Stage 0 of a route keeps this index and decides; every stage keeps the KV cache of its own
layers for each entry, under the entry's id, as the steps instruct (see messages.Step). A
prompt that starts with tokens an entry holds prefills only the rest: the stages copy the
entry's cache and trim it to the common prefix (mlx-lm's KV caches are trimmable), so one
entry serves every prompt that shares any prefix with it: a long system prompt repeated
across requests, or a conversation sent again with one more message.

Least recently used entries go first when room is needed (see scheduler.py); an entry that
is a prefix of a newer one goes at once (the newer one, trimmed, serves it).
"""

from __future__ import annotations

import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tbmesh.serving.messages import Origin


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts that started from an entry
    hit_tokens: int = 0  # prompt tokens not prefilled thanks to it
    inserted: int = 0
    evicted: int = 0


class PrefixIndex:
    def __init__(self) -> None:
        self._entries: OrderedDict[str, bytes] = OrderedDict()  # id -> tokens, oldest use first
        self.tokens = 0  # held by all entries
        self.stats = PrefixStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: str) -> bool:
        return entry in self._entries

    def length(self, entry: str) -> int:
        return len(self._entries[entry]) // 4

    def lookup(self, tokens: Sequence[int], limit: int) -> Origin | None:
        """The entry sharing the longest prefix with `tokens`, and how many of them (at most
        `limit`) it gives; None when none shares any."""
        self.stats.lookups += 1
        wanted = _packed(tokens)
        best, best_length = "", 0
        for entry, held in self._entries.items():
            length = min(_common(held, wanted), limit)
            if length > best_length:
                best, best_length = entry, length
        if not best_length:
            return None
        self._entries.move_to_end(best)
        self.stats.hits += 1
        self.stats.hit_tokens += best_length
        return Origin(best, best_length)

    def insert(self, entry: str, tokens: Sequence[int]) -> list[str]:
        """Add an entry; returns the entries it makes useless (the same tokens, or a prefix
        of them), which are gone from the index."""
        packed = _packed(tokens)
        gone = [e for e, held in self._entries.items() if packed.startswith(held)]
        for e in gone:
            self.remove(e)
        self._entries[entry] = packed
        self.tokens += len(tokens)
        self.stats.inserted += 1
        return gone

    def oldest(self, skip: set[str] = frozenset()) -> str | None:
        """The least recently used entry not in `skip`."""
        return next((e for e in self._entries if e not in skip), None)

    def remove(self, entry: str) -> None:
        held = self._entries.pop(entry, None)
        if held is not None:
            self.tokens -= len(held) // 4
            self.stats.evicted += 1

    def clear(self) -> list[str]:
        gone = list(self._entries)
        for entry in gone:
            self.remove(entry)
        return gone


def _packed(tokens: Sequence[int]) -> bytes:
    return array.array("I", tokens).tobytes()  # 4 bytes a token: prefixes compare as bytes


def _common(a: bytes, b: bytes) -> int:
    """How many leading tokens a and b share (a binary search of slice comparisons: memcmp)."""
    low, high = 0, min(len(a), len(b)) // 4
    while low < high:
        middle = (low + high + 1) // 2
        if a[: middle * 4] == b[: middle * 4]:
            low = middle
        else:
            high = middle - 1
    return low
