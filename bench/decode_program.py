"""The decode-program report: serial loop trips and executed ops of one decode iteration, with and without the
decode-step seam (``levanter_multihost.seams.decode_step``), for several batch sizes.

    # Llama-3-8B shapes, abstract weights (nothing allocated), partitioned as on a v5p host's 4 chips
    XLA_FLAGS=--xla_force_host_platform_device_count=4 uv run python bench/decode_program.py --shape llama8b \\
        --batch 64 --json
    # the table for docs/benchmarks.md: B = 1, 64, 256, 1024, both variants (~6 min on 2 cores)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 uv run python bench/decode_program.py --shape llama8b \\
        --batch 1,64,256,1024 --seams off,on --out bench/results/decode_program.json
    # the tiny model, its real weights
    uv run python bench/decode_program.py --shape tiny --batch 1,64,256 --seams off,on

    # --time: measured, not predicted, on the default backend (decode_timing.py): random weights on ONE device
    uv run python bench/decode_program.py --shape tiny --time --batch 4,16 --seams off,on   # CPU, ~1-2 min
    # one GPU (8B bf16: 16 GB), with a Python whose jax has CUDA and this project's other dependencies
    PYTHONPATH=src python bench/decode_program.py --shape llama8b --time \\
        --batch 64,16 --seams off,on --new_tokens 16 --repeats 1 --deadline_s 280

For each variant and B: an engine of B slots (``max_seqs`` = ``max_tokens_per_round`` = B, pages for B sequences of
``--context`` tokens), Levanter's decode program (``_run_generation_loop``) traced, lowered and compiled. Per decode
iteration (one trip of its outer loop):

- ``serial_loop_trips``: loop bodies run inside one iteration, every nested while/scan found in the jaxpr and
  named by the Levanter line that made it (``decode_loops.KNOWN_LOOPS``; an unknown loop makes it null), times its
  trip count at B sequences of ``--context`` tokens in steady decoding (no sequence finishing). The reference
  ragged-attention loops are left out: on TPU the Pallas kernel replaces them.
- ``executed_ops``: HLO instructions of the compiled program run in one iteration: the outer loop's body, a
  fusion or kernel counted once, a nested loop's body times its trip count (XLA's when it knows it, else the
  same steady-state count), a conditional at its costliest branch; the reference attention counted as one kernel.
- ``slope_*``: the change per extra sequence from the previous B.
- ``predicted_tpu_step_ms``: the HBM-bound step of the v5p host (``capacity.hbm``) plus serial_loop_trips ×
  ``--trip_us`` (13.9 µs by default: the seed's measured step, 36 ms at B = 64, less its 2.28 ms bound, over
  the 2,432 trips this report counts for Levanter's own step there).

``--time`` builds the shape's model with random weights (its compute dtype) on the first device and, per variant,
one engine with slots for the largest B (as the sampler sizes one engine for all its batches): a first ``generate``
compiles (``engines[*].compile_s``), then for each B, B random prompts of each ``--context`` (default 32,288 for
llama8b, 8,24 for tiny; the later ones at the smallest B only) decode exactly ``--new_tokens`` each (no stop tokens,
no EOS), ``--repeats`` times (the fastest kept). ``step_ms`` is the decode phase (from ``generate``'s first decode
round to its return, prefill excluded) over its iterations, ``tok_s`` = B / step; with the loop trips per iteration
as above (``serial_loop_trips``: the bookkeeping the seam removes; ``attention_loop_trips``: off TPU, Levanter's
reference attention loops per sequence, query token and 2-page KV block). ``seam_savings``: per B, off minus on, and
that per loop trip removed; ``attention_estimate`` (off TPU): one more KV block's trips between two contexts priced,
the attention loops' share of each step estimated. The JSON report goes to stdout, and after every B to ``--out`` or
``$OUT/decode_time_<shape>.json``; ``--deadline_s`` starts no engine (run) that the last one's time says would end
past it.
"""

import os

