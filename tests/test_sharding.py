"""Shard assignment: every prompt on exactly one host, contiguous sizes, balanced loads."""

import random

import pytest

from levanter_multihost.sharding import all_shards, balanced_shards, contiguous_shard, shard_for_host


@pytest.mark.parametrize("num_prompts", [0, 1, 3, 10, 64, 255, 256, 1024])
@pytest.mark.parametrize("num_hosts", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("strategy", ["contiguous", "balanced"])
def test_every_prompt_in_exactly_one_shard(num_prompts, num_hosts, strategy):
    costs = [random.Random(num_prompts).randint(1, 100) for _ in range(num_prompts)]
    shards = all_shards(strategy, num_hosts, costs)
    assert len(shards) == num_hosts
    assert sorted(i for s in shards for i in s) == list(range(num_prompts))


def test_contiguous_uneven_sizes():
    assert [len(contiguous_shard(10, 4, h)) for h in range(4)] == [3, 3, 2, 2]
    assert [contiguous_shard(3, 4, h) for h in range(4)] == [[0], [1], [2], []]
    assert contiguous_shard(256, 4, 1) == list(range(64, 128))


def test_balanced_is_within_a_few_percent_of_the_mean_on_skewed_costs():
    rng = random.Random(0)
    costs = [rng.choice([10, 10, 10, 400]) + rng.randint(0, 20) for _ in range(256)]
    loads = [sum(costs[i] for i in s) for s in balanced_shards(costs, 4)]
    contiguous = [sum(costs[i] for i in contiguous_shard(256, 4, h)) for h in range(4)]
    mean = sum(costs) / 4
    assert max(loads) / mean <= 1.02
    assert max(loads) <= max(contiguous)


def test_balanced_is_deterministic_and_sorted():
    costs = [5, 1, 5, 1, 3, 3]
    assert balanced_shards(costs, 2) == balanced_shards(list(costs), 2)
    assert all(s == sorted(s) for s in balanced_shards(costs, 2))


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match=r"host \(4\)"):
        contiguous_shard(10, 4, 4)
    with pytest.raises(ValueError, match="shard_strategy 'random'"):
        shard_for_host("random", 2, 0, [1, 2])
