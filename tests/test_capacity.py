"""The pure capacity planner: the seed's v5p-32 numbers, engine rules, admission waves, the decode budget, pages,
HBM and the roofline. No JAX; every test is arithmetic."""

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from levanter_multihost.capacity import (
    GIB,
    EngineLimits,
    ModelShape,
    RunSpec,
    Topology,
    parse_tpu_type,
    plan_capacity,
)

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
# Llama-3-8B: 8,030,261,248 parameters in bfloat16, weights and KV heads split over a host's 4 chips.
LLAMA3_8B = ModelShape(32, 8, 128, 8_030_261_248 * 2, weight_shards=4, kv_shards=4)
SHORT_1024 = RunSpec(tuple([16] * 1024), 2048)


def seed_prompts(n: int) -> tuple[int, ...]:
    """Short prompts (8..32 tokens): 64 of them fit one 2048-token prefill, and each sequence needs 17 pages."""
    return tuple(8 + (i * 7) % 25 for i in range(n))


def fields_of(plan) -> list[str]:
    return [p.field for p in plan.problems]


# ---------------------------------------------------------------------------------------------------------------
# the seed


def test_seed_v5p32_256_prompts_fit():
    plan = plan_capacity(SEED, RunSpec(seed_prompts(256), 2048), V5P_32, LLAMA3_8B)
    assert plan.ok, plan.report()
    assert plan.prompts_per_host == [64, 64, 64, 64]
    assert plan.pages_per_seq_max == 20
    assert plan.pages_needed == 1280
    assert plan.max_pages == 2304
    assert plan.free_pages == 1024
    assert plan.new_tokens_per_prompt == [2048] * 256
    # 64 x ceil((prompt + 2048) / 128) = 64 x 17: the 1088 pages the seed saw in use
    assert plan.pages_required == 1088
    for h in plan.hosts:
        assert len(h.waves) == 1 and h.waves[0].sequences == 64
        # 2047 decode iterations after the prefill's token: 32 outer rounds, as the seed logged
        assert h.decode_iterations == 2047
        assert h.rounds_run == 32


def test_1024_short_prompts_with_max_seqs_128_fail_on_max_seqs():
    plan = plan_capacity(SEED, SHORT_1024, V5P_32, LLAMA3_8B)
    assert not plan.ok
    problem = next(p for p in plan.problems if p.field == "engine.max_seqs")
    assert problem.suggested == 256
    assert "max_seqs (128) is below the 256 sequences on host 0" in problem.message
    assert "Increase max_seqs to 256" in problem.message
    # the second wave of 128 starts after outer round 32 and gets 8 rounds x 64 iterations + the prefill token
    host = plan.hosts[0]
    assert [w.sequences for w in host.waves] == [128, 128]
    assert host.waves[1].after_round == 32
    assert sorted(set(host.new_tokens)) == [513, 2048]


def test_raising_max_seqs_alone_fails_on_max_queued_tokens():
    plan = plan_capacity(replace(SEED, max_seqs=256), SHORT_1024, V5P_32, LLAMA3_8B)
    assert fields_of(plan)[0] == "engine.max_queued_tokens"
    problem = plan.problems[0]
    assert problem.suggested == 256
    assert "max_queued_tokens (128) is below max_seqs (256)" in problem.message


def test_final_1024_values_with_128_tokens_per_round_give_1281_tokens():
    """The seed's TPU run: one wave of 256 sequences per host, 40 outer rounds x 64 iterations x 128 tokens shared
    by 256 sequences = 1280 decode tokens each, + 1 from the prefill."""
    plan = plan_capacity(replace(SEED_1024, max_tokens_per_round=128), SHORT_1024, V5P_32, LLAMA3_8B)
    assert plan.new_tokens_per_prompt == [1281] * 1024
    assert 40 * 64 * 128 // 256 + 1 == 1281
    for h in plan.hosts:
        assert len(h.waves) == 1 and h.waves[0].sequences == 256
        assert h.rounds_run == 40
    assert fields_of(plan) == ["engine.max_tokens_per_round"]
    assert plan.problems[0].suggested == 256
    assert plan.truncated_prompts == 1024


