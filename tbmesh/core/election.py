"""Leader election within one connected group of nodes.

Availability first: every connected group elects its own leader (no majority quorum, or a
two-Mac cluster could never survive one Mac leaving). Each node publishes (term, leader) in
its link state; a leader publishes itself. Rules:

- Follow the best claimant among the reachable nodes that claim to lead: the one with the
  most followers, then the higher term, then the smaller id. A lone node that joins a group
  has one follower (itself) and so never deposes a leader with followers; two healed halves
  of equal size keep the leader of the higher term.
- A leader's term is never below a term it can see, so its plans are never fenced off by a
  node that accepted a plan of a higher term elsewhere: it re-stamps itself with a higher term.
- With no claimant, the candidate (smallest id among the reachable nodes) claims
  max(terms seen) + 1 once the group has been leaderless for the election delay.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """What a node publishes about leadership."""

    term: int
    leader: str | None


def best_claimant(claims: dict[str, Claim]) -> str | None:
    """The leader a group should follow, from the claims of its reachable nodes."""
    followers: dict[str, int] = {}
    for claim in claims.values():
        if claim.leader is not None:
            followers[claim.leader] = followers.get(claim.leader, 0) + 1
    claimants = [
        node for node, claim in claims.items() if claim.leader == node and node in followers
    ]
    if not claimants:
        return None
    return min(claimants, key=lambda n: (-followers[n], -claims[n].term, n))


def candidate(members: set[str] | dict[str, object]) -> str:
    """Who claims leadership when nobody does: deterministic, the same on every node."""
    return min(members)


def next_term(terms_seen: list[int]) -> int:
    return max(terms_seen, default=0) + 1
