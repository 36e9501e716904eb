"""Scaling: the same workload on 1 and 2 (or more) emulated hosts -> tokens/s, slowest host's time, speedup.

    uv run python bench/scaling.py                       # 1 vs 2 hosts, ~10 min on 2 cores; bench/results/scaling.json
    uv run python bench/scaling.py --hosts 1,2,4 --repeats 1 --out /tmp/scaling.json    # 4 hosts: 2 per core here

Workload: ``--prompts`` (default 16,384) addition prompts x 6 new tokens, greedy, ``tiny_local.yaml``'s engine
(256 slots), no ``batch_size`` (the planner's: 256 sequences per batch), so a host's time is its batches: 64 on
1 host, 32 on 2. Every host on 1 CPU device (``--trainer.model_axis_size=1``), pinned to its own core by
``bench/pin.py`` (1 host: core 0 only); with 2 cores, 4 hosts share them two to a core and cannot beat 2. A first
run fills a compilation cache (every host writes its own entries), so every measured run loads the engine's
programs from it.

Tokens/s four ways, all over the same sampled tokens: job (``sample/job_tokens_per_s``: / the slowest host's
``generate_s``, compile included), sampling (/ the slowest host's prefill + decode, compile excluded), CPU (/ the
largest CPU seconds of a host's ``generate`` calls, from ``bench/bench_sampler.py``: other users' load hardly
changes it) and wall (/ the launcher's wall clock, process start to exit). Host counts alternate, ``--repeats``
times; speedups are medians of the ratios within each repeat; a control measures what the machine gives one
process per core at the time (numpy loops, one per core vs one alone).
"""

import argparse
import statistics

from _common import (
    RESULTS,
    SCRATCH,
    Report,
    addition_prompts,
    cache_flag,
    cores,
    launch,
    machine_parallel_speedup,
    pinning_note,
    wait_for_quiet,
    write_config,
)

WAYS = ("job", "sampling", "cpu", "wall")


def row_of(run: dict, repeat: int) -> dict:
    ms = run["host_metrics"]
    s = run["summary"]
    tokens = s["sample/tokens_sampled"]
    work = [m["prefill_s"] + m["decode_s"] for m in ms]
    cpu = [run["cpu"][m["host"]]["cpu_s"] for m in ms]
    return {
        "hosts": run["hosts"], "repeat": repeat, "tokens": tokens,
        "batches": "/".join(str(m["batches"]) for m in ms),
        "generate_max_s": s["sample/generate_time_max_s"], "imbalance": s["sample/host_imbalance"],
        "sampling_max_s": max(work), "cpu_max_s": max(cpu), "wall_s": run["wall_outside_s"],
        "job": s["sample/job_tokens_per_s"], "sampling": tokens / max(work), "cpu": tokens / max(cpu),
        "wall": tokens / run["wall_outside_s"], "accuracy": s.get("sample/task_accuracy"),
        "load_1m": run["loadavg_1m"][0],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1,2", help="Host counts, comma-separated; the first is the baseline.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16384)
    parser.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = parser.parse_args()
    report = Report("scaling", args)
    counts = [int(h) for h in args.hosts.split(",")]
    core_list = cores()
    work = SCRATCH / "scaling"
    prompts = addition_prompts(args.prompts, work / f"addition_{args.prompts}.txt")
    config = write_config(work / "config.yaml", prompts_file=str(prompts), task="addition", progress_interval_s=0,
                          samples_table_rows=0)  # fmt: skip
    flags = [cache_flag(work / "jax_cache")]
    wait_for_quiet()
    launch(config, work / "cold", max(counts), *flags, core_list=core_list)
    runs, controls = [], []
    for rep in range(args.repeats):
        controls.append(machine_parallel_speedup(core_list)["speedup"])
        for n in counts if rep % 2 == 0 else counts[::-1]:
            wait_for_quiet()
            run = launch(config, work / f"h{n}_r{rep}", n, *flags, core_list=core_list if n > 1 else core_list[:1])
            runs.append(row_of(run, rep))
            print(f"{n} host(s), repeat {rep}: job {runs[-1]['job']:.0f} tok/s", flush=True)
    summary = []
    for n in counts:
        mine = sorted((r for r in runs if r["hosts"] == n), key=lambda r: r["repeat"])
        base = sorted((r for r in runs if r["hosts"] == counts[0]), key=lambda r: r["repeat"])
        row = {"hosts": n, "pinning": pinning_note(n, core_list), "batches": mine[0]["batches"]}
        for key in ("generate_max_s", "imbalance", "wall_s", *WAYS):
            row[key] = statistics.median(r[key] for r in mine)
        for way in WAYS:
            row[f"x_{way}"] = statistics.median(m[way] / b[way] for m, b in zip(mine, base))
        summary.append(row)
    report.table("Every run", runs, RUN_COLUMNS)
    report.table(f"Medians of {args.repeats} (speedups: medians of within-repeat ratios vs {counts[0]} host)",
                 summary, SUMMARY_COLUMNS)  # fmt: skip
    print("machine control, one numpy process per core vs one alone: " + ", ".join(f"{c:.2f}x" for c in controls))
    report.write(args.out, runs=runs, summary=summary, machine_control=controls, config=config.read_text())


RUN_COLUMNS = [
    ("hosts", "hosts", "{:d}"),
    ("repeat", "rep", "{:d}"),
    ("batches", "batches/host", "{}"),
    ("generate_max_s", "generate max s", "{:.2f}"),
    ("imbalance", "max/mean", "{:.3f}"),
    ("sampling_max_s", "prefill+decode max s", "{:.2f}"),
    ("cpu_max_s", "CPU max s", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("job", "job tok/s", "{:.0f}"),
    ("sampling", "sampling tok/s", "{:.0f}"),
    ("cpu", "CPU tok/s", "{:.0f}"),
    ("wall", "wall tok/s", "{:.0f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("load_1m", "load", "{:.1f}"),
]
SUMMARY_COLUMNS = [
    ("hosts", "hosts", "{:d}"),
    ("batches", "batches/host", "{}"),
    ("generate_max_s", "generate max s", "{:.2f}"),
    ("job", "job tok/s", "{:.0f}"),
    ("x_job", "x (job)", "{:.2f}"),
    ("x_sampling", "x (sampling)", "{:.2f}"),
    ("x_cpu", "x (CPU)", "{:.2f}"),
    ("wall", "wall tok/s", "{:.0f}"),
    ("x_wall", "x (wall)", "{:.2f}"),
]

if __name__ == "__main__":
    main()