# 4 CPU devices stand in for a v5p host's 4 chips (the 8B shape is partitioned over them), set before JAX loads
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("EQX_ON_ERROR", "nan")  # as the sampler runs: Equinox's checks as NaN, no host callbacks
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import dataclasses
import itertools
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_loops import classify_hlo_while, jaxpr_loops, loop_table, steady_trips
from decode_model import engine_for

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama8b": (REPO / "config/sampler/llama8b_v5p32_256x2048.yaml", 1088, ["--trainer.model_axis_size=4"]),
    "tiny": (REPO / "config/sampler/tiny_local.yaml", 24, ["--trainer.model_axis_size=1"]),
}
"""Shape -> (sampler config, default context tokens, overrides). 1,088: the seed job's mean context."""
TIME_CONTEXTS = {"llama8b": [32, 288], "tiny": [8, 24]}
"""--time's default contexts: off TPU the reference attention loops per prompt token in prefill, so 1,088 would
take minutes; 1 and 2 KV blocks of the reference attention (2 pages each) in decode."""
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "copy-start", "copy-done"}
ANCHOR_TRIPS = 2432
SEED_STEP_MS, SEED_BOUND_MS = 36.0, 2.28


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", default="1,64,256,1024", help="Comma-separated sequences per decode iteration.")
    parser.add_argument("--seams", default="on", help="on (the sampler's step), off (Levanter's own), or off,on.")
    parser.add_argument(
        "--context", default=None, help="Context tokens per sequence (default per shape); --time: a comma list."
    )
    parser.add_argument("--time", action="store_true", help="Measure the decode step on this backend instead.")
    parser.add_argument("--new_tokens", type=int, default=64, help="--time: tokens each sequence decodes.")
    parser.add_argument("--repeats", type=int, default=3, help="--time: timed runs per context (the fastest kept).")
    parser.add_argument(
        "--deadline_s", type=float, default=None, help="--time: start no engine or context after this many seconds."
    )
    parser.add_argument("--trip_us", type=float, default=(SEED_STEP_MS - SEED_BOUND_MS) * 1e3 / ANCHOR_TRIPS)
    parser.add_argument("--no_compile", action="store_true", help="Loops only: no executed_ops.")
    parser.add_argument("--json", action="store_true", help="Print the JSON report on stdout.")
    parser.add_argument("--out", default=None, help="Also write the JSON report here.")
    args = parser.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.seams = [s for s in args.seams.split(",") if s]
    args.context = [int(x) for x in args.context.split(",") if x] if args.context else []
    if len(args.context) > 1 and not args.time:
        parser.error(f"--context {','.join(map(str, args.context))}: one context without --time; give one value")
    if args.time and (args.new_tokens < 2 or args.repeats < 1):
        parser.error(f"--new_tokens {args.new_tokens} --repeats {args.repeats}: --time needs >= 2 and >= 1")
    return args


def hlo_computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    comps: dict[str, list[str]] = {}
    current, entry = None, None
    for line in text.splitlines():
        m = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if m:
            current, comps[m.group(2)] = m.group(2), []
            entry = m.group(2) if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and "=" in line:
            comps[current].append(line)
    return comps, entry


def executed_ops(hlo: str, trips_of) -> int | None:
    """HLO instructions run by one trip of the outer decode loop; ``trips_of(class, depth)`` gives a nested
    loop's trips when XLA does not know them."""
    comps, _ = hlo_computations(hlo)

    def opcode(line: str) -> str:
        m = re.search(r"= \S+ ([\w\-]+)\(", line) or re.search(r"= \([^)]*\) ([\w\-]+)\(", line)
        return m.group(1) if m else "?"

    def called(line: str, key: str) -> str | None:
        m = re.search(key + r"=%([\w.\-]+)", line)
        return m.group(1) if m else None

    def count(comp: str, depth: int) -> float:
        total = 0.0
        for line in comps.get(comp, []):
            op = opcode(line)
            if op in FREE_OPS:
                continue
            if op == "while":
                name = re.search(r'op_name="([^"]*)"', line)
                cls = classify_hlo_while(name.group(1) if name else "")
                if cls == "reference ragged attention":
                    total += 1  # the Pallas kernel on TPU
                    continue
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                trips = int(known.group(1)) if known else trips_of(cls, depth + 1)
                body = count(called(line, "body"), depth + 1) + count(called(line, "condition"), depth + 1)
                total += 1 + trips * body
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = (
                    [b.strip().lstrip("%") for b in branches.group(1).split(",")]
                    if branches
                    else [called(line, "true_computation"), called(line, "false_computation")]
                )
                total += 1 + max(count(n, depth) for n in names if n)
            elif op == "call":
                total += count(called(line, "to_apply"), depth)
            else:
                total += 1
        return total

    for lines in comps.values():
        for line in lines:
            if " while(" in line and 'op_name="jit(_run_generation_loop)/while"' in line:
                return round(count(called(line, "body"), 0) + count(called(line, "condition"), 0))
    return None


