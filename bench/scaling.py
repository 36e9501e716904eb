"""Scaling: the same workload on 1, 2 and 4 emulated hosts -> tokens/s, per-host round time, imbalance.

    uv run python bench/scaling.py                       # 1 vs 2 hosts, ~12 min on 2 cores; bench/results/scaling.json
    uv run python bench/scaling.py --hosts 1,2,4 --repeats 2 --out /tmp/scaling.json    # 4 hosts: 2 per core here
    uv run python bench/scaling.py --prompts 16384 --max_seq_len 64 --out /tmp/small.json   # the small workload

Workload: 65536 addition prompts (``addition.make_prompts(65536, 0)``) x 6 new tokens, greedy, on the tiny model,
with an engine of 2048 sequence slots per host (``max_seqs = max_tokens_per_round = max_seqs_in_prefill = 2048``,
``max_prefill_size = 20480``, ``max_seq_len = 256``, ``max_rounds = 6``). The engine's steps have fixed shapes: a
decode iteration costs the same whatever number of the ``max_tokens_per_round`` slots is active, and so does a
prefill. A host's time is therefore set by its admission waves: 65536 / 2048 = 32 waves on 1 host, 16 on 2, 8 on 4.
That is what more hosts buy on a real slice too (more engines, each as wide as its chips allow); fewer prompts
per host in a single wave would buy nothing. ``max_seq_len`` sets the engine's decode budget per ``generate`` call
(``max_seq_len / max_rounds`` outer rounds, one per wave here), so 256 lets one host run all 32 waves; the
sequences themselves use under 20 positions, well within the 64 the tiny model was trained on. A wider page table
makes each step dearer (about 2.3 s per wave here against 1.2 s with ``max_seq_len = 64``), but the point is a
workload where generation, not the fixed ~2.5 s per host of tracing the engine's programs, sets a host's time, as
on a TPU (107 s of generation per host in the seed's run).

Every host runs on 1 CPU device (``--devices_per_host 1 --trainer.model_axis_size=1``) and is pinned to one core
by ``bench/pin.py`` (1 host: core 0 only, so that 1 and 2 hosts get one core per host). With 2 cores, 4 hosts
share them two to a core: 4 hosts cannot beat 2 here, and are run ``--oversubscribed_repeats`` times only.

Compilation: a first, cold run on the largest host count fills a persistent compilation cache, where every host
writes its own entries (see bench/compile_cache.py), so every measured run loads the engine's programs from it.
Runs go through ``bench/bench_sampler.py``, which logs each host's CPU seconds in ``InferenceEngine.generate``.

Host time three ways: the round time of summary.json (prefill + decode; wall clock; includes ~2-3 s of tracing,
lowering and loading the engine's two programs, which no cache removes); generation only (the round minus that,
from ``JAX_LOG_COMPILES``); and the round's CPU time, which other users' load hardly changes. Runs of different
host counts alternate, ``--repeats`` times, speedups are the median of the ratios within each repeat, and a
control measures what this machine gives two independent processes at the time (a numpy loop per core vs one
alone): other users' load lands on the core a 1-host run leaves idle, but on both hosts of a 2-host run.

Tokens/s (round) = total generated tokens / the slowest host's round time; (gen) = / the slowest host's generation
time; (CPU) = / the largest round CPU time; (wall) = / the launcher's wall clock (process start to exit).
"""

import argparse
import shutil
import statistics
import time

from _common import (
    RESULTS,
    SCRATCH,
    addition_prompts,
    cache_flag,
    cores,
    default_checkpoint,
    engine_compile_s,
    engine_overhead_s,
    format_table,
    launch,
    machine,
    machine_parallel_speedup,
    pinning_note,
    write_config,
    write_json,
)


def workload_config(path, args):
    return write_config(
        path,
        hf_checkpoint=args.hf_checkpoint,
        prompts_file=str(addition_prompts(args.prompts, path.parent / f"addition_{args.prompts}.txt")),
        max_new_tokens=args.max_new_tokens,
        task="addition",
        progress_interval_s=0,
        trainer={"model_axis_size": 1},
        engine={
            "max_seq_len": args.max_seq_len,
            "page_size": 8,
            "max_pages": 3 * args.max_seqs,
            "max_seqs": args.max_seqs,
            "max_seqs_in_prefill": args.max_seqs,
            "max_prefill_size": args.max_seqs * 10,
            "max_queued_tokens": args.max_seqs,
            "max_tokens_per_round": args.max_seqs,
            "max_rounds": args.max_rounds,
        },
    )


