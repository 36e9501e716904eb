"""The decode step without serial loops (``levanter_multihost.seams.decode_step``) against Levanter's own step.

The same requests through the same engine shape, once with Levanter's bookkeeping and once with the seam's: greedy
and sampled, mixed prompt lengths and budgets (sequences finishing mid-round, crossing page boundaries), stop
sequences and EOS, several generations of a prompt. Tokens must be identical, and greedy log-probabilities too;
sampled ones agree to float32 rounding (XLA compiles the sampler's division by the temperature differently in the
two programs, so they can differ in the last bits, ~1e-6). Then
what the seam changes on purpose: a stop sequence completed across the prompt boundary no longer ends a sequence.
And the compiled decode program: no loop whose trip count grows with the batch.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from levanter.inference.engine import InferenceEngineConfig
from tiny_engine import load_tiny, one_device

from levanter_multihost import seams
from levanter_multihost.generation import WorkItem, build_engine, check_engine_state, generate_batch, row_ending
from levanter_multihost.runplan import Sampling, StopCondition
from levanter_multihost.seams import SeamError, decode_step

# 8-token pages, 4 decode iterations a round: sequences of 4-9 prompt and 3-22 new tokens cross page boundaries
# and finish in the middle of rounds
ENGINE = InferenceEngineConfig(
    max_seq_len=32,
    page_size=8,
    max_pages=40,
    max_seqs=16,
    max_seqs_in_prefill=16,
    max_prefill_size=160,
    max_queued_tokens=16,
    max_rounds=4,
    max_stop_seqs=3,
    max_stop_tokens=2,
    compute_dtype=jnp.float32,
)
PROMPTS = ["12+30=", "7+5=", "100+23=", "2269+795=", "9+9=", "4821+377=", "58+67=", "3+4="]


@pytest.fixture(scope="module")
def tiny():
    from equinox import _errors

    with pytest.MonkeyPatch.context() as patch:  # the engine's checks as NaN, as the sampler runs them
        patch.setattr(_errors, "EQX_ON_ERROR", _errors.EQX_ON_ERROR)
        patch.delenv("EQX_ON_ERROR", raising=False)
        seams.checks_as_nan()
        yield load_tiny()
    jax.clear_caches()


def stop_condition(tokenizer, strings=(), eos=()) -> StopCondition:
    ids = tuple(tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in strings)
    return StopCondition(strings=tuple(strings), token_ids=ids, eos_ids=tuple(eos))


def items(tokenizer, temperature: float, generations: int = 1) -> list[WorkItem]:
    out = []
    for k, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = generations if k % 2 else 1
        out.append(WorkItem(k, prompt, ids, tuple(range(n)), n, 3 + (5 * k) % 20, temperature))
    return out


def sample(tiny, work, sampling: Sampling) -> list[dict]:
    model, tokenizer = tiny
    with one_device():
        engine = build_engine(model, tokenizer, ENGINE, logprobs=sampling.logprobs)
        pairs, _ = generate_batch(engine, tokenizer, work, sampling, 0, lambda _: None, lambda: 0.0)
    check_engine_state(engine, pairs, 0, 0, model.Vocab.size)  # every page and slot released
    return [row for row, _ in pairs]


def scenarios(tokenizer) -> dict[str, tuple[list[WorkItem], Sampling]]:
    stops = stop_condition(tokenizer, ["9", "5"], eos=[tokenizer.convert_tokens_to_ids(".")])
    return {
        "greedy": (items(tokenizer, 0.0), Sampling(seed=0, stop=StopCondition(), logprobs=True)),
        "sampled, n=3": (items(tokenizer, 0.9, 3), Sampling(seed=5, stop=StopCondition(), logprobs=True)),
        "stops and EOS": (items(tokenizer, 0.0), Sampling(seed=0, stop=stops, logprobs=True)),
        "sampled with stops": (items(tokenizer, 1.2, 2), Sampling(seed=9, stop=stops, logprobs=True)),
        "prompt boundary": (
            [WorkItem(0, "12+30=", tokenizer("12+30=", add_special_tokens=False)["input_ids"], (0,), 1, 6, 0.0)],
            Sampling(seed=0, stop=stop_condition(tokenizer, ["=4"]), logprobs=True),
        ),
    }


@pytest.fixture(scope="module")
def both(tiny):
    """Every scenario's rows with Levanter's step, then with the seam (each variant compiles once)."""
    runs = scenarios(tiny[1])
    with decode_step.levanter_own_step():
        levanter = {name: sample(tiny, *run) for name, run in runs.items()}
    seam = {name: sample(tiny, *run) for name, run in runs.items()}
    return levanter, seam, runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["greedy", "sampled, n=3", "stops and EOS", "sampled with stops"])
def test_seam_gives_levanters_tokens(both, name):
    levanter, seam, (work, _) = both[0][name], both[1][name], both[2][name]
    assert [r["generated_token_ids"] for r in seam] == [r["generated_token_ids"] for r in levanter]
    assert [r["finish_reason"] for r in seam] == [r["finish_reason"] for r in levanter]
    for a, b in zip(seam, levanter):
        if all(item.temperature == 0 for item in work):
            assert a["generated_logprobs"] == b["generated_logprobs"]
        else:  # XLA compiles the sampler's division by the temperature differently in the two programs
            np.testing.assert_allclose(a["generated_logprobs"], b["generated_logprobs"], rtol=1e-5, atol=1e-5)
    assert len({r["generated_token_count"] for r in seam}) > 3  # mixed lengths, not one budget
    if "stops" in name:
        assert "stop" in {r["finish_reason"] for r in seam}


@pytest.mark.slow
def test_a_stop_across_the_prompt_boundary_does_not_end_the_sequence(both):
    """ "12+30=" ends in "=" and the answer starts with "4": the stop string "=4" is spelled by the prompt's last
    token and the first generated one. Levanter's step stops there (a row the text cannot explain: truncated);
    the seam's keeps generating, and stops at a "=4" within the generation only."""
    (old,), (new,) = both[0]["prompt boundary"], both[1]["prompt boundary"]
    assert (old["generated_text"], old["finish_reason"]) == ("4", "truncated")
    assert new["generated_text"].startswith("42.") and new["finish_reason"] == "length"


