"""The serial loops of one decode round (bench/decode_step.py) and the KV-write seam (bench/decode_seam.py).

Traces Levanter's decode program on the tiny model (no compile, a few seconds) and checks that its loops are
exactly the ones docs/benchmarks.md (section 11) lists, so that a Levanter upgrade that adds, removes or moves one shows up
here; and that the seam's scatter writes the same KV cache as Levanter's per-token loop for every input
(invalid, negative and duplicate destinations, any K) and fails loudly when what it relies on moves.
"""

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import decode_seam  # noqa: E402  (bench/ is put on the path just above)
import decode_step  # noqa: E402

# (file, function) -> copies in the tiny model's decode program (4 layers); fori loops with static bounds are
# scans in the jaxpr, whiles in HLO
EXPECTED = {
    ("engine.py", "_run_generation_loop"): 1,
    ("jit_scheduler.py", "SequenceTable.allocate_for_seq"): 1,
    ("jit_scheduler.py", "SequenceTable.allocate_for_seq.<locals>._alloc_pages_for_seq"): 1,
    ("jit_scheduler.py", "SequenceTable._create_batch_info"): 1,
    ("kv_cache.py", "kv_update_unified_prefix"): 4,
    ("attention.py", "default_ragged_paged_attention"): 4,
    ("attention.py", "default_ragged_paged_attention.<locals>._compute_attention_for_seq"): 4,
    (
        "attention.py",
        "default_ragged_paged_attention.<locals>._compute_attention_for_seq.<locals>._compute_attention_for_q_block",
    ): 4,
    ("jit_scheduler.py", "DecodeState.update_tokens"): 1,
    ("jit_scheduler.py", "SequenceTable.free_pages_for_finished"): 1,
    ("jit_scheduler.py", "SequenceTable.free_pages_for_finished.<locals>.dec_refcounts_for_seq"): 1,
}


@pytest.fixture(scope="module")
def tiny():
    import jax

    args = decode_step.parse_args_from(["--loops_only", "--no_compile"])
    config = decode_step.load_config(args)
    from levanter_multihost import model_loading

    with model_loading.on_local_mesh(config.trainer):
        setup = decode_step.Setup(config, args)
        yield setup, config, args
    jax.clear_caches()


def _trace_loops(setup, config):
    from levanter.inference import engine as engine_mod

    c = config.engine
    gen_state, _engine = setup.gen_state_for_tracing()
    traced = engine_mod._run_generation_loop.trace(
        gen_state, setup.model, setup.sampler, c.imputed_max_tokens_per_round, c.max_rounds
    )
    return decode_step.jaxpr_loops(traced.jaxpr), traced


def test_decode_round_has_the_documented_loops(tiny):
    setup, config, _ = tiny
    loops, traced = _trace_loops(setup, config)
    assert Counter(r["key"] for r in loops) == Counter(EXPECTED), "Levanter's decode loops changed: update docs"
    static = {r["key"][1]: r["static_length"] for r in loops if r["primitive"] == "scan"}
    c = config.engine
    assert static["SequenceTable._create_batch_info"] == c.imputed_max_tokens_per_round
    assert static["SequenceTable.free_pages_for_finished"] == c.max_seqs
    by_key = {r["key"]: r for r in loops}
    kv = by_key[("kv_cache.py", "kv_update_unified_prefix")]
    assert kv["primitive"] == "while" and kv["depth"] == 1  # a dynamic per-token loop in every decode iteration
    # lowering: one StableHLO while per jaxpr loop, plus the CPU lowering's rolled threefry loops (2)
    count = decode_step.stablehlo_while_count(traced.lower().as_text())
    assert count["expanded"] == len(loops) + 2


def test_seam_removes_exactly_the_kv_write_loops(tiny):
    setup, config, _ = tiny
    with decode_seam.kv_update_swapped("scatter"):
        loops, _ = _trace_loops(setup, config)
    expected = Counter(EXPECTED)
    del expected[("kv_cache.py", "kv_update_unified_prefix")]
    assert Counter(r["key"] for r in loops) == expected
    # and the swap is undone
    assert decode_seam.check_kv_update_seam()[1] is decode_seam.original_kv_update()


@pytest.mark.parametrize("dedupe", [True, False])
def test_scatter_writes_what_the_loop_writes(dedupe):
    import jax.numpy as jnp

    module, original = decode_seam.check_kv_update_seam()
    replacement = decode_seam.make_kv_update_scatter(module, dedupe=dedupe)
    rng = np.random.default_rng(0)
    pages, slots, heads, dim, n = 5, 4, 2, 3, 12
    for trial in range(40):
        kv = rng.standard_normal((pages, slots, 2 * heads, dim)).astype(np.float32)
        if dedupe:  # any destinations: invalid (clamped), negative (wrapped), duplicates (last write wins)
            t_pages = rng.integers(-pages, pages + 2, n).astype(np.int32)
            t_slots = rng.integers(-slots, slots + 2, n).astype(np.int32)
            invalid = rng.random(n) < 0.2
            t_pages[invalid], t_slots[invalid] = 2_000_000, 2_000_000
        else:  # the engine's case: the first K destinations are valid and distinct
            flat = rng.permutation(pages * slots)[:n]
            t_pages, t_slots = (flat // slots).astype(np.int32), (flat % slots).astype(np.int32)
        new_k = rng.standard_normal((n, heads, dim)).astype(np.float32)
        new_v = rng.standard_normal((n, heads, dim)).astype(np.float32)
        k = jnp.int32(rng.integers(0, n + 1))
        want = original(jnp.asarray(kv), t_pages, t_slots, new_k, new_v, k)
        got = replacement(jnp.asarray(kv), t_pages, t_slots, new_k, new_v, k)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"trial {trial}")


def test_seam_fails_loudly_when_levanter_moves(monkeypatch):
    import importlib.metadata

    from levanter.layers import kv_cache

    real_version = importlib.metadata.version

    monkeypatch.setattr(importlib.metadata, "version", lambda d: "9.9" if d == "levanter" else real_version(d))
    with pytest.raises(decode_seam.DecodeSeamError, match="not the pinned"):
        decode_seam.check_kv_update_seam()
    monkeypatch.setattr(importlib.metadata, "version", real_version)

    def moved(kv_pages, t_pages, t_slots, new_k, new_v, K):
        return kv_pages

    moved.__module__ = kv_cache.__name__
    monkeypatch.setattr(kv_cache, "kv_update_unified_prefix", moved)
    with pytest.raises(decode_seam.DecodeSeamError, match="source changed"):
        decode_seam.check_kv_update_seam()
    monkeypatch.setattr(kv_cache, "kv_update_unified_prefix", lambda kv_pages, pages: kv_pages)
    with pytest.raises(decode_seam.DecodeSeamError, match="comes from|signature"):
        decode_seam.check_kv_update_seam()
