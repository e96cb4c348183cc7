"""Seed-disjoint splits of a procedural problem space.

Every procedural problem has a canonical key (its task name plus prompt text; prompts are canonical, e.g.
countdown lists its numbers sorted). A stable hash (SHA-256, not Python's salted `hash`) assigns the key to one of
`NUM_SPLITS` buckets, and a dataset made with seed `s` keeps only problems of bucket `s % NUM_SPLITS`. Hence:

- datasets made with seeds that differ modulo `NUM_SPLITS` never share a problem: the guarantee does not depend on
  the random generator, the difficulty or `n` (train on seed 0, evaluate on seed 1);
- seeds that agree modulo `NUM_SPLITS` (0 and 8) draw from the same bucket with different generator streams and
  may overlap;
- the bucket of a problem never changes across runs, machines or Python versions.

The bucket, not the rng, is what guarantees disjointness; `draw_unique` then rejects off-bucket and duplicate
problems and gives up with a ValueError after a bounded number of tries.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from typing import TypeVar

NUM_SPLITS = 8
"""Number of disjoint buckets the problem space of every task is cut into."""

T = TypeVar("T")


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def split_of(key: str) -> int:
    """Bucket in [0, NUM_SPLITS) of a canonical problem key."""
    return stable_hash(key) % NUM_SPLITS


def problem_key(task: str, prompt: str) -> str:
    return f"{task}\x1f{prompt}"


MAX_STALL = 20_000
"""Give up after this many draws in a row that bring no new problem (the split is exhausted, or nearly)."""


def max_tries(n: int) -> int:
    return 200 * n + 20_000


def draw_unique(
    n: int, seed: int, generate: Callable[[random.Random], T], key: Callable[[T], str], what: str
) -> Iterator[T]:
    """Yield `n` distinct items of bucket `seed % NUM_SPLITS` drawn from `generate(rng)`.

    Raises ValueError (naming `what`, the split and the count reached) when the bucket cannot supply `n` distinct
    items: after `max_tries(n)` draws in all, or `MAX_STALL` draws in a row without a new item.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    split = seed % NUM_SPLITS
    # The stream depends on the seed itself, so seeds 0 and 8 (same bucket) still differ.
    rng = random.Random(f"r1moe-split-{seed}")
    seen: set[str] = set()
    tries = stall = 0
    budget = max_tries(n)
    while len(seen) < n:
        if tries >= budget or stall >= MAX_STALL:
            raise ValueError(
                f"{what}: split {split} of {NUM_SPLITS} (seed {seed}) supplied only {len(seen)} distinct problems "
                f"of the {n} asked for after {tries} tries; ask for fewer or raise the difficulty"
            )
        tries += 1
        stall += 1
        item = generate(rng)
        k = key(item)
        if k in seen or split_of(k) != split:
            continue
        seen.add(k)
        stall = 0
        yield item
