"""Predicted = observed: batches the capacity planner packs, run through Levanter's real ``InferenceEngine`` with the
tiny addition model on one CPU device.

One engine shape is compiled (``ENGINE``) plus one variant with 3 tokens per decode iteration; each limit of the
closed form is made to bind by the prompts and ``max_new_tokens`` alone, so no other shape compiles. Every packed
batch must run in one admission wave, show the pages and outer rounds :func:`forecast` predicts, give every row
its full ``max_new_tokens`` and leave the engine clean for the next batch. Where the bound is exact, one prompt
more must fail: a batch one sequence over ``max_pages`` runs out of pages, and the old decode-budget rule's
batches truncate. The engine's clones of prompts of a page or more, which it gets wrong, are an expected failure.
"""

import dataclasses
import random

import jax.numpy as jnp
import pytest
from levanter.inference.engine import InferenceEngineConfig
from tiny_engine import load_tiny, one_device

from levanter_multihost import seams
from levanter_multihost.addition import make_prompts
from levanter_multihost.capacity import BatchPacker, PromptDemand, batch_limit, forecast
from levanter_multihost.capacity_inputs import engine_limits
from levanter_multihost.generation import EngineStateError, WorkItem, build_engine, check_engine_state, generate_batch
from levanter_multihost.runplan import Sampling, StopCondition

pytestmark = pytest.mark.slow  # the real engine in this process

# 4 pages of 8 tokens per sequence at most; 15 pages, 8 slots, 6 prompts or 48 prompt tokens per prefill; a decode
# budget of 8 outer rounds x 4 iterations = 32
ENGINE = InferenceEngineConfig(
    max_seq_len=32,
    page_size=8,
    max_pages=15,
    max_seqs=8,
    max_seqs_in_prefill=6,
    max_prefill_size=48,
    max_queued_tokens=8,
    max_rounds=4,
    max_stop_seqs=0,
    max_stop_tokens=0,
    compute_dtype=jnp.float32,
)
SHARED_DECODE = dataclasses.replace(ENGINE, max_tokens_per_round=3)
GREEDY = Sampling(seed=0, stop=StopCondition())
PROMPTS = make_prompts(1000, 0)


def prompts_of(tokens: int, n: int) -> list[str]:
    """``n`` held-out addition prompts of ``tokens`` characters (one token each)."""
    found = [p for p in PROMPTS if len(p) == tokens][:n]
    assert len(found) == n, f"only {len(found)} prompts of {tokens} tokens"
    return found


@pytest.fixture(scope="module", autouse=True)
def checks_as_nan():
    """Equinox's engine checks as NaN poisoning, as the sampler's cli sets them before any engine program is
    traced (``check_engine_state`` reads the poison); the previous mode comes back after this module."""
    from equinox import _errors

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_errors, "EQX_ON_ERROR", _errors.EQX_ON_ERROR)
        patch.delenv("EQX_ON_ERROR", raising=False)
        assert seams.checks_as_nan() == "nan"
        yield


@pytest.fixture(scope="module")
def tiny(checks_as_nan):
    """The tiny addition model (float32) and its character tokenizer, loaded as the sampler loads them."""
    return load_tiny()


@pytest.fixture(scope="module")
def engine(tiny):
    """One engine of ``ENGINE``, reused by every test that leaves it clean (each batch is checked)."""
    return fresh_engine(tiny, ENGINE)


def fresh_engine(tiny, config: InferenceEngineConfig):
    """A new engine; one of a shape already compiled costs only its KV cache."""
    with one_device():
        return build_engine(tiny[0], tiny[1], config, logprobs=False)


def work(tiny, prompts, max_new, generations) -> tuple[list[WorkItem], list[PromptDemand]]:
    """The sampler's work items for ``prompts`` (global index = position) and what each asks of the engine."""
    ids = [tiny[1](p, add_special_tokens=False)["input_ids"] for p in prompts]
    items = [
        WorkItem(k, p, t, tuple(range(n)), n, m, 0.0)
        for k, (p, t, m, n) in enumerate(zip(prompts, ids, max_new, generations))
    ]
    return items, [PromptDemand(len(t), m, n) for t, m, n in zip(ids, max_new, generations)]


