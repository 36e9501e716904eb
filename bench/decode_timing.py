"""Measured decode-step time on the default backend: ``bench/decode_program.py --time`` (which see for how to run).

One device (model axis 1), the shape's model with random weights in its compute dtype (bf16 for Llama-3-8B: 16 GB),
and per variant one engine, built with the decode-step seam installed or not, its slots for the largest B. A first
``generate`` of 1-token prompts compiles prefill and decode; then, per B and context, B prompts of random token ids,
each decoding exactly ``--new_tokens`` tokens (no stop tokens; the engine ends a sequence only at its
``max_num_tokens``, never at EOS). The engine samples the first new token in prefill; the clock of the decode phase
starts at ``generate``'s first decode round (its step callback, after prefill has been read back) and ends when
``generate`` returns, over ``new_tokens - 1`` decode iterations of all B sequences.

Attention off TPU: Levanter's ``default_ragged_paged_attention`` (its Pallas kernel is TPU only), three nested
``fori_loop``s per layer — per sequence, per query token, per 2-page KV block — so on a GPU it adds serial loop
trips of its own, in prefill (per prompt token) as in decode; ``attention_loop_trips`` counts them per decode
iteration, ``serial_loop_trips`` the bookkeeping loops the seam removes (both as ``decode_program`` counts them).
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

WARMUP_PROMPT, WARMUP_NEW = 1, 2
"""The compiling call: 1-token prompts, 2 new tokens (one from prefill, one decode iteration)."""


@contextlib.contextmanager
def one_device_mesh(trainer):
    """A (replica, data, model) mesh of this process's first device, with the trainer's axis mapping current."""
    import haliax as hax
    import jax
    import numpy as np
    from haliax.partitioning import ResourceAxis
    from jax.sharding import Mesh

    mesh = Mesh(
        np.array(jax.local_devices()[:1]).reshape(1, 1, 1),
        (ResourceAxis.REPLICA, ResourceAxis.DATA, ResourceAxis.MODEL),
    )
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(trainer.compute_axis_mapping):
        yield


def requests_for(B: int, prompt_tokens: int, new_tokens: int, vocab: int, seed: int):
    """B requests of random prompt ids that decode exactly ``new_tokens`` tokens each (no stop tokens)."""
    import jax
    import numpy as np
    from levanter.inference.engine import Request
    from levanter.inference.jit_scheduler import SeqDecodingParams

    rng = np.random.default_rng(seed)
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(seed), B))
    out = []
    for i in range(B):
        params = SeqDecodingParams(np.int32(prompt_tokens + new_tokens), None, np.float32(0.7), keys[i])
        out.append(Request(rng.integers(0, vocab, prompt_tokens).tolist(), i, params, 1, False))
    return out


def timed_generate(engine, requests, compile_clock) -> dict:
    """Run ``generate``; seconds of prefill (to its first decode round) and of decode, tokens per sequence."""
    marks = []

    def on_round(iteration: int) -> None:
        if iteration == 0:  # prefill's tokens read back, the first decode round not yet dispatched
            marks.append(time.perf_counter())

    start, compiled = time.perf_counter(), compile_clock()
    result = engine.generate(requests, step_callback=on_round)
    end = time.perf_counter()
    decode_start = marks[0] if marks else end
    lengths = [len(t) for t in result.tokens]
    return {
        "prefill_s": decode_start - start,
        "decode_s": end - decode_start,
        "total_s": end - start,
        "compile_s": compile_clock() - compiled,
        "tokens_per_sequence": [min(lengths), max(lengths)],
    }


def prefill_attention_trips(layers: int, B: int, context: int, page_size: int) -> int:
    """Loop trips of the reference attention in one prefill of B prompts of ``context`` tokens: per layer, per
    sequence 1, per query token 1 and one per 2-page KV block of the whole prompt (it skips no causal block)."""
    return layers * B * (1 + context * (1 + math.ceil(context / (2 * page_size))))


def measure(setup, engine_config, seam: bool, runs: list[tuple[int, int]], args, deadline, publish) -> dict:
    """One engine, Levanter's decode step or the seam's: its compiling call, then every (B, context) run, a row per
    B handed to ``publish`` as it completes. Returns the engine's compile record."""
    from decode_loops import jaxpr_loops, loop_table, steady_trips
    from levanter.inference.engine import InferenceEngine
    from levanter.inference.engine import _run_generation_loop as decode_program

    from levanter_multihost.runtime import CompileClock
    from levanter_multihost.seams import decode_step

    (decode_step.install if seam else decode_step.uninstall)()
    c = engine_config
    engine = InferenceEngine.from_model_with_config(model=setup.model, tokenizer=None, config=c)
    T = c.imputed_max_tokens_per_round
    cfg = {"page_size": c.page_size, "max_seqs": c.max_seqs, "T": T}
    loops = jaxpr_loops(decode_program.trace(engine.gen_state, setup.model, setup.sampler, T, 1).jaxpr)
    vocab, layers = setup.model.Vocab.size, setup.model.config.num_layers
    first = timed_generate(
        engine, requests_for(c.max_seqs, WARMUP_PROMPT, WARMUP_NEW, vocab, 0), CompileClock.seconds
    )
    record = {"seams": "on" if seam else "off", "first_call_s": round(first["total_s"], 2)}
    record["compile_s"] = round(first["compile_s"], 2)
    row, last = None, None
    for B, context in runs:
        prefill_trips = prefill_attention_trips(layers, B, context, c.page_size)
        need_s = 0.0
        if last is not None:  # the last run, its decode scaled by B and its prefill by the loop trips
            prefill_s = last["prefill_s"] * prefill_trips / last["prefill_attention_loop_trips"]
            need_s = args.repeats * (last["decode_s"] * max(1.0, B / row["B"]) + prefill_s)
        if deadline(need_s):
            record.setdefault("skipped_for_deadline", []).append({"B": B, "context": context})
            continue
        if row is None or row["B"] != B:
            if row is not None:
                publish(row)
            row = {"seams": record["seams"], "B": B, "contexts": []}
        # steady state: every loop as at B sequences of this context (attention at the decode's mean length)
        trips = steady_trips(loop_table(loops, B, context + args.new_tokens // 2, cfg))
        requests = requests_for(B, context, args.new_tokens, vocab, 1)
        run = min(
            (timed_generate(engine, requests, CompileClock.seconds) for _ in range(args.repeats)),
            key=lambda r: r["decode_s"],
        )
        iterations = run["tokens_per_sequence"][1] - 1  # the first new token comes from prefill
        step_s = run["decode_s"] / iterations
        last = {
            "context": context,
            "step_ms": round(step_s * 1e3, 3),
            "tok_s": round(B / step_s, 1),
            "decode_iterations": iterations,
            "decode_s": round(run["decode_s"], 3),
            "prefill_s": round(run["prefill_s"], 3),
            "compile_s_during_timed_call": round(run["compile_s"], 3),  # 0 unless a shape recompiled
            "tokens_per_sequence": run["tokens_per_sequence"],
            "serial_loop_trips": trips["serial_loop_trips"],
            "attention_loop_trips": trips["attention_loop_trips"],
            "prefill_attention_loop_trips": prefill_trips,
        }
        row["contexts"].append(last)
    if row is not None:
        publish(row)
    return record


def attention_estimates(rows: list[dict]) -> dict:
    """Per variant, from its row timed at two contexts whose decode differs in reference-attention trips (one
    more KV block per sequence and layer): the measured cost of one such trip, and per timed context the
    attention loops' estimated share of the step (off TPU only: the Pallas kernel there has no loop)."""
    out = {}
    for seam in ("off", "on"):
        row = next((r for r in rows if r["seams"] == seam and len(r["contexts"]) > 1), None)
        if row is None:
            continue
        a, b = row["contexts"][0], row["contexts"][-1]
        extra = (b["attention_loop_trips"] or 0) - (a["attention_loop_trips"] or 0)
        if extra <= 0:
            continue
        us = (b["step_ms"] - a["step_ms"]) * 1e3 / extra
        out[seam] = {"B": row["B"], "contexts": [a["context"], b["context"]], "us_per_attention_trip": round(us, 2)}
        for r in rows:
            for x in r["contexts"] if r["seams"] == seam else []:
                if x["attention_loop_trips"] is None:  # a loop decode_loops does not know
                    continue
                attention_ms = x["attention_loop_trips"] * us / 1e3
                x["attention_loops_ms_est"] = round(attention_ms, 3)
                x["step_ms_less_attention_est"] = round(x["step_ms"] - attention_ms, 3)
    return out


def bookkeeping_deltas(rows: list[dict]) -> list[dict]:
    """Per (B, context) measured with both variants: what the seam saves per decode iteration, and per loop trip
    removed (the GPU's cost of one serial loop trip, to set against ``decode_program``'s --trip_us on TPU)."""
    out = []
    for off in (r for r in rows if r["seams"] == "off"):
        on = next((r for r in rows if r["seams"] == "on" and r["B"] == off["B"]), None)
        for a in off["contexts"]:
            b = next((x for x in (on or {}).get("contexts", []) if x["context"] == a["context"]), None)
            if b is None:
                continue
            saved_ms = a["step_ms"] - b["step_ms"]
            trips = (a["serial_loop_trips"] or 0) - (b["serial_loop_trips"] or 0)
            out.append(
                {
                    "B": off["B"],
                    "context": a["context"],
                    "step_ms_off": a["step_ms"],
                    "step_ms_on": b["step_ms"],
                    "saved_ms": round(saved_ms, 3),
                    "speedup": round(a["step_ms"] / b["step_ms"], 3),
                    "loop_trips_removed": trips,
                    "us_per_trip_removed": round(saved_ms * 1e3 / trips, 2) if trips > 0 else None,
                }
            )
    return out


def timing_report(setup_cls, config, args, contexts: list[int]) -> dict:
    """Build the model once, measure every variant's runs in order, and write the report after each B's row."""
    import jax
    from decode_model import engine_for

    from levanter_multihost.runtime import CompileClock

    started = time.monotonic()

    def deadline(need_s: float = 0.0) -> bool:
        """Whether ``need_s`` more seconds would run past ``--deadline_s``."""
        return args.deadline_s is not None and time.monotonic() - started + need_s > args.deadline_s

    CompileClock.install()
    trainer = dataclasses.replace(config.trainer, model_axis_size=1)
    # the later contexts at the smallest B only: the reference attention's prefill grows as B x context^2
    runs = [(B, x) for B in args.batch for x in (contexts if B == min(args.batch) else contexts[:1])]
    # one engine per variant, its slots for the largest B (as the sampler sizes one engine for all its batches),
    # every run's prompts in one prefill so that decoding starts with all B sequences
    c = engine_for(config, max(args.batch), max(contexts) + args.new_tokens)
    c = dataclasses.replace(c, max_prefill_size=max(c.max_prefill_size or 0, *(B * x for B, x in runs)))
    device = jax.local_devices()[0]
    report = {
        "mode": "time",
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "new_tokens": args.new_tokens,
        "attention": (
            "Pallas ragged paged attention (TPU)"
            if jax.default_backend() == "tpu"
            else "Levanter's reference ragged paged attention: fori_loops per sequence, query token, KV block"
        ),
        "engine": {
            k: getattr(c, k) for k in ("max_seqs", "max_pages", "page_size", "max_rounds", "max_prefill_size")
        },
        "engines": [],
        "rows": [],
    }
    out = Path(args.out) if args.out else None
    if out is None and os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / f"decode_time_{args.shape}.json"
    with one_device_mesh(trainer):
        t0 = time.perf_counter()
        setup = setup_cls(dataclasses.replace(config, trainer=trainer), args)
        report["model"] = setup.source
        report["model_build_s"] = round(time.perf_counter() - t0, 1)

        def publish(row=None) -> None:
            if row is not None:
                report["rows"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            report["seam_savings"] = bookkeeping_deltas(report["rows"])
            if report["backend"] != "tpu":
                report["attention_estimate"] = attention_estimates(report["rows"])
            report["elapsed_s"] = round(time.monotonic() - started, 1)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=1) + "\n")

        engine_s = 0.0
        for seam in args.seams:
            if deadline(engine_s):  # as long as the last engine took
                report["engines"].append({"seams": seam, "skipped_for_deadline": True})
                publish()
                continue
            engine_started = time.monotonic()
            report["engines"].append(measure(setup, c, seam == "on", runs, args, deadline, publish))
            engine_s = time.monotonic() - engine_started
            publish()
    return report
