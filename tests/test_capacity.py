"""The pure capacity planner: the seed's v5p-32 numbers, the engine's rules, the closed-form batch limit of each
field, the packer, the decode budget, HBM, the roofline and the report. No JAX; every test is arithmetic (the
engine itself checks the same numbers in ``tests/test_batch_engine.py``)."""

import json
import random
import subprocess
import sys
from dataclasses import replace

import pytest

from levanter_multihost.capacity import (
    BatchPacker,
    EngineLimits,
    ModelShape,
    PromptDemand,
    RunSpec,
    Topology,
    batch_limit,
    forecast,
    parse_tpu_type,
    plan_capacity,
    report,
)
from levanter_multihost.capacity.batch import prompt_problems, within_decode_budget
from levanter_multihost.capacity.tpu import GIB

# The seed's host-DP engine for 64 prompts per host (v5p-16 and v5p-32 runs).
SEED = EngineLimits(
    max_seq_len=2560,
    page_size=128,
    max_pages=2304,
    max_seqs=128,
    max_seqs_in_prefill=128,
    max_prefill_size=2048,
    max_queued_tokens=128,
    max_tokens_per_round=128,
    max_rounds=64,
)
# The seed's final engine for 1024 prompts on v5p-32 (256 per host).
SEED_1024 = replace(
    SEED,
    max_seqs=256,
    max_seqs_in_prefill=256,
    max_prefill_size=4096,
    max_pages=4608,
    max_queued_tokens=256,
    max_tokens_per_round=256,
)
V5P_32 = parse_tpu_type("v5p-32")
P8B = 8_030_261_248
# Llama-3-8B in bfloat16, every axis sharded over a host's 4 chips (tests/test_plan.py gets it from partition specs)
LLAMA3_8B = ModelShape(P8B * 2, P8B * 2 // 4, 131_072, 131_072 // 4, "Llama-3-8B")
# a small engine whose limits the closed-form tests lower one at a time
SMALL = EngineLimits(
    max_seq_len=64,
    page_size=8,
    max_pages=1000,
    max_seqs=32,
    max_seqs_in_prefill=32,
    max_prefill_size=1024,
    max_queued_tokens=32,
    max_rounds=8,
)


def run(prompt_tokens: int, prompts: int, max_new: int, generations: int = 1, **kw) -> RunSpec:
    return RunSpec(tuple([PromptDemand(prompt_tokens, max_new, generations)] * prompts), **kw)


def fields_of(plan) -> list[str]:
    return [p.field for p in plan.problems]


def random_engine(rng: random.Random) -> EngineLimits:
    seqs = rng.randint(1, 24)
    return EngineLimits(
        max_seq_len=64,
        page_size=rng.choice([4, 8, 16]),
        max_pages=rng.choice([None, rng.randint(4, 200)]),
        max_seqs=seqs,
        max_seqs_in_prefill=rng.randint(1, 24),
        max_prefill_size=rng.choice([None, rng.randint(8, 128)]),
        max_queued_tokens=64,
        max_tokens_per_round=rng.choice([None, rng.randint(1, seqs)]),
        max_rounds=rng.randint(1, 16),
    )


# ---------------------------------------------------------------------------------------------------------------
# the seed


def test_seed_v5p32_256_prompts_of_32_tokens():
    plan = plan_capacity(SEED, run(32, 256, 2048), V5P_32, LLAMA3_8B)
    assert plan.ok, report.text(plan)
    assert plan.prompts_per_host == [64] * 4 and plan.batches_per_host == [1] * 4
    assert [h.batch_sequences for h in plan.hosts] == [(64,)] * 4
    assert (SEED.pages_per_seq_max, plan.pages_per_seq, plan.max_pages) == (20, 17, 2304)
    # 64 x ceil((32 + 2048) / 128) = 64 x 17: the 1,088 pages the seed saw in use
    assert plan.pages_required == 1088
    assert (plan.batch.sequences, plan.batch.limited_by) == (64, "engine.max_prefill_size")  # 64 x 32 = 2048 tokens
    seen = forecast(SEED, [PromptDemand(32, 2048)] * 64)
    # 2047 decode iterations after the prefill's token: 32 outer rounds, as the seed logged
    assert (seen.waves, seen.pages_after_prefill, seen.decode_iterations, seen.outer_rounds) == (1, 64, 2047, 32)


def test_1024_prompts_on_the_256_prompt_engine_run_in_two_batches_per_host():
    """One call of 256 sequences admitted 128 and gave the second wave 513 tokens; packed, nothing truncates."""
    plan = plan_capacity(SEED, run(16, 1024, 2048), V5P_32, LLAMA3_8B)
    assert plan.ok, report.text(plan)
    assert [h.batch_sequences for h in plan.hosts] == [(128, 128)] * 4
    assert (plan.batch.sequences, plan.batch.limited_by) == (128, "engine.max_seqs")


def test_raising_max_seqs_alone_fails_on_max_queued_tokens():
    plan = plan_capacity(replace(SEED, max_seqs=256), run(16, 1024, 2048), V5P_32, LLAMA3_8B)
    assert [(p.field, p.suggested) for p in plan.problems] == [("engine.max_queued_tokens", 256)]
    assert "max_queued_tokens (128) is below max_seqs (256)" in plan.problems[0].message
    assert "Increase max_queued_tokens to 256" in plan.problems[0].message


def test_fewer_tokens_per_round_than_sequences_halves_the_batch():
    """The seed's 1024 values with max_tokens_per_round 128 gave every sequence of one 256-sequence call 1,281 of
    its 2,048 tokens. 2,047 decode tokens in 2,560 iterations leave room for one turn: batches of 128."""
    engine = replace(SEED_1024, max_tokens_per_round=128)
    assert 40 * 64 * 128 // 256 + 1 == 1281
    assert not within_decode_budget(engine, 256, 2048) and within_decode_budget(engine, 128, 2048)
    plan = plan_capacity(engine, run(16, 1024, 2048), V5P_32, LLAMA3_8B)
    assert plan.ok and plan.batches_per_host == [2] * 4
    assert (plan.batch.sequences, plan.batch.limited_by) == (128, "engine.max_tokens_per_round")


def test_final_1024_values_run_one_batch_per_host():
    plan = plan_capacity(SEED_1024, run(16, 1024, 2048), V5P_32, LLAMA3_8B)
    assert plan.ok and [h.batch_sequences for h in plan.hosts] == [(256,)] * 4
    assert plan.pages_required == 256 * 17 <= 4608 < 256 * SEED_1024.pages_per_seq_max


# ---------------------------------------------------------------------------------------------------------------
# topology and the engine's own rules


@pytest.mark.parametrize(
    "name, hosts, chips, gen",
    [
        ("v5p-8", 1, 4, "v5p"),
        ("v5p-16", 2, 4, "v5p"),
        ("v5p-32", 4, 4, "v5p"),
        ("v5p-128", 16, 4, "v5p"),
        ("v4-8", 1, 4, "v4"),
        ("v4-32", 4, 4, "v4"),
        ("v5e-4", 1, 4, "v5e"),
        ("v5e-8", 1, 8, "v5e"),
        ("v5e-16", 4, 4, "v5e"),
        ("v5litepod-16", 4, 4, "v5e"),
        ("v6e-8", 1, 8, "v6e"),
        ("v6e-16", 4, 4, "v6e"),
        ("V6E-256", 64, 4, "v6e"),
    ],
)
def test_parse_tpu_type(name, hosts, chips, gen):
    t = parse_tpu_type(name)
    assert (t.num_hosts, t.chips_per_host, t.generation.name, t.name) == (hosts, chips, gen, name)


@pytest.mark.parametrize("name", ["v5p-7", "v5p-0", "v3-8", "tpu", "v5e-10", "v5p"])
def test_parse_tpu_type_rejects(name):
    with pytest.raises(ValueError, match="tpu_type"):
        parse_tpu_type(name)


@pytest.mark.parametrize("max_seqs", [8, 16])
@pytest.mark.parametrize("per_round", [None, 4, 32])
@pytest.mark.parametrize("in_prefill", [4, 24])
@pytest.mark.parametrize("queued", [8, 16, 32])
def test_max_queued_tokens_rules(max_seqs, per_round, in_prefill, queued):
    engine = EngineLimits(
        max_seq_len=64,
        page_size=8,
        max_pages=1000,
        max_seqs=max_seqs,
        max_tokens_per_round=per_round,
        max_seqs_in_prefill=in_prefill,
        max_queued_tokens=queued,
    )
    need = max(max_seqs, per_round or max_seqs, in_prefill)
    plan = plan_capacity(engine, run(4, 2, 8), Topology())
    rule = [p for p in plan.problems if p.field == "engine.max_queued_tokens"]
    assert bool(rule) == (queued < need)
    if rule:
        assert rule[0].suggested == need and f"max_queued_tokens ({queued})" in rule[0].message
        assert plan_capacity(replace(engine, max_queued_tokens=need), run(4, 2, 8), Topology()).ok


@pytest.mark.parametrize(
    "engine, demand, field, suggested, says",
    [
        (
            EngineLimits(100, page_size=16),
            PromptDemand(40, 64),
            "engine.max_seq_len",
            104,
            "needs 104 positions, more than engine.max_seq_len (100)",
        ),
        (
            EngineLimits(64, page_size=8, max_prefill_size=16),
            PromptDemand(20, 8),
            "engine.max_prefill_size",
            20,
            "20 tokens; its 1 generation(s) prefill 20, more than engine.max_prefill_size (16)",
        ),
        (
            EngineLimits(64, page_size=8, max_seqs=4),
            PromptDemand(4, 8, 6),
            "engine.max_seqs",
            6,
            "6 generations, more than engine.max_seqs (4)",
        ),
        (
            EngineLimits(64, page_size=8, max_pages=10),
            PromptDemand(4, 40, 2),
            "engine.max_pages",
            12,
            "needs 12 KV pages at full length",
        ),
        (
            EngineLimits(32, page_size=8, max_tokens_per_round=2, max_rounds=4),
            PromptDemand(4, 20, 6),
            "engine.max_tokens_per_round",
            6,
            "may need 19 x 3 decode iterations, more than the 32 one call runs",
        ),
    ],
)
def test_a_prompt_no_call_can_complete_is_a_problem_and_the_packer_names_it(engine, demand, field, suggested, says):
    plan = plan_capacity(engine, RunSpec((PromptDemand(4, 8), demand, demand)), Topology())
    assert [(p.field, p.suggested) for p in plan.problems] == [(field, suggested)]  # once, for the first prompt
    assert "Prompt 1" in plan.problems[0].message and says in plan.problems[0].message
    assert plan.hosts == ()
    with pytest.raises(ValueError, match="position 1"):
        BatchPacker(engine, engine.max_pages).pack([PromptDemand(4, 8), demand])


def test_batch_size_below_one_prompts_generations():
    plan = plan_capacity(SMALL, run(4, 8, 8, generations=3, batch_size=2), Topology())
    assert [(p.field, p.suggested) for p in plan.problems] == [("batch_size", 3)] and plan.hosts == ()
    assert "batch_size (2) is fewer sequences than the 3 generations of one prompt" in plan.problems[0].message


def test_stop_sequence_capacity():
    spec = run(4, 1, 8, stop_sequences=5, longest_stop_tokens=20)
    plan = plan_capacity(EngineLimits(max_seq_len=64, page_size=8), spec, Topology())
    assert [(p.field, p.suggested) for p in plan.problems] == [
        ("engine.max_stop_seqs", 5),
        ("engine.max_stop_tokens", 20),
    ]


@pytest.mark.parametrize("field", ["max_seq_len", "page_size", "max_seqs", "max_pages", "max_prefill_size"])
def test_invalid_engine_numbers_name_the_field(field):
    with pytest.raises(ValueError, match=f"engine.{field} \\(0\\) must be >= 1"):
        replace(SMALL, **{field: 0})


# ---------------------------------------------------------------------------------------------------------------
# the closed form and the packer


@pytest.mark.parametrize(
    "change, demand, batch_size, sequences, field",
    [
        ({"max_seqs": 12}, PromptDemand(4, 4), None, 12, "engine.max_seqs"),
        ({"max_seqs_in_prefill": 5}, PromptDemand(4, 4), None, 5, "engine.max_seqs_in_prefill"),
        ({"max_prefill_size": 30}, PromptDemand(7, 4), None, 4, "engine.max_prefill_size"),
        ({"max_pages": 20}, PromptDemand(7, 20), None, 5, "engine.max_pages"),  # ceil(27 / 8) = 4 pages each
        ({"max_tokens_per_round": 4}, PromptDemand(4, 20), None, 12, "engine.max_tokens_per_round"),  # 64 // 19 turns
        ({}, PromptDemand(4, 4), 3, 3, "batch_size"),
        # in whole prompts of 3 or 5 generations, each generation a request of its own
        ({"max_seqs": 10}, PromptDemand(4, 4, 3), None, 9, "engine.max_seqs"),
        ({"max_seqs_in_prefill": 7}, PromptDemand(4, 4, 3), None, 6, "engine.max_seqs_in_prefill"),
        ({"max_prefill_size": 30}, PromptDemand(7, 4, 3), None, 3, "engine.max_prefill_size"),  # 4 prefills of 7
        ({"max_pages": 20}, PromptDemand(7, 20, 3), None, 3, "engine.max_pages"),
        ({"max_tokens_per_round": 4}, PromptDemand(4, 20, 5), None, 10, "engine.max_tokens_per_round"),
        ({}, PromptDemand(4, 4, 2), 7, 6, "batch_size"),
    ],
)
def test_batch_limit_names_the_field_that_binds(change, demand, batch_size, sequences, field):
    engine = replace(SMALL, **change)
    limit = batch_limit(engine, engine.max_pages, demand, batch_size)
    assert (limit.sequences, limit.limited_by) == (sequences, field)
    packer = BatchPacker(engine, engine.max_pages, batch_size)
    prompts = sequences // demand.generations
    assert packer.fits([demand] * prompts) and not packer.fits([demand] * (prompts + 1))


@pytest.mark.parametrize("seed", range(6))
def test_batch_limit_is_the_most_prompts_of_one_shape_the_packer_fits(seed):
    rng = random.Random(seed)
    for _ in range(60):
        engine, batch_size = random_engine(rng), rng.choice([None, rng.randint(1, 20)])
        demand = PromptDemand(rng.randint(1, 12), rng.randint(1, 40), rng.randint(1, 3))
        packer = BatchPacker(engine, engine.max_pages, batch_size)
        # a prompt fits a call alone exactly when the planner names no problem for it (else pack would raise)
        problems = prompt_problems(engine, engine.max_pages, demand, "p")
        alone = not problems and demand.generations <= (batch_size or demand.generations)
        assert packer.fits([demand]) == alone, (engine, demand)
        if not alone:
            continue
        prompts = batch_limit(engine, engine.max_pages, demand, batch_size).sequences // demand.generations
        assert packer.fits([demand] * prompts) and not packer.fits([demand] * (prompts + 1)), (engine, demand)


@pytest.mark.parametrize("seed", range(8))
def test_packed_batches_fit_cover_every_prompt_once_in_order_and_are_as_large_as_allowed(seed):
    rng = random.Random(seed)
    engine, batch_size = random_engine(rng), rng.choice([None, rng.randint(3, 20)])
    packer = BatchPacker(engine, engine.max_pages, batch_size)
    demands = [PromptDemand(rng.randint(1, 12), rng.randint(1, 40), rng.choice([1, 1, 2, 3])) for _ in range(80)]
    demands = [d for d in demands if packer.fits([d])]
    batches = packer.pack(demands)
    assert [i for r in batches for i in r] == list(range(len(demands)))
    for r in batches:
        batch = demands[r.start : r.stop]
        seen = forecast(engine, batch)
        assert packer.fits(batch) and seen.waves == 1
        assert seen.decode_iterations <= engine.decode_iterations and seen.sequences <= packer.max_sequences
        assert engine.max_pages is None or seen.pages_at_full_length <= engine.max_pages
    for r in batches[:-1]:
        assert not packer.fits(demands[r.start : r.stop + 1])  # the next prompt would not fit


def test_packer_names_a_prompt_that_does_not_fit_alone():
    packer = BatchPacker(SMALL, 5)  # 2 pages each for the first two, 8 for the third
    with pytest.raises(ValueError, match="position 2"):
        packer.pack([PromptDemand(4, 8), PromptDemand(4, 8), PromptDemand(4, 60)])


def test_decode_budget_holds_in_any_order_the_engine_packs():
    """The engine re-queues an iteration's tokens sorted by slot, so turns are uneven: 5 sequences of 20 new tokens
    at 3 per iteration truncate in 32 iterations (tests/test_batch_engine.py) although 5 x 19 <= 32 x 3. A queued
    token waits at most ceil(5 / 3) = 2 iterations, so 19 tokens may take 38."""
    engine = EngineLimits(max_seq_len=32, page_size=8, max_seqs=8, max_tokens_per_round=3, max_rounds=4)
    assert engine.decode_iterations == 32
    assert not within_decode_budget(engine, 5, 20) and within_decode_budget(engine, 3, 31)
    assert batch_limit(engine, None, PromptDemand(4, 20)).bounds["engine.max_tokens_per_round"] == 3
    assert batch_limit(engine, None, PromptDemand(4, 9)).bounds["engine.max_tokens_per_round"] == 12  # 4 turns


@pytest.mark.parametrize("max_seq_len, rounds", [(128, 2), (129, 3), (191, 3), (192, 3), (193, 4)])
def test_outer_rounds_stop_at_the_first_k_with_k_times_max_rounds_at_least_max_seq_len(max_seq_len, rounds):
    engine = EngineLimits(max_seq_len=max_seq_len, page_size=16, max_rounds=64)
    assert (engine.outer_rounds, engine.decode_iterations) == (rounds, rounds * 64)


@pytest.mark.parametrize("sequences, per_round, iterations", [(4, 8, 19), (8, 8, 19), (9, 8, 38), (12, 4, 57)])
def test_forecast_of_one_batch(sequences, per_round, iterations):
    engine = replace(SMALL, max_tokens_per_round=per_round)
    demands = [PromptDemand(5 + k % 7, 20) for k in range(sequences)]
    seen = forecast(engine, demands)
    assert (seen.sequences, seen.waves, seen.decode_iterations) == (sequences, 1, iterations)
    assert seen.outer_rounds == -(-iterations // 8)
    assert seen.pages_after_prefill == sum(1 if d.prompt_tokens <= 8 else 2 for d in demands)  # pages of 8
    assert seen.pages_at_full_length == sum(-(-(d.prompt_tokens + 20) // 8) for d in demands)
    assert seen.kv_tokens_read == sum(sum(range(d.prompt_tokens, d.prompt_tokens + 19)) for d in demands)
    clones = forecast(engine, [PromptDemand(5, 20, 3)])
    assert (clones.sequences, clones.pages_after_prefill, clones.pages_at_full_length) == (3, 3, 12)
    assert forecast(engine, [PromptDemand(5, 1)]).outer_rounds == 0  # the prefill's token is the only one


@pytest.mark.parametrize("strategy", ["contiguous", "balanced"])
def test_prompts_are_sharded_like_the_sampler(strategy):
    spec = RunSpec(tuple(PromptDemand(k, 8) for k in range(1, 11)), shard_strategy=strategy)
    plan = plan_capacity(EngineLimits(max_seq_len=64, page_size=8), spec, Topology(num_hosts=4))
    assert sum(plan.prompts_per_host) == 10 and plan.batches_per_host == [1] * 4
    if strategy == "contiguous":
        assert plan.prompts_per_host == [3, 3, 2, 2]


def test_more_hosts_than_prompts():
    plan = plan_capacity(EngineLimits(max_seq_len=64, page_size=8), run(4, 2, 8), Topology(num_hosts=4))
    assert plan.ok and plan.prompts_per_host == [1, 1, 0, 0] and plan.batches_per_host == [1, 1, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# HBM, the roofline, suggestions, output


def test_hbm_per_chip_and_a_max_pages_that_does_not_fit():
    spec = run(32, 256, 2048)
    plan = plan_capacity(SEED, spec, V5P_32, LLAMA3_8B)
    assert 2304 * 128 * 131_072 // 4 == 9 * GIB  # the KV cache per chip with kv_head sharded
    assert plan.hbm_per_chip == P8B * 2 // 4 + 9 * GIB
    plan = plan_capacity(replace(SEED, max_pages=30_000), spec, V5P_32, LLAMA3_8B)
    (problem,) = plan.problems
    assert problem.field == "engine.max_pages" and "above the 95.00 GiB of a v5p chip" in problem.message
    fits = plan_capacity(replace(SEED, max_pages=problem.suggested), spec, V5P_32, LLAMA3_8B)
    assert fits.ok and fits.hbm_per_chip <= 95 * GIB
    assert plan_capacity(replace(SEED, max_pages=problem.suggested + 1), spec, V5P_32, LLAMA3_8B).problems


def test_weights_too_big_for_one_chip():
    llama_70b = ModelShape(70_553_706_496 * 2, 70_553_706_496 * 2, 327_680, 327_680)
    plan = plan_capacity(SEED, run(16, 1, 64), V5P_32, llama_70b)
    assert [(p.field, p.suggested) for p in plan.problems] == [("trainer.model_axis_size", 4)]


def test_unset_max_pages_is_estimated_from_hbm_or_skipped():
    engine = replace(SEED, max_pages=None)
    plan = plan_capacity(engine, run(32, 64, 2048), V5P_32, LLAMA3_8B)
    assert plan.max_pages == int((95 * GIB - P8B * 2 // 4) * 0.9 // (128 * 131_072 // 4))
    assert plan.ok and any("max_pages is unset" in n for n in plan.notes)
    plan = plan_capacity(engine, run(32, 64, 2048), Topology(num_hosts=1))
    assert plan.max_pages is None and plan.ok and any("page checks skipped" in n for n in plan.notes)


def test_roofline_of_the_seed_run():
    """2047 iterations each reading a quarter of the weights, and the KV of every context token, per chip at
    2,765 GB/s. The seed measured ~107 s per host."""
    plan = plan_capacity(SEED, run(32, 256, 2048), V5P_32, LLAMA3_8B)
    host = plan.hosts[0]
    assert host.decode_iterations == 2047 and host.kv_tokens_read == 64 * sum(range(32, 32 + 2047))
    moved = 2047 * P8B * 2 // 4 + host.kv_tokens_read * 131_072 // 4
    assert plan.decode_bound_s[0] == pytest.approx(moved / 2765e9) and 4.5 < plan.decode_bound_s[0] < 4.7
    # one step of the 64 sequences mid-decode; a larger prefill buffer allows 128, but each host has only 64
    step = (P8B * 2 // 4 + 64 * (32 + 1024) * 131_072 // 4) / 2765e9
    assert plan.step_bound_s == pytest.approx(step) and plan.step_bound_s <= 2.4e-3
    roomy = plan_capacity(replace(SEED, max_prefill_size=8192), run(32, 256, 2048), V5P_32, LLAMA3_8B)
    assert (roomy.batch.sequences, roomy.largest_batch, roomy.step_bound_s) == (128, 64, plan.step_bound_s)


@pytest.mark.parametrize(
    "engine, spec",
    [
        (replace(SEED, max_seqs=256), run(16, 1024, 2048)),
        (replace(SEED, max_seq_len=2000), run(32, 256, 2048)),
        (replace(SEED, max_prefill_size=16), run(32, 256, 2048)),
        (replace(SEED, max_pages=10), run(32, 256, 2048)),
        (replace(SEED, max_pages=30_000), run(32, 256, 2048)),
        (
            replace(SEED, max_stop_seqs=1, max_stop_tokens=2),
            run(32, 256, 2048, stop_sequences=3, longest_stop_tokens=4),
        ),
        (SEED, run(32, 256, 2048, batch_size=200)),
    ],
)
def test_each_suggestion_removes_its_problem(engine, spec):
    plan = plan_capacity(engine, spec, V5P_32, LLAMA3_8B)
    assert plan.problems
    for problem in plan.problems:
        if problem.field == "batch_size":
            fixed = plan_capacity(engine, replace(spec, batch_size=problem.suggested), V5P_32, LLAMA3_8B)
        else:
            fixed_engine = replace(engine, **{problem.field.removeprefix("engine."): problem.suggested})
            fixed = plan_capacity(fixed_engine, spec, V5P_32, LLAMA3_8B)
        assert problem.field not in fields_of(fixed), (problem, report.text(fixed))


def test_batch_size_larger_than_the_engine_holds_names_the_largest_that_fits():
    plan = plan_capacity(SEED, run(32, 256, 2048, batch_size=100), V5P_32, LLAMA3_8B)
    assert [(p.field, p.suggested) for p in plan.problems] == [("batch_size", 64)]
    assert "batch_size (100)" in plan.problems[0].message
    assert "at most 64, set by engine.max_prefill_size (2048)" in plan.problems[0].message
    smaller = plan_capacity(SEED, run(32, 256, 2048, batch_size=24), V5P_32, LLAMA3_8B)
    assert smaller.ok and [h.batch_sequences for h in smaller.hosts] == [(24, 24, 16)] * 4


def test_to_dict_is_json():
    plan = plan_capacity(SEED, run(32, 256, 2048, batch_size=100), V5P_32, LLAMA3_8B)
    data = json.loads(json.dumps(report.to_dict(plan)))
    assert data["ok"] is False and data["tpu_type"] == "v5p-32"
    assert (data["num_hosts"], data["chips_per_host"], data["prompts"]) == (4, 4, 256)
    assert data["prompts_per_host"] == [64] * 4 and data["batches_per_host"] == [1] * 4  # packed all the same
    assert data["batch"]["sequences"] == 64 and data["batch"]["limited_by"] == "engine.max_prefill_size"
    assert (data["pages_per_seq_max"], data["pages_per_seq"], data["max_pages"]) == (20, 17, 2304)
    assert data["decode_budget"] == {"outer_rounds": 40, "iterations": 2560}
    assert [set(p) for p in data["problems"]] == [{"field", "message", "suggested"}]
    assert data["hbm"]["bytes_per_chip"] == 95 * GIB
    ok = json.loads(json.dumps(report.to_dict(plan_capacity(SEED, run(32, 256, 2048), V5P_32, LLAMA3_8B))))
    assert ok["hosts"][0]["batch_sequences"] == [64] and ok["roofline"]["step_s"] <= 2.4e-3


def test_report_names_fields_and_values():
    text = report.text(plan_capacity(SEED, run(32, 256, 2048, batch_size=100), V5P_32, LLAMA3_8B))
    assert text.startswith("FAIL: 256 prompts x up to 1 generation(s), up to 2048 new tokens, on v5p-32")
    lines = text.splitlines()
    assert lines[2].split() == ["parameter", "value", "needed", "verdict"]
    assert any(line.startswith("sequences per batch") and line.endswith("FAIL") for line in lines)
    assert "- batch_size: 64" in lines
    ok = report.text(plan_capacity(SEED, run(32, 256, 2048), V5P_32, LLAMA3_8B))
    assert ok.startswith("OK:") and "Problems" not in ok and "decode step (HBM-bound)" in ok


def test_capacity_imports_no_jax():
    code = "import sys, levanter_multihost.capacity; print([m for m in ('jax', 'levanter') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# auto-size


def test_auto_size_never_proposes_what_the_engine_cannot_hold():
    """Random models, slices and prompts: the proposal plans with no problem, one batch per wave, within HBM."""
    from levanter_multihost.capacity import parse_tpu_type

    rng = random.Random(11)
    for _ in range(200):
        slice_ = parse_tpu_type(rng.choice(["v5p-8", "v5p-32", "v4-16", "v5e-16", "v6e-8"]))
        kv_chip = rng.choice([2048, 16384, 131072]) // rng.choice([1, 2, 4])
        model = ModelShape(
            weight_bytes=10**9,
            weight_bytes_per_chip=rng.randint(10**8, 8 * 10**9),
            kv_bytes_per_token=kv_chip * 4,
            kv_bytes_per_token_per_chip=kv_chip,
        )
        prompt, new = rng.randint(1, 300), rng.randint(1, 2048)
        engine = EngineLimits(
            max_seq_len=prompt + new + rng.randint(0, 256),
            page_size=rng.choice([16, 64, 128]),
            max_rounds=rng.choice([8, 32, 64]),
        )
        run = RunSpec(
            tuple(PromptDemand(rng.randint(1, prompt), new, rng.choice([1, 1, 4])) for _ in range(50))
            + (PromptDemand(prompt, new),)
        )
        proposal = plan_capacity(engine, run, slice_, model).proposal
        if proposal is None:
            continue
        plan = plan_capacity(proposal.limits, run, slice_, model)
        assert plan.ok, (proposal, plan.problems)
        assert plan.hbm_per_chip <= slice_.generation.hbm_bytes_per_chip
        assert max(max(h.batch_sequences, default=0) for h in plan.hosts) <= proposal.sequences


def test_auto_size_for_the_seed_model_fills_hbm_up_to_its_cap():
    from levanter_multihost.capacity import parse_tpu_type

    slice_ = parse_tpu_type("v5p-32")
    # Llama-3-8B with every axis sharded over 4 chips (tests/test_footprint.py derives these bytes)
    model = ModelShape(16_060_522_496, 4_015_529_984, 131072, 32768)
    run = RunSpec(tuple(PromptDemand(24, 2048, 8) for _ in range(1024)))
    proposal = plan_capacity(replace(SEED, max_pages=None), run, slice_, model).proposal
    assert (proposal.sequences, proposal.limited_by) == (1024, "cap")
    assert proposal.limits.max_pages == 1024 * 17 and proposal.tokens_per_s / 4 >= 13_500  # per chip, at the bound
