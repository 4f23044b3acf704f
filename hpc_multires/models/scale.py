"""Pooling factors of a network run on a coarse pyramid level.

A level-L sample is the level-0 sample averaged over 2^L points per axis. A network
whose blocks pool by ``pool`` each can run on it unchanged (its feature maps are then 2^L
times smaller at every depth) or with its first poolings reduced by 2^L in all, so that
from there on every layer sees the map size, and the physical scale per map point, that
it sees at level 0. The second way makes a coarse model's layers the level-0 model's
layers: weights move between levels without any resampling.
"""

from __future__ import annotations

import math

from hpc_multires.errors import ConfigError


def block_pools(pool: int, depth: int, level: int, mode: str) -> list[int]:
    """Pooling factor of each of `depth` blocks at pyramid `level` (1 = no pooling).

    mode "keep": every block pools by `pool`. mode "drop": the factor 2^level is taken
    out of the blocks' poolings from the first block on, e.g. pool 4, level 1 ->
    [2, 4, 4]; pool 2, level 2 -> [1, 1, 2, ...].
    """
    pools = [pool] * depth
    if mode == "keep" or level == 0:
        return pools
    rest = 2**level
    for i in range(depth):
        common = math.gcd(pools[i], rest)
        pools[i] //= common
        rest //= common
    if rest > 1:
        raise ConfigError(
            f"model.coarse_pools = 'drop' at level {level} must take a factor {2**level} out "
            f"of the poolings, but {depth} blocks pooling by {pool} do not hold it; use fewer "
            "pyramid levels or model.coarse_pools = 'keep'")
    return pools
