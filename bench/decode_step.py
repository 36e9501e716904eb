"""Decode-step diagnostics: serial loops in one decode round of Levanter's InferenceEngine, and step time vs batch.

    # tiny model, CPU, ~3 min on 2 cores: loops table, step time at 4 batch sizes with and without the seam,
    # token identity, the KV write alone; JSON to bench/results/decode_step.json (docs/benchmarks.md)
    uv run python bench/decode_step.py --config_path config/sampler/tiny_local.yaml --batch_sizes 1,8,64,256 \\
        --repeats 7 --seams none,scatter,scatter_plain

    # loops only (2-4 min), for a TPU config: Llama-3-8B shapes, abstract weights (nothing is allocated),
    # partitioned as on a v5p host's 4 chips (collectives inside loops are reported)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 uv run python bench/decode_step.py \\
        --config_path config/sampler/llama8b_v5p16_128x2048.yaml --loops_only --seams none,scatter \\
        --table_batch 64 --context 1088 --trainer.model_axis_size=4 --out /tmp/decode_step_llama8b_loops.json

    # any sampler flag after the bench's own flags goes to the config (draccus), e.g. --engine.max_rounds=4;
    # on a TPU host: --random_weights --trainer.model_axis_size=4 --hlo_dir DIR times the 8B config with random
    # weights and keeps the compiled TPU programs

What it does, for the sampler config given (``levanter_multihost.config.SampleLmMultihostConfig``; the model is
loaded as the sampler loads it, ``levanter_multihost.model_loading``, with ``--trainer.model_axis_size=1`` unless
overridden, or built with random weights / abstract shapes when the checkpoint is not a local directory):

1. Loops. Traces ``levanter.inference.engine._run_generation_loop`` (the engine's decode program: up to
   ``max_rounds`` decode iterations of ``max_tokens_per_round`` packed tokens) on a fresh engine's ``gen_state``,
   walks its jaxpr for every ``while``/``scan`` (``lax.fori_loop`` with static bounds becomes a ``scan``), traces
   each to the Levanter source line that made it, and names it from a table of the loops read in Levanter's
   source (an unknown loop is reported as such). Then lowers it (StableHLO ``while`` count, calls expanded) and
   compiles it (XLA ``while`` count, each classified by its ``op_name``, with XLA's known trip count).
2. Step time vs batch size. For each ``B`` in ``--batch_sizes``: a fresh engine, B prompts admitted (one
   prefill), then the compiled decode program called once with ``max_rounds`` = R (``--rounds``, default the
   config's) and once with 1 round, timed to ``block_until_ready``; ``--repeats`` times after ``--warmup``.
   Every round decodes exactly B tokens (no sequence can finish: ``max_num_tokens`` = ``max_seq_len``, no stop
   sequence). Step = median(call of R) / R; slope = (median(R) - median(1)) / (R - 1), the step without the
   per-call cost; also the fastest repeat and this process's CPU seconds. tokens/s = B / step. The variants
   alternate inside each repeat; their ratios are taken within a repeat.
3. The seam (``bench/decode_seam.py``): the same with Levanter's per-token KV-cache write loop swapped for one
   scatter (``--seams none,scatter``; the first is the baseline). Identity: the decode outputs and the KV cache
   after the timed rounds are compared bit for bit with the baseline's, and ``InferenceEngine.generate`` on
   ``--check_prompts`` prompts (greedy, ``--check_new_tokens`` new tokens, crossing page boundaries) must give
   the same token ids (greedy and at ``--check_temperature``). And the replaced function alone, loop vs scatter,
   on one layer's cache shape for K = each batch size.

Findings: docs/benchmarks.md, "Decode step". The code is in four files: this one (command line and report),
``decode_model.py`` (model and engine), ``decode_loops.py`` (the loop inventory), ``decode_timing.py`` (timing and
identity); ``decode_seam.py`` is the fenced KV-write seam. ``tests/test_decode_step.py`` uses ``parse_args_from``,
``load_config``, ``Setup``, ``jaxpr_loops`` and ``stablehlo_while_count`` from here.
"""

