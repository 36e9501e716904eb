"""Timing for ``bench/decode_step.py``: decode calls on a fresh engine per batch size, the KV write alone, identity.

Every timed call runs to ``block_until_ready``; variants (the seams of ``bench/decode_seam.py``) alternate inside
each repeat, so other users' load on the machine falls on all of them alike.
"""

import dataclasses
import hashlib
import os
import statistics
import time
from pathlib import Path

from _common import REPO


def prompt_token_ids(setup, config, n: int, prompt_len: int) -> list[list[int]]:
    """``n`` prompts: the config's prompts file (tokenized as the sampler does, cycled) or random tokens."""
    import numpy as np

    if setup.tokenizer is not None and config.prompts_file:
        path = config.prompts_file if os.path.isabs(config.prompts_file) else str(REPO / config.prompts_file)
        texts = [line for line in Path(path).read_text().splitlines() if line.strip()]
        ids = [list(t) for t in setup.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [ids[i % len(ids)] for i in range(n)]
    rng = np.random.default_rng(0)
    vocab = setup.model.Vocab.size
    return [rng.integers(3, vocab, prompt_len).tolist() for _ in range(n)]


def make_requests(prompts: list[list[int]], max_num_tokens: int, temperature: float = 0.0):
    import jax
    import jax.numpy as jnp
    from levanter.inference.engine import Request
    from levanter.inference.jit_scheduler import SeqDecodingParams

    return [
        Request(
            prompt_tokens=list(p),
            request_id=i,
            decode_params=SeqDecodingParams(
                max_num_tokens=jnp.array(max_num_tokens, dtype=jnp.int32),
                stop_tokens=None,
                temperature=jnp.array(temperature, dtype=jnp.float32),
                key=jax.random.fold_in(jax.random.PRNGKey(0), i),
            ),
            n_generations=1,
        )
        for i, p in enumerate(prompts)
    ]


def admit(setup, prompts: list[list[int]]):
    """A fresh engine with ``prompts`` admitted (one prefill); every prompt must fit in one admission."""
    import jax

    engine = setup.fresh_engine()
    engine.enqueue_requests(make_requests(prompts, setup.engine_config.max_seq_len))
    engine._admit_from_queue()
    if engine.request_queue:
        raise SystemExit(
            f"{len(engine.request_queue)} of {len(prompts)} prompts did not fit in one admission: raise "
            "engine.max_seqs / max_seqs_in_prefill / max_prefill_size / max_pages, or lower the batch size."
        )
    jax.block_until_ready(engine.gen_state)
    return engine


def timed_call(compiled, engine, setup):
    import jax

    cpu = time.process_time()
    start = time.perf_counter()
    state, outputs = compiled(engine.gen_state, setup.model, setup.sampler)
    jax.block_until_ready((state, outputs))
    seconds = time.perf_counter() - start
    engine.gen_state = state
    return seconds, time.process_time() - cpu, outputs


def digest(*trees) -> str:
    import jax
    import numpy as np

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(trees)):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def run_once(setup, compiled_r, compiled_1, prompts, rounds: int) -> dict:
    """Fresh engine, ``prompts`` admitted, then one call of ``rounds`` decode iterations and one of 1: seconds,
    and a digest of what they decoded and of the KV cache after them."""
    import jax

    B = len(prompts)
    engine = admit(setup, prompts)
    t_r, cpu_r, out_r = timed_call(compiled_r, engine, setup)
    t_1, cpu_1, out_1 = timed_call(compiled_1, engine, setup)
    got = int(jax.device_get(out_r.num_tokens))
    if got != B * rounds:
        raise SystemExit(f"B={B}: the {rounds}-round call decoded {got} tokens, not B x R = {B * rounds}")
    if int(jax.device_get(out_1.num_tokens)) != B:
        raise SystemExit(f"B={B}: the 1-round call did not decode B tokens")
    d = digest(out_r.tokens, out_r.slot_ids, out_1.tokens, engine.gen_state.cache)
    return {"R": t_r, "1": t_1, "cpu_R": cpu_r, "cpu_1": cpu_1, "digest": d}