def one(setup_cls, config, args, seam: bool, B: int, context: int) -> dict:
    import jax
    from levanter.inference import engine as engine_module

    from levanter_multihost import capacity_inputs
    from levanter_multihost.capacity import hbm
    from levanter_multihost.capacity.tpu import parse_tpu_type
    from levanter_multihost.seams import decode_step

    (decode_step.install if seam else decode_step.uninstall)()
    c = engine_for(config, B, context)
    setup = setup_cls(dataclasses.replace(config, engine=c), args)
    gen_state, _ = setup.gen_state_for_tracing()
    t0 = time.perf_counter()
    traced = engine_module._run_generation_loop.trace(gen_state, setup.model, setup.sampler, B, 1)
    loops = jaxpr_loops(traced.jaxpr)
    cfg = {"page_size": c.page_size, "max_seqs": c.max_seqs, "T": B}
    table = loop_table(loops, B, context, cfg)
    inner = [r for r in table if not r.get("total") and r["depth"] > 0]
    steady = steady_trips(table)
    trips = steady["serial_loop_trips"]
    row = {
        "seams": "on" if seam else "off",
        "B": B,
        "context": context,
        "serial_loop_trips": trips,
        "loops": {r["loop"].strip(): r["body_runs_per_step"] for r in inner},
        "unknown_loops": steady["unknown_loops"],
    }
    if not args.no_compile:

        def trips_of(cls: str, depth: int) -> float:
            if cls in ("kv_update_unified_prefix", "update_tokens"):
                return B
            if cls.startswith("allocate_for_seq"):
                return B if depth == 1 else 1 / c.page_size
            return 0  # free_pages' per-page loop: finished slots only

        row["executed_ops"] = executed_ops(traced.lower().compile().as_text(), trips_of)
    row["trace_to_report_s"] = round(time.perf_counter() - t0, 1)
    bound = None
    if config.tpu_type:  # the HBM bound of one host of the config's slice
        limits = capacity_inputs.engine_limits(c)
        shape = capacity_inputs.model_shape(config.hf_checkpoint.model_name_or_path, config.trainer, limits)
        bound = hbm.step_seconds_bound(shape, parse_tpu_type(config.tpu_type), B, context)
    if bound is not None and trips is not None:
        row["hbm_bound_step_ms"] = round(bound * 1e3, 3)
        row["predicted_tpu_step_ms"] = round(bound * 1e3 + trips * args.trip_us / 1e3, 3)
        row["predicted_tok_s_per_host"] = round(B / (row["predicted_tpu_step_ms"] / 1e3))
    jax.clear_caches()
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    import draccus
    from decode_model import Setup

    from levanter_multihost import model_loading
    from levanter_multihost.config import SampleLmMultihostConfig

    path, default_context, overrides = SHAPES[args.shape]
    config = draccus.parse(SampleLmMultihostConfig, config_path=str(path), args=overrides)
    if args.time:
        from decode_timing import timing_report

        args.loops_only, args.random_weights = False, True  # what decode_model.Setup reads: random weights
        report = timing_report(Setup, config, args, args.context or TIME_CONTEXTS[args.shape])
        report.update(shape=args.shape, config=str(path.relative_to(REPO)))
        print(json.dumps(report, indent=1))
        return report
    context = args.context[0] if args.context else default_context
    args.loops_only, args.random_weights = True, False  # what decode_model.Setup reads: abstract 8B weights
    rows = []
    with model_loading.on_local_mesh(config.trainer):
        for seam in args.seams:
            for B in args.batch:
                rows.append(one(Setup, config, args, seam == "on", B, context))
                print(json.dumps(rows[-1]), file=sys.stderr)
    for seam in args.seams:
        mine = [r for r in rows if r["seams"] == seam]
        for prev, r in itertools.pairwise(mine):
            for key in ("serial_loop_trips", "executed_ops"):
                if r.get(key) is not None and prev.get(key) is not None:
                    r[f"slope_{key}"] = round((r[key] - prev[key]) / (r["B"] - prev["B"]), 3)
    report = {
        "shape": args.shape,
        "config": str(path.relative_to(REPO)),
        "context": context,
        "trip_us": round(args.trip_us, 2),
        "rows": rows,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    return report


if __name__ == "__main__":
    main()
