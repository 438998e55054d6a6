"""Who measures when: the members of each case and the palindromic order of their turns (pure; tested
by test_schedule.py).

For each case and frame size, pair p runs the members in their order when p is odd and in the
reverse order when p is even:
    tx:  a b U W | W U b a | a b U W | ...      rx:  a b R | R b a | a b R | ...
so consecutive pairs form palindromes and a drift that is linear in time cancels out of the paired
ratios (a over b in the same pair) and of the ratios to the nearest ceiling window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

CASES = ("tx", "rx")
BACKENDS = ("virtio-netd", "dpdk")
MEMBERS = {
    "tx": ("virtio-netd", "dpdk", "ceiling-uring", "ceiling-writev"),
    "rx": ("virtio-netd", "dpdk", "ceiling"),
}
# The ceiling each backend turn is compared with ("of ceil.").
REFERENCE_CEILING = {"tx": "ceiling-uring", "rx": "ceiling"}


def is_ceiling(member: str) -> bool:
    return member.startswith("ceiling")


def turn_order(members: Sequence[str], pair: int) -> list[str]:
    """The order of the turns in pair `pair` (1-based): as given when odd, reversed when even."""
    if pair < 1:
        raise ValueError(f"pair numbers start at 1, not {pair}")
    return list(members) if pair % 2 else list(reversed(members))


@dataclass(frozen=True)
class Pair:
    case: str
    size: int
    pair: int
    order: tuple[str, ...]


def schedule(cases: Sequence[str], sizes: Sequence[int], rounds: int) -> Iterator[Pair]:
    """Every pair of the run in the order it is measured: tx before rx (whatever order `cases` has),
    then the sizes as given, then pairs 1..rounds."""
    for case in CASES:
        if case not in cases:
            continue
        for size in sizes:
            for pair in range(1, rounds + 1):
                yield Pair(case, size, pair, tuple(turn_order(MEMBERS[case], pair)))