def run(engine, tiny, items, batch: int = 0, check: bool = True):
    """One ``generate_batch`` call, greedy with no stop sequence; the rows and the batch's stats. ``check`` runs
    ``check_engine_state`` after it, as the sampler does."""
    with one_device():
        pairs, stats = generate_batch(engine, tiny[1], items, GREEDY, 0, lambda _: None, lambda: 0.0)
    if check:
        check_engine_state(engine, pairs, 0, batch, tiny[0].Vocab.size)
    return [row for row, _ in pairs], stats


def run_packed(engine, tiny, config, prompts, max_new, generations, batch_size=None) -> list[int]:
    """Pack ``prompts`` as the sampler does, run every batch on ``engine`` and check it against its forecast;
    return the sequences of each batch."""
    limits = engine_limits(config)
    items, demands = work(tiny, prompts, max_new, generations)
    sizes = []
    for b, r in enumerate(BatchPacker(limits, limits.max_pages, batch_size).pack(demands)):
        rows, stats = run(engine, tiny, items[r.start : r.stop], b)
        expect = forecast(limits, demands[r.start : r.stop])
        assert (stats.waves, stats.sequences) == (expect.waves, expect.sequences) == (1, len(rows))
        if all(d.generations == 1 for d in demands[r.start : r.stop]):
            assert stats.pages_after_prefill == expect.pages_after_prefill
        else:  # a clone gets a page of its own only for its parent's last, partial page
            assert 0 < stats.pages_after_prefill <= expect.pages_after_prefill
        if expect.sequences <= limits.tokens_per_round:
            assert stats.outer_rounds == expect.outer_rounds
        else:  # sequences take turns; the forecast is the most any order of turns takes
            assert 0 < stats.outer_rounds <= expect.outer_rounds
        expected = [(k, g, "length", max_new[k]) for k in r for g in range(generations[k])]
        assert [
            (row["global_prompt_index"], row["generation_index"], row["finish_reason"], row["generated_token_count"])
            for row in rows
        ] == expected
        sizes.append(stats.sequences)
    return sizes


# (field that binds, prompt tokens, max_new_tokens, generations, batch_size, the batch it allows in sequences)
LIMITS = [
    ("engine.max_seqs_in_prefill", 5, 4, 1, None, 6),
    ("engine.max_prefill_size", 10, 4, 1, None, 4),  # 4 x 10 tokens of 48
    ("engine.max_pages", 8, 16, 1, None, 5),  # 3 pages each at full length, 15 pages
    ("engine.max_seqs_in_prefill", 5, 3, 2, None, 6),  # 3 prompts x 2 generations, a request each
    ("batch_size", 6, 4, 1, 3, 3),
]


@pytest.mark.parametrize(
    "field, tokens, max_new, n, batch_size, allowed", LIMITS, ids=[f"{c[0]}-n{c[3]}" for c in LIMITS]
)
def test_each_limit_sets_the_batch_and_every_batch_runs_as_forecast(
    engine, tiny, field, tokens, max_new, n, batch_size, allowed
):
    limits = engine_limits(ENGINE)
    limit = batch_limit(limits, limits.max_pages, PromptDemand(tokens, max_new, n), batch_size)
    assert (limit.limited_by, limit.sequences) == (field, allowed)
    sizes = run_packed(engine, tiny, ENGINE, prompts_of(tokens, 11), [max_new] * 11, [n] * 11, batch_size)
    full, rest = divmod(11 * n, allowed)
    assert sizes == [allowed] * full + ([rest] if rest else [])