def test_a_stop_string_cuts_ids_and_text_alike(tiny):
    """A stop string found in the text but not as the engine's tokens: ids end with the token completing it."""
    _, tokenizer = tiny
    ids = tokenizer("42.7+1", add_special_tokens=False)["input_ids"]
    stop = StopCondition(strings=("2.",), token_ids=((999,),))  # tokens the engine never saw
    row = row_ending(ids, tokenizer, stop, 10)
    assert row["generated_token_ids"] == ids[:3] and row["generated_text"] == "4"
    assert (row["finish_reason"], row["stop_reason"], row["generated_token_count"]) == ("stop", "2.", 3)
    assert row_ending(row["generated_token_ids"], tokenizer, stop, 10) == row  # resume re-derives the same row
    kept = row_ending(ids, tokenizer, dataclasses.replace(stop, include_stop_in_text=True), 10)
    assert kept["generated_text"] == "42." and kept["generated_token_ids"] == ids[:3]


def _whiles(tiny, max_seqs: int) -> list[tuple[str, str | None]]:
    from levanter.inference import engine as engine_module

    model, tokenizer = tiny
    config = dataclasses.replace(
        ENGINE,
        max_seqs=max_seqs,
        max_tokens_per_round=max_seqs,
        max_queued_tokens=max_seqs,
        max_seqs_in_prefill=max_seqs,
    )
    with one_device():
        engine = build_engine(model, tokenizer, config, logprobs=False)
        hlo = engine_module._run_generation_loop.lower(engine.gen_state, model, engine.sampler, max_seqs, 2)
        text = hlo.compile().as_text()
    found = []
    for line in text.splitlines():
        if " while(" in line:
            name = re.search(r'op_name="([^"]*)"', line)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            found.append((name.group(1) if name else "", trips.group(1) if trips else None))
    return found