def row_of(run, label):
    s = run["summary"]
    tokens = s["sample/total_generated_tokens"]
    rounds = [m["round_total_s"] for m in run["host_metrics"]]
    # generation only: the round minus trace + lower + compile/cache-load of the engine's two programs
    gen = [m["round_total_s"] - engine_overhead_s(run, m["host"]) for m in run["host_metrics"]]
    # CPU seconds of each host's round (InferenceEngine.generate, all threads), from bench/bench_sampler.py
    cpu = [run["cpu"][h]["cpu_s"] for h in sorted(run["cpu"])]
    return {
        "label": label,
        "hosts": run["hosts"],
        "tokens": tokens,
        "round_max_s": max(rounds),
        "round_mean_s": statistics.mean(rounds),
        "round_min_s": min(rounds),
        "imbalance": s["sample/host_imbalance"],
        "tok_s_round": tokens / max(rounds),
        "wall_s": run["wall_outside_s"],
        "tok_s_wall": tokens / run["wall_outside_s"],
        "engine_compile_s": max(engine_compile_s(run, h) for h in range(run["hosts"])),
        "cpu_max_s": max(cpu) if cpu else None,
        "tok_s_cpu": tokens / max(cpu) if cpu else None,
        "per_host_cpu_s": cpu,
        "gen_max_s": max(gen),
        "gen_mean_s": statistics.mean(gen),
        "gen_imbalance": max(gen) / statistics.mean(gen),
        "tok_s_gen": tokens / max(gen),
        "accuracy": s.get("sample/task_accuracy"),
        "per_host_round_s": rounds,
        "per_host_gen_s": gen,
        "loadavg_1m": run["loadavg_1m"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1,2", help="Host counts, comma-separated.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--oversubscribed_repeats", type=int, default=1, help="Repeats of host counts above the core count."
    )
    parser.add_argument(
        "--prompts", type=int, default=65536, help="Addition prompts (addition.make_prompts, seed 0)."
    )
    parser.add_argument("--max_new_tokens", type=int, default=6)
    parser.add_argument("--max_seqs", type=int, default=2048)
    parser.add_argument("--max_rounds", type=int, default=6)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--hf_checkpoint", default=default_checkpoint())
    parser.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = parser.parse_args()
    host_counts = [int(h) for h in args.hosts.split(",")]
    core_list = cores()
    work = SCRATCH / "scaling"
    config = workload_config(work / "config.yaml", args)
    flags = [cache_flag(work / "jax_cache")]
    shutil.rmtree(work / "jax_cache", ignore_errors=True)

    print(f"machine: {machine()}; workload config {config}")
    biggest = max(host_counts)
    fill = launch(config, work / "cold", biggest, *flags, core_list=core_list, bench_sampler=True)
    cold = row_of(fill, f"{biggest} host(s), cold cache")
    print(format_table([cold], COLUMNS))
    runs: list[dict] = []
    controls = []
    for rep in range(args.repeats):
        controls.append(machine_parallel_speedup(core_list))
        print(f"machine control (numpy, 1 process per core vs 1 alone): {controls[-1]['speedup']:.2f}x", flush=True)
        for n in host_counts:
            if n > len(core_list) and rep >= args.oversubscribed_repeats:
                continue
            run = launch(config, work / f"h{n}_r{rep}", n, *flags, core_list=core_list, bench_sampler=True)
            row = row_of(run, f"{n} host(s), warm, repeat {rep}")
            row["repeat"] = rep
            runs.append(row)
            print(format_table([row], COLUMNS), flush=True)

    summary = []
    base = [r for r in runs if r["hosts"] == host_counts[0]]
    for n in host_counts:
        mine = [r for r in runs if r["hosts"] == n]
        pairs = [(m, next(b for b in base if b["repeat"] == m["repeat"])) for m in mine]
        speed_round = [m["tok_s_round"] / b["tok_s_round"] for m, b in pairs]
        speed_wall = [m["tok_s_wall"] / b["tok_s_wall"] for m, b in pairs]
        speed_gen = [m["tok_s_gen"] / b["tok_s_gen"] for m, b in pairs]
        speed_cpu = [m["tok_s_cpu"] / b["tok_s_cpu"] for m, b in pairs]
        summary.append(
            {
                "label": f"{n} host(s): median of {len(mine)}",
                "hosts": n,
                "pinning": pinning_note(n, core_list),
                "tokens": mine[0]["tokens"],
                "round_max_s": statistics.median(r["round_max_s"] for r in mine),
                "round_mean_s": statistics.median(r["round_mean_s"] for r in mine),
                "imbalance": statistics.median(r["imbalance"] for r in mine),
                "tok_s_round": statistics.median(r["tok_s_round"] for r in mine),
                "tok_s_wall": statistics.median(r["tok_s_wall"] for r in mine),
                "wall_s": statistics.median(r["wall_s"] for r in mine),
                "speedup_round": statistics.median(speed_round),
                "speedup_wall": statistics.median(speed_wall),
                "speedups_round_each": speed_round,
                "gen_max_s": statistics.median(r["gen_max_s"] for r in mine),
                "gen_imbalance": statistics.median(r["gen_imbalance"] for r in mine),
                "tok_s_gen": statistics.median(r["tok_s_gen"] for r in mine),
                "speedup_gen": statistics.median(speed_gen),
                "cpu_max_s": statistics.median(r["cpu_max_s"] for r in mine),
                "tok_s_cpu": statistics.median(r["tok_s_cpu"] for r in mine),
                "speedup_cpu": statistics.median(speed_cpu),
                "speedups_cpu_each": speed_cpu,
                "speedups_gen_each": speed_gen,
                "engine_compile_s": statistics.median(r["engine_compile_s"] for r in mine),
                "accuracy": mine[0]["accuracy"],
            }
        )
    print("\nAll runs:")
    print(format_table(runs, COLUMNS))
    print("\nSummary (speedup = median of per-repeat ratios against 1 host):")
    print(format_table(summary, SUMMARY_COLUMNS))
    for s in summary:
        print(f"  {s['hosts']} host(s): {s['pinning']}")
    print(
        "machine control, 2 single-threaded processes vs 1: "
        + ", ".join(f"{c['speedup']:.2f}x" for c in controls)
        + " (the most 2 hosts can gain here, other users' load included)"
    )
    write_json(
        args.out,
        {
            "bench": "scaling",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(),
            "args": vars(args),
            "config": config.read_text(),
            "cold": cold,
            "machine_control": controls,
            "runs": runs,
            "summary": summary,
        },
    )


COLUMNS = [
    ("label", "run", "{}"),
    ("tokens", "tokens", "{:d}"),
    ("round_max_s", "round max s", "{:.2f}"),
    ("round_mean_s", "round mean s", "{:.2f}"),
    ("imbalance", "max/mean", "{:.3f}"),
    ("tok_s_round", "tok/s (round)", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("tok_s_wall", "tok/s (wall)", "{:.1f}"),
    ("engine_compile_s", "compile/load s", "{:.2f}"),
    ("gen_max_s", "gen max s", "{:.2f}"),
    ("gen_imbalance", "gen max/mean", "{:.3f}"),
    ("tok_s_gen", "tok/s (gen)", "{:.0f}"),
    ("cpu_max_s", "round CPU max s", "{:.2f}"),
    ("tok_s_cpu", "tok/s (CPU)", "{:.0f}"),
    ("accuracy", "accuracy", "{:.3f}"),
]
SUMMARY_COLUMNS = [
    ("hosts", "hosts", "{:d}"),
    ("tokens", "tokens", "{:d}"),
    ("round_max_s", "round max s", "{:.2f}"),
    ("round_mean_s", "round mean s", "{:.2f}"),
    ("imbalance", "max/mean", "{:.3f}"),
    ("tok_s_round", "tok/s (round)", "{:.0f}"),
    ("speedup_round", "x (round)", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("tok_s_wall", "tok/s (wall)", "{:.1f}"),
    ("speedup_wall", "x (wall)", "{:.2f}"),
    ("gen_max_s", "gen max s", "{:.2f}"),
    ("gen_imbalance", "gen max/mean", "{:.3f}"),
    ("tok_s_gen", "tok/s (gen)", "{:.0f}"),
    ("speedup_gen", "x (gen)", "{:.2f}"),
    ("cpu_max_s", "round CPU max s", "{:.2f}"),
    ("speedup_cpu", "x (CPU)", "{:.2f}"),
]

if __name__ == "__main__":
    main()