def test_final_1024_values_pass():
    plan = plan_capacity(SEED_1024, SHORT_1024, V5P_32, LLAMA3_8B)
    assert plan.ok, plan.report()
    assert plan.prompts_per_host == [256] * 4
    assert plan.new_tokens_per_prompt == [2048] * 1024
    assert plan.pages_required == 256 * 17
    # the worst case (every sequence at max_seq_len) would not fit: a note, not a failure
    assert plan.pages_needed == 256 * 20
    assert any("5120" in n for n in plan.notes)


# ---------------------------------------------------------------------------------------------------------------
# topology


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


# ---------------------------------------------------------------------------------------------------------------
# engine rules and lengths


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
    plan = plan_capacity(engine, RunSpec((4, 4), 8), Topology())
    rule = [p for p in plan.problems if p.field == "engine.max_queued_tokens"]
    assert bool(rule) == (queued < need)
    if rule:
        assert rule[0].suggested == need
        assert f"max_queued_tokens ({queued})" in rule[0].message


def test_max_seq_len_below_prompt_plus_new_tokens():
    plan = plan_capacity(EngineLimits(max_seq_len=100, page_size=16), RunSpec((10, 40), 64), Topology())
    problem = next(p for p in plan.problems if p.field == "engine.max_seq_len")
    assert problem.suggested == 104
    assert "max_seq_len (100) is below the 104 tokens of prompt 1" in problem.message


def test_stop_sequence_capacity():
    run = RunSpec((4,), 8, stop_tokens=5)
    plan = plan_capacity(EngineLimits(max_seq_len=64, page_size=8, max_stop_tokens=4), run, Topology())
    assert [(p.field, p.suggested) for p in plan.problems] == [("engine.max_stop_tokens", 5)]
    plan = plan_capacity(EngineLimits(max_seq_len=64, page_size=8, max_stop_seqs=0), run, Topology())
    assert [(p.field, p.suggested) for p in plan.problems] == [("engine.max_stop_seqs", 1)]


def test_prompt_longer_than_prefill_blocks_the_queue():
    """_admit_from_queue stops at the head request; a prompt that never fits leaves it and everything after it."""
    engine = EngineLimits(max_seq_len=64, page_size=8, max_pages=100, max_seqs=8, max_prefill_size=16)
    plan = plan_capacity(engine, RunSpec((4, 20, 4), 8), Topology())
    assert plan.new_tokens_per_prompt == [8, 0, 0]
    assert fields_of(plan) == ["engine.max_prefill_size"]
    assert plan.problems[0].suggested == 20


# ---------------------------------------------------------------------------------------------------------------
# the decode budget


