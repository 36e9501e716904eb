"""Tokens/s of one host vs ``batch_size`` on CPU: the same prompts cut into batches of 16, 64 and 256 sequences.

    uv run python bench/batch_size.py                    # ~5 min on 2 cores; JSON to bench/results/batch_size.json
    uv run python bench/batch_size.py --batch_sizes 16,64,128,256 --repeats 1 --out /tmp/batch_size.json

Workload: ``--prompts`` (default 1,024) addition prompts, ``tiny_local.yaml`` otherwise (6 new tokens, greedy, an
engine of 256 slots: ``max_seqs`` = ``max_tokens_per_round`` = ``max_seqs_in_prefill`` = 256), on 1 emulated
host (1 CPU device, pinned to core 0), ``--batch_size`` B. The engine's programs have fixed shapes (sized by
``max_seqs``, ``max_tokens_per_round``, ``max_prefill_size``), so every batch pays a fixed part (a prefill of
``max_prefill_size`` tokens, the per-step cost of 256 slots) that a batch of 256 spreads over 16 times the rows of
a batch of 16. A first run fills a compilation cache; the measured runs load from it, alternating the sizes,
``--repeats`` times (medians reported).

Per run, from summary.json: batches, compile / prefill / decode seconds (compile excluded from prefill and
decode), ``decode_tokens_per_s`` (tokens / decode s); "loop tok/s" = tokens / the host's sampling loop (first
compile start to last part sent, less compile: every batch's prefill, decode, rows, part write and send); "host
ms/row" = the loop's time outside prefill, decode, write and send, per row (building the engine's requests, a few
eager JAX ops per sequence; rows from tokens; the engine check after each batch); and from the engine's own
log lines (``bench/bench_sampler.py``): the steady-state decode round (the second round on), its tokens/s and its
step time (round seconds / iterations, iterations = new tokens / B); and the same step from summary.json alone:
``batch_stats`` ``decode_s`` of the second batch on / (max_new_tokens - 1) iterations a batch.
"""

import argparse
import shutil
import statistics

from _common import (
    RESULTS,
    SCRATCH,
    Report,
    addition_prompts,
    cache_flag,
    launch,
    phase_s,
    steady_rounds,
    wait_for_quiet,
    write_config,
)


def measure(run: dict, batch_size: int, repeat: int) -> dict:
    m = run["host_metrics"][0]
    spans = m["phases"]
    # the sampling loop: first compile start to last part sent, less compiling (the cache load and tracing)
    loop_s = max(end for _, end in spans["send"]) - min(start for start, _ in spans["compile"]) - m["compile_s"]
    host_s = loop_s - m["prefill_s"] - m["decode_s"] - phase_s(m, "write") - phase_s(m, "send")
    rounds = steady_rounds(run, 0)
    steps = [r[0] / (r[3] / batch_size) for r in rounds if r[3]]
    # from summary.json alone: every sequence runs to max_new_tokens here, so a batch decodes max_new - 1 steps
    later = m["batch_stats"][1:]
    per_seq = max(b["tokens"] // b["sequences"] for b in m["batch_stats"])
    stats_step = sum(b["decode_s"] for b in later) / (len(later) * (per_seq - 1)) if later else None
    return {
        "batch_size": batch_size,
        "repeat": repeat,
        "batches": m["batches"],
        "tokens": m["tokens_generated"],
        "compile_s": m["compile_s"],
        "prefill_s": m["prefill_s"],
        "decode_s": m["decode_s"],
        "generate_s": m["generate_s"],
        "loop_s": loop_s,
        "host_ms_per_row": host_s / m["sequences"] * 1e3,
        "prefill_ms_per_batch": m["prefill_s"] / m["batches"] * 1e3,
        "decode_tok_s": m["decode_tokens_per_s"],
        "sampling_tok_s": m["tokens_generated"] / (m["prefill_s"] + m["decode_s"]),
        "loop_tok_s": m["tokens_generated"] / loop_s,
        "steady_rounds": len(rounds),
        "round_tok_s": sum(r[3] for r in rounds) / sum(r[0] for r in rounds) if rounds else None,
        "step_ms": statistics.median(steps) * 1e3 if steps else None,
        "stats_step_ms": stats_step * 1e3 if stats_step else None,
        "generate_cpu_s": run["cpu"].get(0, {}).get("cpu_s"),
        "load_1m": run["loadavg_1m"][0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", default="16,64,256")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "batch_size.json"))
    args = parser.parse_args()
    report = Report("batch_size", args)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    work = SCRATCH / "batch_size"
    shutil.rmtree(work, ignore_errors=True)
    prompts = addition_prompts(args.prompts, work / f"addition_{args.prompts}.txt")
    config = write_config(
        work / "config.yaml", prompts_file=str(prompts), task="addition", progress_interval_s=0, samples_table_rows=0
    )
    flags = [cache_flag(work / "jax_cache")]
    wait_for_quiet()
    launch(config, work / "fill_cache", 1, *flags, core_list=[args.core])
    runs = []
    for rep in range(args.repeats):
        order = sizes if rep % 2 == 0 else sizes[::-1]
        for b in order:
            wait_for_quiet()
            run = launch(config, work / f"b{b}_r{rep}", 1, *flags, f"--batch_size={b}", core_list=[args.core])
            runs.append(measure(run, b, rep))
            print(f"batch_size {b}, repeat {rep}: {runs[-1]['loop_tok_s']:.0f} loop tok/s", flush=True)
    medians = []
    for b in sizes:
        mine = [r for r in runs if r["batch_size"] == b]
        row = {"batch_size": b, "batches": mine[0]["batches"], "tokens": mine[0]["tokens"], "repeats": len(mine)}
        for key in (
            "compile_s",
            "prefill_s",
            "decode_s",
            "loop_s",
            "decode_tok_s",
            "sampling_tok_s",
            "loop_tok_s",
            "round_tok_s",
            "step_ms",
            "stats_step_ms",
            "host_ms_per_row",
            "prefill_ms_per_batch",
        ):
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        medians.append(row)
    top = medians[-1]["loop_tok_s"]
    for row in medians:
        row["loop_vs_largest"] = row["loop_tok_s"] / top
    report.table("Every run", runs, RUN_COLUMNS)
    report.table(f"1 host, {args.prompts} prompts x 6 new tokens, medians of {args.repeats}", medians, COLUMNS)
    report.write(args.out, runs=runs, medians=medians, config=config.read_text())


COLUMNS = [
    ("batch_size", "batch_size", "{:d}"),
    ("batches", "batches", "{:d}"),
    ("prefill_s", "prefill s", "{:.2f}"),
    ("decode_s", "decode s", "{:.2f}"),
    ("prefill_ms_per_batch", "prefill ms/batch", "{:.0f}"),
    ("loop_s", "loop s", "{:.2f}"),
    ("host_ms_per_row", "host ms/row", "{:.2f}"),
    ("step_ms", "step ms (round 2+)", "{:.1f}"),
    ("stats_step_ms", "step ms (batch_stats 2+)", "{:.1f}"),
    ("round_tok_s", "round tok/s", "{:.0f}"),
    ("decode_tok_s", "decode tok/s", "{:.0f}"),
    ("loop_tok_s", "loop tok/s", "{:.0f}"),
    ("loop_vs_largest", "loop vs largest", "{:.2f}"),
]
RUN_COLUMNS = [
    ("repeat", "rep", "{:d}"),
    *COLUMNS[:-1],
    ("compile_s", "compile s", "{:.1f}"),
    ("load_1m", "load", "{:.1f}"),
]

if __name__ == "__main__":
    main()
