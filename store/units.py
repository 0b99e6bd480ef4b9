"""Write units: the seed of a unit depends only on (base seed, unit index), never on who writes it."""

from __future__ import annotations

import numpy as np


def unit_seed(base_seed: int, unit: int) -> int:
    """A 63-bit seed for one write unit, stable across processes, ranks and resumes."""
    if base_seed < 0 or unit < 0:
        raise ValueError(f"base_seed and unit must be >= 0, got {base_seed} and {unit}")
    state = np.random.SeedSequence([base_seed, unit]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def share(units: list[int], rank: int, world_size: int) -> list[int]:
    """The units one rank takes out of a common ordered list: disjoint across ranks, deterministic."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    return list(units[rank::world_size])
