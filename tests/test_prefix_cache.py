"""The prefix cache's index (serving/prefix_cache.py)."""

from __future__ import annotations

from tbmesh.serving.messages import Origin
from tbmesh.serving.prefix_cache import PrefixIndex


def test_a_prompt_starts_from_the_entry_sharing_its_longest_prefix_up_to_the_limit():
    index = PrefixIndex()
    index.insert("sys", [1, 2, 3, 4, 5])
    index.insert("chat", [1, 2, 3, 9, 9, 9, 9])
    assert index.lookup([1, 2, 3, 4, 5, 6, 7], 6) == Origin("sys", 5)
    assert index.lookup([1, 2, 3, 9, 9, 8], 5) == Origin("chat", 5)
    assert index.lookup([1, 2, 3, 4, 5], 4) == Origin("sys", 4)  # the last token is always computed
    assert index.lookup([7, 1, 2], 2) is None
    assert (index.stats.lookups, index.stats.hits, index.stats.hit_tokens) == (4, 3, 14)


def test_an_entry_that_is_a_prefix_of_a_new_one_goes_and_the_least_recently_used_is_oldest():
    index = PrefixIndex()
    index.insert("a", [1, 2])
    index.insert("b", [5, 6, 7])
    assert index.insert("c", [1, 2, 3]) == ["a"] and "a" not in index
    assert index.tokens == 6 and index.oldest() == "b"
    index.lookup([5, 6, 0], 2)
    assert index.oldest() == "c" and index.oldest(skip={"c"}) == "b"
    index.remove("c")
    assert index.tokens == 3 and len(index) == 1
    assert index.clear() == ["b"] and index.tokens == 0