@pytest.mark.slow
def test_no_loop_grows_with_the_batch(tiny):
    """The compiled decode program at 8 and at 32 slots: besides the decode round itself and the reference
    attention (a Pallas kernel on TPU), every loop has a trip count XLA knows and the batch does not change."""
    loops = {}
    for max_seqs in (8, 32):
        rest = [(n, t) for n, t in _whiles(tiny, max_seqs) if n != "jit(_run_generation_loop)/while"]
        loops[max_seqs] = sorted((n, t) for n, t in rest if "ragged_paged_attention" not in n)
    assert loops[8] == loops[32], "a loop's trip count depends on the batch"
    assert all(t is not None for _, t in loops[8]), f"a loop with a data-dependent trip count: {loops[8]}"
    assert not any(re.search("allocate|update_tokens|free_pages|kv_update|batch_info", n) for n, _ in loops[8])


def test_kv_scatter_writes_what_levanters_loop_writes():
    """Engine-like inputs: the first K destinations valid and distinct, the rest invalid."""
    original = decode_step._levanter_function("levanter.layers.kv_cache", "kv_update_unified_prefix")
    rng = np.random.default_rng(0)
    pages, slots, heads, dim, n = 6, 4, 2, 3, 12
    for trial in range(20):
        kv = rng.standard_normal((pages, slots, 2 * heads, dim)).astype(np.float32)
        k = int(rng.integers(0, n + 1))
        flat = rng.permutation(pages * slots)[:n]
        t_pages = np.where(np.arange(n) < k, flat // slots, 2_000_000).astype(np.int32)
        t_slots = np.where(np.arange(n) < k, flat % slots, 2_000_000).astype(np.int32)
        new_k, new_v = (rng.standard_normal((n, heads, dim)).astype(np.float32) for _ in range(2))
        want = original(jnp.asarray(kv), t_pages, t_slots, new_k, new_v, jnp.int32(k))
        got = decode_step.kv_update_scatter(jnp.asarray(kv), t_pages, t_slots, new_k, new_v, jnp.int32(k))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"trial {trial}")


def test_guard_fails_loudly_when_levanter_moves(monkeypatch):
    key = ("levanter.inference.jit_scheduler", "DecodeState.update_tokens")
    monkeypatch.setitem(decode_step.SOURCES, key, "0" * 64)
    with pytest.raises(SeamError, match="DecodeState.update_tokens changed"):
        decode_step.check()
    monkeypatch.undo()
    caller = ("levanter.layers.kv_cache", "KvPageCache.update", "a_name_it_never_reads")
    monkeypatch.setattr(decode_step, "CALLERS", [*decode_step.CALLERS, caller])
    with pytest.raises(SeamError, match="no longer reads a_name_it_never_reads"):
        decode_step.check()


def test_install_is_idempotent_and_levanters_own_step_restores():
    from levanter.inference import engine as engine_module
    from levanter.inference.jit_scheduler import SequenceTable
    from levanter.layers import kv_cache

    decode_step.install()
    decode_step.install()
    assert engine_module.DecodeState is decode_step.PromptLengthDecodeState
    assert kv_cache.kv_update_unified_prefix is decode_step.kv_update_scatter
    with decode_step.levanter_own_step():
        decode_step.install()  # held off inside the block, as build_engine calls it
        assert engine_module.DecodeState is not decode_step.PromptLengthDecodeState
        assert SequenceTable.allocate_for_seq is not decode_step.allocate_for_seq
        decode_step.check()  # Levanter's own functions, as pinned
    assert SequenceTable.allocate_for_seq is decode_step.allocate_for_seq