@pytest.mark.parametrize("max_seq_len, rounds", [(128, 2), (129, 3), (191, 3), (192, 3), (193, 4)])
def test_outer_rounds_stop_at_the_first_k_with_k_times_max_rounds_at_least_max_seq_len(max_seq_len, rounds):
    engine = EngineLimits(max_seq_len=max_seq_len, page_size=16, max_rounds=64, max_seqs=2, max_tokens_per_round=1)
    assert engine.outer_rounds == rounds
    # two sequences share one token per iteration: each gets half the budget, + 1 from the prefill
    plan = plan_capacity(engine, RunSpec((1, 1), max_seq_len - 1), Topology())
    assert plan.hosts[0].rounds_run == rounds
    assert sorted(plan.new_tokens_per_prompt) == [1 + rounds * 64 // 2] * 2


@pytest.mark.parametrize("sequences", [4, 8, 16])
@pytest.mark.parametrize("per_round", [1, 2, 4])
@pytest.mark.parametrize("max_rounds", [4, 16])
@pytest.mark.parametrize("max_new_tokens", [16, 40])
def test_tokens_are_shared_when_fewer_per_round_than_sequences(sequences, per_round, max_rounds, max_new_tokens):
    engine = EngineLimits(
        max_seq_len=48,
        page_size=8,
        max_seqs=16,
        max_seqs_in_prefill=16,
        max_prefill_size=256,
        max_rounds=max_rounds,
        max_tokens_per_round=per_round,
    )
    plan = plan_capacity(engine, RunSpec(tuple([4] * sequences), max_new_tokens), Topology())
    budget = engine.outer_rounds * max_rounds * per_round // sequences
    assert plan.new_tokens_per_prompt == [min(max_new_tokens, 1 + budget)] * sequences
    assert plan.ok == (1 + budget >= max_new_tokens)


@pytest.mark.parametrize("max_rounds", [1, 3, 8, 64])
@pytest.mark.parametrize("prompt", [1, 7, 30])
def test_one_wave_with_a_token_per_sequence_always_finishes(max_rounds, prompt):
    engine = EngineLimits(
        max_seq_len=prompt + 33,
        page_size=8,
        max_seqs=8,
        max_seqs_in_prefill=8,
        max_prefill_size=256,
        max_rounds=max_rounds,
    )
    plan = plan_capacity(engine, RunSpec(tuple([prompt] * 8), 33), Topology())
    assert plan.ok, plan.report()
    assert plan.hosts[0].decode_iterations == 32


def test_a_later_wave_gets_fewer_rounds():
    engine = EngineLimits(max_seq_len=64, page_size=8, max_seqs=4, max_seqs_in_prefill=8, max_rounds=8)
    plan = plan_capacity(engine, RunSpec(tuple([4] * 8), 40), Topology())
    host = plan.hosts[0]
    # first wave: 39 iterations, done in round 5; the second wave gets the remaining 3 rounds = 24 iterations
    assert [(w.after_round, w.sequences, w.stopped_by) for w in host.waves] == [(0, 4, "max_seqs"), (5, 4, None)]
    assert plan.new_tokens_per_prompt == [40] * 4 + [25] * 4
    assert fields_of(plan) == ["engine.max_seqs"]
    assert plan.problems[0].suggested == 8


# ---------------------------------------------------------------------------------------------------------------
# exact replay: values observed on the pinned engine (CPU, tiny random Llama, page_size 8, max_rounds 4)

CPU_ENGINE = {"page_size": 8, "max_pages": 400, "max_rounds": 4}


def test_replay_matches_engine_with_two_waves_and_shared_tokens():
    engine = EngineLimits(
        max_seq_len=48, max_seqs=8, max_seqs_in_prefill=8, max_queued_tokens=8, max_tokens_per_round=4, **CPU_ENGINE
    )
    plan = plan_capacity(engine, RunSpec((5, 9, 3, 12, 7, 6, 8, 10), 30), Topology())
    host = plan.hosts[0]
    assert list(host.new_tokens) == [25, 25, 26, 26, 26, 26, 23, 23]
    assert list(host.round_start_pages) == [8, 13, 16, 17, 18, 21, 24, 25, 26, 29, 32, 33]
    assert host.pages_at_end == 34 and host.observed_pages_peak == 34


@pytest.mark.parametrize(
    "limits, prompts, new, n_gen, round_start",
    [
        (
            {
                "max_seq_len": 40,
                "max_seqs": 4,
                "max_seqs_in_prefill": 4,
                "max_queued_tokens": 4,
                "max_tokens_per_round": 4,
            },
            (5, 9, 3, 12, 7, 6, 8, 10, 4, 11),
            9,
            1,
            [6, 7, 5, 8, 3, 3],
        ),
        (
            {
                "max_seq_len": 40,
                "max_seqs": 8,
                "max_seqs_in_prefill": 8,
                "max_prefill_size": 20,
                "max_queued_tokens": 8,
                "max_tokens_per_round": 8,
            },
            (5, 9, 3, 12, 7, 6, 8, 10),
            17,
            1,
            [4, 8, 13, 19, 12, 9, 3],
        ),
        (
            {
                "max_seq_len": 40,
                "max_seqs": 6,
                "max_seqs_in_prefill": 6,
                "max_queued_tokens": 6,
                "max_tokens_per_round": 4,
            },
            (5, 3, 7),
            12,
            2,
            [6, 8, 10, 8, 4],
        ),
    ],
)
def test_replay_matches_engine_pages_at_round_starts(limits, prompts, new, n_gen, round_start):
    plan = plan_capacity(EngineLimits(**limits, **CPU_ENGINE), RunSpec(prompts, new, n_gen), Topology())
    assert plan.ok, plan.report()
    assert list(plan.hosts[0].round_start_pages) == round_start
    assert plan.hosts[0].pages_at_end == 0
    assert plan.new_tokens_per_prompt == [new] * len(prompts)


def test_out_of_pages_mid_decode_is_a_problem():
    """Admission checks prompt pages only; this config crashed the engine with 'Out of free pages'."""
    engine = EngineLimits(
        max_seq_len=40,
        max_seqs=8,
        max_seqs_in_prefill=8,
        max_queued_tokens=8,
        max_tokens_per_round=8,
        page_size=8,
        max_pages=12,
        max_rounds=4,
    )
    plan = plan_capacity(engine, RunSpec((5, 9, 3, 12, 7, 6, 8, 10), 12), Topology())
    assert plan.hosts[0].peak_pages > 12
    assert [(p.field, p.suggested) for p in plan.problems] == [("engine.max_pages", 20)]


# ---------------------------------------------------------------------------------------------------------------
# suggestions, sharding, HBM, roofline, output


@pytest.mark.parametrize(
    "engine, run",
    [
        (SEED, SHORT_1024),
        (replace(SEED, max_seqs=256), SHORT_1024),
        (replace(SEED_1024, max_tokens_per_round=128), SHORT_1024),
        (replace(SEED, max_seq_len=2000), RunSpec(seed_prompts(256), 2048)),
        (replace(SEED, max_pages=1000), RunSpec(seed_prompts(256), 2048)),
    ],
)
def test_each_suggestion_removes_its_problem(engine, run):
    plan = plan_capacity(engine, run, V5P_32, LLAMA3_8B)
    assert plan.problems
    for problem in plan.problems:
        name = problem.field.removeprefix("engine.")
        fixed = plan_capacity(replace(engine, **{name: problem.suggested}), run, V5P_32, LLAMA3_8B)
        assert problem.field not in fields_of(fixed), (problem, fixed.report())


@pytest.mark.parametrize("strategy", ["contiguous", "balanced"])
def test_prompts_are_sharded_like_the_sampler(strategy):
    run = RunSpec(tuple(range(1, 11)), 8, shard_strategy=strategy)
    plan = plan_capacity(EngineLimits(max_seq_len=64, page_size=8), run, Topology(num_hosts=4))
    assert sum(plan.prompts_per_host) == 10
    assert sorted(i for h in plan.hosts for i in h.prompt_indices) == list(range(10))
    if strategy == "contiguous":
        assert plan.prompts_per_host == [3, 3, 2, 2]


def test_more_hosts_than_prompts():
    plan = plan_capacity(EngineLimits(max_seq_len=64, page_size=8), RunSpec((4, 4), 8), Topology(num_hosts=4))
    assert plan.ok and plan.prompts_per_host == [1, 1, 0, 0]
    assert plan.hosts[3].min_new_tokens is None


def test_hbm_per_chip():
    plan = plan_capacity(SEED, RunSpec(seed_prompts(256), 2048), V5P_32, LLAMA3_8B)
    assert plan.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    assert plan.kv_cache_bytes == 2304 * 128 * 128 * 1024 == 36 * GIB
    assert plan.hbm_bytes_per_chip_needed == 8_030_261_248 * 2 // 4 + 9 * GIB
    too_many = replace(SEED, max_pages=30_000)
    plan = plan_capacity(too_many, RunSpec(seed_prompts(256), 2048), V5P_32, LLAMA3_8B)
    problem = next(p for p in plan.problems if p.field == "engine.max_pages")
    assert "above the 95.0 GiB of a v5p chip" in problem.message
    fits = plan_capacity(
        replace(SEED, max_pages=problem.suggested), RunSpec(seed_prompts(256), 2048), V5P_32, LLAMA3_8B
    )
    assert fits.ok and fits.hbm_bytes_per_chip_needed <= 95 * GIB


def test_weights_too_big_for_one_chip():
    llama_70b = ModelShape(80, 8, 128, 70_553_706_496 * 2)
    plan = plan_capacity(SEED, RunSpec((16,), 64), V5P_32, llama_70b)
    assert [(p.field, p.suggested) for p in plan.problems] == [("trainer.model_axis_size", 4)]


def test_unset_max_pages_is_estimated_from_hbm_or_skipped():
    engine = replace(SEED, max_pages=None)
    plan = plan_capacity(engine, RunSpec(seed_prompts(64), 2048), V5P_32, LLAMA3_8B)
    per_page_per_chip = 128 * 128 * 1024 / 4
    assert plan.max_pages == int((95 * GIB - 8_030_261_248 * 2 // 4) * 0.9 // per_page_per_chip)
    assert plan.ok
    plan = plan_capacity(engine, RunSpec(seed_prompts(64), 2048), Topology(num_hosts=1))
    assert plan.max_pages is None and plan.free_pages is None and plan.ok
    assert any("page checks skipped" in n for n in plan.notes)


def test_roofline_of_the_seed_run():
    """64 prompts of 32 tokens per v5p-32 host: 2047 iterations, each reading a quarter of the weights and of the
    packed sequences' KV on each chip at 2,765 GB/s. The seed measured ~107 s per host."""
    plan = plan_capacity(SEED, RunSpec(tuple([32] * 256), 2048), V5P_32, LLAMA3_8B)
    host = plan.hosts[0]
    assert host.decode_iterations == 2047
    assert host.kv_tokens_read == 64 * sum(range(33, 33 + 2047))
    weights = 2047 * 8_030_261_248 * 2 / 4
    kv = host.kv_tokens_read * 128 * 1024 / 4
    assert plan.decode_roofline_s[0] == pytest.approx((weights + kv) / 2765e9)
    assert 4.5 < plan.decode_roofline_s[0] < 5.0


def test_to_dict_is_json():
    plan = plan_capacity(SEED, SHORT_1024, V5P_32, LLAMA3_8B)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["ok"] is False
    assert data["prompts_per_host"] == [256] * 4
    assert data["pages_per_seq_max"] == 20
    assert data["max_pages"] == 2304
    assert len(data["new_tokens_per_prompt"]) == 1024
    assert {"field", "message", "suggested"} == set(data["problems"][0])
    assert data["decode_budget"] == {"outer_rounds": 40, "iterations": 2560}


def test_report_names_fields_and_values():
    text = plan_capacity(SEED, SHORT_1024, V5P_32, LLAMA3_8B).report()
    assert text.startswith("FAIL: 1024 prompts")
    assert "parameter" in text and "headroom" in text and "verdict" in text
    assert "- engine.max_seqs: 256" in text


def test_invalid_numbers_raise():
    with pytest.raises(ValueError, match="max_new_tokens"):
        plan_capacity(SEED, RunSpec((4,), 0), Topology())
    assert math.ceil(2560 / 128) == SEED.pages_per_seq_max


def test_capacity_imports_no_jax():
    code = (
        "import sys, levanter_multihost.capacity; print(sorted(m for m in sys.modules if m in ('jax', 'levanter')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