def test_rows_with_their_own_max_new_tokens_and_generations(engine, tiny):
    """Mixed rows pack by their own demands; prompts stay under a page, where the engine's clones are sound."""
    rng = random.Random(0)
    prompts = [p for p in PROMPTS if len(p) <= 7][:16]
    max_new = [rng.randint(2, ENGINE.max_seq_len - len(p)) for p in prompts]
    generations = [rng.choice([1, 1, 2]) for _ in prompts]
    sizes = run_packed(engine, tiny, ENGINE, prompts, max_new, generations)
    assert sum(sizes) == sum(generations) and len(sizes) > 2


def test_decode_budget_sets_the_batch_when_sequences_take_turns(tiny):
    """3 tokens per iteration: 18 new tokens need 17 iterations per turn, and 32 iterations hold 1 turn of 3."""
    limits = engine_limits(SHARED_DECODE)
    limit = batch_limit(limits, limits.max_pages, PromptDemand(5, 18))
    assert (limit.limited_by, limit.sequences) == ("engine.max_tokens_per_round", 3)
    engine = fresh_engine(tiny, SHARED_DECODE)
    assert run_packed(engine, tiny, SHARED_DECODE, prompts_of(5, 7), [18] * 7, [1] * 7) == [3, 3, 1]
    # short answers: 6 sequences take turns 3 at a time within the budget (outer rounds at most the forecast)
    assert run_packed(engine, tiny, SHARED_DECODE, prompts_of(6, 8), [5] * 8, [1] * 8) == [6, 2]


def test_one_sequence_over_max_pages_runs_out_of_pages(tiny):
    """The page bound is exact: 5 sequences of 3 pages fit 15 pages, a sixth poisons the page table mid-decode."""
    items, demands = work(tiny, prompts_of(8, 6), [16] * 6, [1] * 6)
    packer = BatchPacker(engine_limits(ENGINE), ENGINE.max_pages)
    assert packer.fits(demands[:5]) and not packer.fits(demands)
    engine = fresh_engine(tiny, ENGINE)
    rows, stats = run(engine, tiny, items, check=False)
    assert stats.waves == 1  # admission counts prompt pages only: all six get in
    with pytest.raises(EngineStateError, match="poisoned"):
        check_engine_state(engine, [(row, None) for row in rows], 0, 0, tiny[0].Vocab.size)


def test_a_batch_the_old_decode_rule_allowed_truncates(tiny):
    """5 x 19 decode tokens fit 32 iterations x 3 tokens (the old rule), but the engine re-queues each iteration's
    tokens sorted by slot, so some sequences fall behind: they need more than 32 iterations and truncate. The packer
    now allows 3 (ceil(5 / 3) turns of 19 iterations could take 38)."""
    limits = engine_limits(SHARED_DECODE)
    items, demands = work(tiny, prompts_of(4, 5), [20] * 5, [1] * 5)
    assert 5 * 19 <= limits.decode_iterations * limits.tokens_per_round
    assert not BatchPacker(limits, limits.max_pages).fits(demands)
    engine = fresh_engine(tiny, SHARED_DECODE)
    rows, stats = run(engine, tiny, items, check=False)
    assert stats.outer_rounds == limits.outer_rounds == 8
    assert "truncated" in {row["finish_reason"] for row in rows}
    assert min(row["generated_token_count"] for row in rows) < 20
    with pytest.raises(EngineStateError, match="never finished"):
        check_engine_state(engine, [(row, None) for row in rows], 0, 0, tiny[0].Vocab.size)


def test_generations_of_prompts_of_a_page_or_more_match_greedy(tiny):
    """The pinned engine clones a request before its prompt pages exist: a clone of a prompt of page_size tokens or
    more gets none of them (wrong text) or leaks pages. The sampler sends one request per generation instead."""
    items, _ = work(tiny, prompts_of(8, 2) + prompts_of(9, 2), [4] * 4, [2] * 4)
    rows, _ = run(fresh_engine(tiny, ENGINE), tiny, items)
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault(row["global_prompt_index"], []).append(row["generated_token_ids"])
    assert all(first == second for first, second in by_prompt.values())  # greedy: every generation the same