def time_all(setup, programs: dict, prompts_all, args) -> dict:
    """Every (batch size, variant), repeated; within a repeat the variants alternate (order rotated) so that
    other users' load on the machine falls on all of them alike. Returns rows per variant."""
    import numpy as np

    R = args.rounds
    names = list(programs)
    samples = {(v, B): [] for v in names for B in args.batch_sizes}
    for rep in range(args.warmup + args.repeats):
        for B in args.batch_sizes:
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for v in order:
                run = run_once(setup, programs[v]["R"], programs[v]["1"], prompts_all[:B], R)
                run["warmup"] = rep < args.warmup
                samples[(v, B)].append(run)
        print(f"repeat {rep + 1}/{args.warmup + args.repeats} done" + (" (warm-up)" if rep < args.warmup else ""))
    rows: dict[str, list] = {v: [] for v in names}
    base = names[0]
    for B in args.batch_sizes:
        for v in names:
            runs = [r for r in samples[(v, B)] if not r["warmup"]]
            base_runs = [r for r in samples[(base, B)] if not r["warmup"]]
            times_r, times_1 = [r["R"] for r in runs], [r["1"] for r in runs]
            med_r, med_1 = statistics.median(times_r), statistics.median(times_1)
            step = med_r / R
            slope = (med_r - med_1) / (R - 1) if R > 1 else None
            cpu_r = statistics.median(r["cpu_R"] for r in runs)
            digests = {r["digest"] for r in samples[(v, B)]}
            rows[v].append(
                {
                    "B": B,
                    "rounds": R,
                    "call_R_s": times_r,
                    "call_1_s": times_1,
                    "step_s": step,
                    # other users' load only ever adds time: the fastest repeat is the least disturbed one
                    "step_min_s": min(times_r) / R,
                    "min_ratio_vs_base": min(times_r) / min(r["R"] for r in base_runs),
                    "slope_step_s": slope,
                    "per_call_s": med_1 - slope if slope is not None else None,
                    "tokens_per_s": B / step,
                    "tokens_per_s_slope": B / slope if slope else None,
                    "cv_R": float(np.std(times_r) / np.mean(times_r)) if len(times_r) > 1 else None,
                    # CPU seconds of this process (all its threads) per decode iteration: hardly moved by other
                    # users' load, unlike the wall clock
                    "cpu_R_s": [r["cpu_R"] for r in runs],
                    "cpu_step_s": cpu_r / R,
                    "cpu_ratio_vs_base": statistics.median(a["cpu_R"] / b["cpu_R"] for a, b in zip(runs, base_runs)),
                    # within-repeat ratio to the baseline (same repeat, same B, adjacent in time), median
                    "step_ratio_vs_base": statistics.median(a["R"] / b["R"] for a, b in zip(runs, base_runs)),
                    "digest": samples[(v, B)][-1]["digest"],
                    "digests_stable": len(digests) == 1,
                    "decode_identical_to_base": digests == {r["digest"] for r in samples[(base, B)]},
                }
            )
    return rows


def micro_kv_update(setup, args) -> list[dict]:
    """The replaced function alone, on one layer's KV-cache shape: Levanter's per-token loop vs the scatter
    variants, for K = each batch size (distinct destinations, as in decode). The buffer is donated and fed
    back; 50 back-to-back calls per sample, median of 7 samples, variants alternating."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from decode_seam import VARIANTS, check_kv_update_seam, make_kv_update_scatter

    module, original = check_kv_update_seam()
    c = setup.engine_config
    layer_cache = jax.tree.leaves(setup.fresh_engine().gen_state.cache)[0]
    num_pages, page_size, two_h, dim = layer_cache.shape
    T = c.imputed_max_tokens_per_round
    fns = {"none": original, **{v: make_kv_update_scatter(module, dedupe=d) for v, d in VARIANTS.items()}}
    rng = np.random.default_rng(0)
    rows = []
    for K in args.batch_sizes:
        flat = rng.permutation(num_pages * page_size)[:T]
        t_pages, t_slots = jnp.asarray(flat // page_size, jnp.int32), jnp.asarray(flat % page_size, jnp.int32)
        new_k = jnp.asarray(rng.standard_normal((T, two_h // 2, dim)), layer_cache.dtype)
        new_v = jnp.asarray(rng.standard_normal((T, two_h // 2, dim)), layer_cache.dtype)
        bufs = {name: jnp.zeros(layer_cache.shape, layer_cache.dtype) for name in fns}
        samples = {name: [] for name in fns}
        k = jnp.int32(K)
        for rep in range(8):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(50):
                    bufs[name] = fn(bufs[name], t_pages, t_slots, new_k, new_v, k)
                jax.block_until_ready(bufs[name])
                if rep > 0:
                    samples[name].append((time.perf_counter() - start) / 50)
        same = all(np.array_equal(np.asarray(bufs["none"]), np.asarray(b)) for b in bufs.values())
        row = {"K": K, "identical": same}
        for name, ts in samples.items():
            row[f"{name}_us"] = statistics.median(ts) * 1e6
        for name in fns:
            row[f"{name}_ratio"] = row[f"{name}_us"] / row["none_us"]
        rows.append(row)
    return rows


def generate_tokens(setup, prompts, new_tokens: int, temperature: float = 0.0) -> list[list[int]]:
    """``InferenceEngine.generate`` on a fresh engine: the token ids of every sequence."""
    engine = setup.fresh_engine()
    max_tokens = [len(p) + new_tokens for p in prompts]
    requests = make_requests(prompts, 0, temperature)
    import jax.numpy as jnp

    requests = [
        dataclasses.replace(
            r, decode_params=dataclasses.replace(r.decode_params, max_num_tokens=jnp.array(m, dtype=jnp.int32))
        )
        for r, m in zip(requests, max_tokens)
    ]
    result = engine.generate(requests)
    return [list(map(int, t)) for t in result.tokens]
