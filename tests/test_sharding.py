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


def test_a_resume_spreads_the_missing_work_over_every_host_by_the_same_balancing():
    """Host 1 of 4 died: its prompts 4-7 are missing, and prompt 8 one generation of two. Every host samples part of
    that, by the strategy a fresh run uses; with nothing kept, the share is the fresh run's."""
    import numpy as np

    from levanter_multihost.host_work import host_share, sampling_share
    from levanter_multihost.runplan import PromptSet, TokenTable

    prompts = PromptSet(
        texts=["1+1="] * 16,
        tokens=TokenTable.of([[1, 2, 3]] * 16),
        max_new_tokens=np.full(16, 4),
        temperature=np.zeros(16),
        n_generations=np.full(16, 2),
        top_k=np.zeros(16),
        top_p=np.ones(16),
        min_p=np.zeros(16),
        seed=np.zeros(16),
    )
    earlier = {(p, g) for p in range(16) for g in range(2) if not 4 <= p <= 7} - {(8, 1)}
    for strategy in ("contiguous", "balanced"):
        shares = [sampling_share(prompts, earlier, host, 4, strategy) for host in range(4)]
        assert sorted(p for s in shares for p in s) == [4, 5, 6, 7, 8]
        assert sorted(len(s) for s in shares) == [1, 1, 1, 2]
        assert [sampling_share(prompts, set(), h, 4, strategy) for h in range(4)] == [
            host_share(prompts, h, 4, strategy) for h in range(4)
        ]
    assert sampling_share(prompts, earlier, 0, 4, "contiguous") == [4, 5]