import os

# as the sampler does (levanter_multihost.seams.checks_as_nan): Equinox's error_if checks as NaN poisoning, not
# host callbacks, so this measures the program the sampler runs; set before anything imports Levanter
os.environ.setdefault("EQX_ON_ERROR", "nan")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import dataclasses
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, TINY_CONFIG, Report
from decode_loops import analyze_loops, jaxpr_loops, stablehlo_while_count  # noqa: F401 (the test's)
from decode_model import Setup
from decode_timing import generate_tokens, micro_kv_update, prompt_token_ids, time_all


def parse_args():
    return parse_args_from(sys.argv[1:])


def parse_args_from(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_path", default=str(TINY_CONFIG))
    parser.add_argument("--batch_sizes", default="1,8,64,256")
    parser.add_argument("--rounds", type=int, default=None, help="Decode iterations per timed call (max_rounds).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seams", default="none,scatter", help="Variants: none, scatter, scatter_plain.")
    parser.add_argument("--check_prompts", type=int, default=256)
    parser.add_argument("--check_temperature", type=float, default=0.7, help="Also compare sampled tokens.")
    parser.add_argument("--check_new_tokens", type=int, default=None, help="Default: as many as max_seq_len allows.")
    parser.add_argument("--context", type=int, default=None, help="Context length for the per-step loop counts.")
    parser.add_argument("--table_batch", type=int, default=None, help="B for the per-step loop counts.")
    parser.add_argument("--loops_only", action="store_true", help="Part 1 only (no timing, no identity check).")
    parser.add_argument("--no_compile", action="store_true", help="Loops: jaxpr and StableHLO only.")
    parser.add_argument("--random_weights", action="store_true", help="Random weights even for a local checkpoint.")
    parser.add_argument("--prompt_len", type=int, default=8, help="Random-token prompt length (no tokenizer).")
    parser.add_argument("--hlo_dir", default=None, help="Write the StableHLO and compiled HLO texts here.")
    parser.add_argument("--out", default=str(RESULTS / "decode_step.json"))
    args, rest = parser.parse_known_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.seams = [s for s in args.seams.split(",") if s]
    args.config_args = rest
    return args


def load_config(args):
    import draccus

    from levanter_multihost.config import SampleLmMultihostConfig

    config = draccus.parse(
        SampleLmMultihostConfig,
        config_path=args.config_path,
        args=["--trainer.model_axis_size=1", *args.config_args],  # later flags win
    )
    return config


# --------------------------------------------------------------------------------------------------- report --

LOOP_COLUMNS = [
    ("loop", "loop", "{}"),
    ("kind", "kind", "{}"),
    ("copies", "copies", "{}"),
    ("trip_count", "trip count", "{}"),
    ("body_runs_per_step", "body runs/iter", "{:.0f}"),
    ("source", "source", "{}"),
    ("on_tpu", "on TPU", "{}"),
]
MICRO_COLUMNS = [
    ("K", "K", "{}"),
    ("none_us", "loop us", "{:.1f}"),
    ("scatter_us", "scatter us", "{:.1f}"),
    ("scatter_plain_us", "plain us", "{:.1f}"),
    ("scatter_ratio", "scatter/loop", "{:.2f}"),
    ("scatter_plain_ratio", "plain/loop", "{:.2f}"),
    ("identical", "identical", "{}"),
]
HLO_COLUMNS = [
    ("class", "compiled HLO while", "{}"),
    ("count", "count", "{}"),
    ("known_trip_counts", "XLA trip counts", "{}"),
    ("collectives_inside", "collectives inside", "{}"),
]
TIME_COLUMNS = [
    ("B", "B", "{}"),
    ("step_ms", "step ms", "{:.2f}"),
    ("step_min_ms", "min ms", "{:.2f}"),
    ("slope_ms", "slope ms", "{:.2f}"),
    ("per_call_ms", "per call ms", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("cv_R", "cv", "{:.2f}"),
]


def main() -> None:
    args = parse_args()
    config = load_config(args)
    import jax

    from levanter_multihost import model_loading

    report = Report("decode_step", args)
    c = config.engine
    args.rounds = args.rounds or c.max_rounds
    print(f"backend {jax.default_backend()}, {len(jax.devices())} device(s); config {args.config_path}")
    with model_loading.on_local_mesh(config.trainer):
        setup = Setup(config, args)
        layers = setup.model.config.num_layers if hasattr(setup.model, "config") else None
        print(f"model: {setup.source}, {layers} layers; engine: {c}")
        prompts_all, B_table, ctx = workload(setup, config, args)
        variants, programs = {}, {}
        reference_tokens: dict = {}
        for seam in args.seams:
            variants[seam], program = one_variant(
                setup, seam, args, B_table, ctx, prompts_all, reference_tokens, report
            )
            if program is not None:
                programs[seam] = program
        summary, micro = [], None
        if not args.loops_only:
            summary, micro = timing(setup, programs, prompts_all, variants, args, report)
    from decode_seam import PINNED_LEVANTER

    report.write(args.out, backend=jax.default_backend(), levanter_pinned=PINNED_LEVANTER, model=setup.source,
                 engine={f.name: str(getattr(c, f.name)) for f in dataclasses.fields(c)}, variants=variants,
                 summary=summary, kv_update_micro=micro)  # fmt: skip


def workload(setup, config, args):
    """The prompts to time (None for --loops_only), and the B and context of the loop table."""
    c = config.engine
    T = c.imputed_max_tokens_per_round
    if args.loops_only:
        return None, args.table_batch or min(c.max_seqs, T), args.context or c.max_seq_len // 2
    if max(args.batch_sizes) > min(c.max_seqs, T, c.max_seqs_in_prefill):
        raise SystemExit("a batch size exceeds engine.max_seqs / max_tokens_per_round / max_seqs_in_prefill")
    prompts = prompt_token_ids(setup, config, max(max(args.batch_sizes), args.check_prompts), args.prompt_len)
    longest = max(len(p) for p in prompts)
    if longest + 1 + args.rounds + 1 > c.max_seq_len:
        raise SystemExit(f"prompts of up to {longest} tokens + {args.rounds + 2} decoded do not fit max_seq_len "
                         f"{c.max_seq_len}: lower --rounds")  # fmt: skip
    ctx = args.context or round(statistics.mean(len(p) for p in prompts) + 1 + args.rounds / 2)
    return prompts, args.table_batch or max(args.batch_sizes), ctx


def one_variant(setup, seam: str, args, B_table: int, ctx: int, prompts_all, reference_tokens: dict, report):
    """Loops of one seam variant and, unless --loops_only, its compiled programs and the identity check."""
    from decode_seam import seam_variant
    from levanter.inference import engine as engine_mod

    c = setup.engine_config
    with seam_variant(seam):
        print(f"\n=== seam: {seam} ===")
        loops, compiled_r = analyze_loops(setup, seam, args, B_table, ctx)
        print(f"loops: {loops['jaxpr_loops']} in the jaxpr, StableHLO whiles {loops['stablehlo_whiles']}, "
              f"compiled HLO whiles {loops.get('hlo_whiles')}; unknown: {loops['unknown_loops'] or 'none'}")  # fmt: skip
        report.table(f"{seam}: body runs per decode iteration at B={B_table}, context {ctx} tokens", loops["table"],
                     LOOP_COLUMNS)  # fmt: skip
        if "hlo_classes" in loops:
            report.table(f"{seam}: compiled HLO whiles", loops["hlo_classes"], HLO_COLUMNS)
            print(f"collectives by innermost loop ('-': none): {loops['hlo_collectives_by_loop']}")
        variant = {"loops": loops}
        if args.loops_only:
            return variant, None
        gen_state, engine = setup.gen_state_for_tracing()
        t0 = time.perf_counter()
        T = c.imputed_max_tokens_per_round
        compiled_1 = engine_mod._run_generation_loop.trace(gen_state, setup.model, setup.sampler, T, 1)
        compiled_1 = compiled_1.lower().compile()
        variant["compile_1_round_s"] = time.perf_counter() - t0
        del engine, gen_state
        # identity through the engine's public path: prefill and decode both use the swapped write
        n_check = args.check_prompts
        new = args.check_new_tokens or (c.max_seq_len - max(len(p) for p in prompts_all[:n_check]))
        variant["generate"] = {}
        for temperature in (0.0, args.check_temperature):
            t0 = time.perf_counter()
            tokens = generate_tokens(setup, prompts_all[:n_check], new, temperature)
            reference = reference_tokens.setdefault(temperature, tokens)
            same = [a == b for a, b in zip(tokens, reference, strict=True)]
            label = "greedy" if temperature == 0 else f"temperature {temperature}"
            variant["generate"][label] = {
                "prompts": n_check, "new_tokens": new, "temperature": temperature,
                "seconds_with_compile": time.perf_counter() - t0, "tokens": sum(len(t) for t in tokens),
                "digest": hashlib.sha256(repr(tokens).encode()).hexdigest(),
                "identical_sequences": sum(same), "identical": all(same),
            }  # fmt: skip
            print(f"generate: {n_check} prompts x {new} new tokens ({label}), identical to {args.seams[0]}: "
                  f"{all(same)} ({sum(same)}/{n_check})")  # fmt: skip
    return variant, {"R": compiled_r, "1": compiled_1}


def timing(setup, programs: dict, prompts_all, variants: dict, args, report) -> tuple[list, list]:
    """Step time vs batch size for every variant, and the KV write alone."""
    import jax

    T = setup.engine_config.imputed_max_tokens_per_round
    print(f"\n=== timing: {args.warmup} warm-up + {args.repeats} repeats, variants alternating ===")
    rows = time_all(setup, programs, prompts_all, args)
    micro = micro_kv_update(setup, args)
    report.table(f"The KV-cache write alone (one layer, T = {T} rows, K valid)", micro, MICRO_COLUMNS)
    base = args.seams[0]
    summary = []
    for seam in args.seams:
        variants[seam]["timing"] = rows[seam]
        table = []
        for r in rows[seam]:
            table.append({
                "seam": seam, "B": r["B"], "step_ms": r["step_s"] * 1e3, "step_min_ms": r["step_min_s"] * 1e3,
                "min_ratio_vs_base": r["min_ratio_vs_base"], "slope_ms": (r["slope_step_s"] or float("nan")) * 1e3,
                "per_call_ms": (r["per_call_s"] or float("nan")) * 1e3, "tokens_per_s": r["tokens_per_s"],
                "cv_R": r["cv_R"], "step_ratio_vs_base": r["step_ratio_vs_base"],
                "cpu_step_ms": r["cpu_step_s"] * 1e3, "cpu_ratio_vs_base": r["cpu_ratio_vs_base"],
                "decode_identical_to_base": r["decode_identical_to_base"],
                "generate_identical_to_base": all(g["identical"] for g in variants[seam]["generate"].values()),
            })  # fmt: skip
        summary += table
        columns = TIME_COLUMNS + [
            ("step_ratio_vs_base", f"step / {base}", "{:.3f}"), ("min_ratio_vs_base", f"min / {base}", "{:.3f}"),
            ("cpu_step_ms", "CPU ms/step", "{:.2f}"), ("cpu_ratio_vs_base", f"CPU / {base}", "{:.3f}"),
            ("decode_identical_to_base", "cache+tokens identical", "{}"),
        ]  # fmt: skip
        report.table(f"{seam}: step time vs batch size ({jax.default_backend()}, {os.cpu_count()} cores)", table,
                     columns)  # fmt: skip
    return summary, micro


if __name__ == "__main__":
    main()
