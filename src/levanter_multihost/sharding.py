"""Which host samples which prompts.

Covers the assignment of global prompt indices to hosts: ``contiguous`` (host ``i`` takes the ``i``-th slice;
uneven counts give the first hosts one more) and ``balanced`` (greedy by estimated cost, so the busiest host is
close to the mean). Every prompt lands in exactly one shard, and a shard may be empty. Sampling keys depend on
the global index only, so the assignment never changes outputs. No JAX import.
"""

import heapq
from collections.abc import Sequence

import numpy as np

STRATEGIES = ("contiguous", "balanced")


def contiguous_shard(num_prompts: int, num_hosts: int, host: int) -> list[int]:
    """Global prompt indices of ``host``: 10 prompts on 4 hosts give 3, 3, 2, 2."""
    _check(num_prompts, num_hosts, host)
    base, extra = divmod(num_prompts, num_hosts)
    start = host * base + min(host, extra)
    size = base + (1 if host < extra else 0)
    return list(range(start, start + size))


def balanced_shards(costs: Sequence[float], num_hosts: int) -> list[list[int]]:
    """Assign prompts to hosts by cost, largest first, each to the currently lightest host.

    Ties go to the lowest host index, so the result is deterministic; each shard is returned sorted.
    """
    if num_hosts < 1:
        raise ValueError(f"num_hosts ({num_hosts}) must be >= 1.")
    shards: list[list[int]] = [[] for _ in range(num_hosts)]
    heap = [(0.0, h) for h in range(num_hosts)]
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    for i in order:
        load, h = heapq.heappop(heap)
        shards[h].append(i)
        heapq.heappush(heap, (load + costs[i], h))
    return [sorted(s) for s in shards]


def shard_for_host(strategy: str, num_hosts: int, host: int, prompt_costs: Sequence[float]) -> list[int]:
    """Global prompt indices that ``host`` samples under ``strategy`` (``prompt_costs`` has one entry per prompt)."""
    if strategy == "contiguous":
        return contiguous_shard(len(prompt_costs), num_hosts, host)
    if strategy == "balanced":
        _check(len(prompt_costs), num_hosts, host)
        return balanced_shards(prompt_costs, num_hosts)[host]
    raise ValueError(f"shard_strategy {strategy!r} is not one of {STRATEGIES}.")


def all_shards(strategy: str, num_hosts: int, prompt_costs: Sequence[float]) -> list[list[int]]:
    """Every host's shard, in host order."""
    return [shard_for_host(strategy, num_hosts, h, prompt_costs) for h in range(num_hosts)]


def cost_ranges(costs: Sequence[int], num_hosts: int) -> list[range]:
    """Contiguous ranges of prompts, one per host in order, each close to an equal part of the total cost: a prompt
    goes to the host whose part holds the middle of its cost, so a host's load is within half a prompt of its part.
    Exact integer arithmetic, so every host cuts the same ranges. All costs 0: equal counts."""
    costs = np.asarray(costs, dtype=np.int64)
    total = int(costs.sum())
    if num_hosts < 1:
        raise ValueError(f"num_hosts ({num_hosts}) must be >= 1.")
    if total == 0:
        cuts = [len(costs) * h // num_hosts for h in range(num_hosts + 1)]
    else:  # prompt i lies left of cut h when its middle, cum[i] - costs[i] / 2, is below h * total / num_hosts
        doubled_middles = (2 * np.cumsum(costs) - costs) * num_hosts
        inner = np.searchsorted(doubled_middles, [2 * total * h for h in range(1, num_hosts)]).tolist()
        cuts = [0, *inner, len(costs)]
    return [range(cuts[h], cuts[h + 1]) for h in range(num_hosts)]


def prompt_cost(prompt_tokens: int, max_new_tokens: int, n_generations: int) -> int:
    """Estimated work of one prompt: tokens it holds in the KV cache, times its generations."""
    return (prompt_tokens + max_new_tokens) * n_generations


def _check(num_prompts: int, num_hosts: int, host: int) -> None:
    if num_hosts < 1:
        raise ValueError(f"num_hosts ({num_hosts}) must be >= 1.")
    if not 0 <= host < num_hosts:
        raise ValueError(f"host ({host}) must be in [0, {num_hosts}).")
    if num_prompts < 0:
        raise ValueError(f"num_prompts ({num_prompts}) must be >= 0.")
