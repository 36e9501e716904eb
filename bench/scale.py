"""Scale: more prompts on the same hosts (``prompts``), or the same prompts on more hosts (``hosts``).

    uv run python bench/scale.py prompts                 # ~12 min on 2 cores; JSON to bench/results/scale.json
    uv run python bench/scale.py prompts --prompts 4096 --out /tmp/scale.json
    uv run python bench/scale.py hosts                   # 1 vs 2 hosts, ~10 min; bench/results/scaling.json
    uv run python bench/scale.py hosts --hosts 1,2,4 --repeats 1 --out /tmp/scaling.json  # 4 hosts: 2 per core

``prompts``: 4,096 / 16,384 / 65,536 addition prompts on 4 emulated hosts.
Workload: ``addition.make_prompts(n, 0)`` (a larger n extends a smaller one, so the first 256 prompts are
``config/prompts/addition_256.txt``), ``config/sampler/tiny_local.yaml`` otherwise (6 new tokens, greedy, an
engine of ``max_seqs`` = ``max_seqs_in_prefill`` = ``max_queued_tokens`` = ``max_tokens_per_round`` = 256,
``max_pages`` 1024), ``--task=addition``, no ``batch_size`` (the planner's: 256 sequences per batch). First the
256-prompt baseline, then each size, on ``--hosts`` (default 4) hosts of 1 CPU device each
(``--trainer.model_axis_size=1``), host i pinned to core i % cores (4 hosts on 2 cores run two to a core). One
compilation cache for all runs: a first 256-prompt run fills it (reported as "cold cache": compiling raises its
RSS), then the 256-prompt baseline and every size load the engine's programs from it (they have fixed shapes).

Checked per size: merged.jsonl has every global index 0..n-1 exactly once; the first 256 rows equal the
baseline's in every field but ``process_index`` (same tokens whatever the batching and host); the accuracy.
Reported per host (from summary.json ``hosts``): ``peak_rss_bytes`` (``ru_maxrss``: the host's largest resident
set over the whole run, model, engine and JAX included), batches, compile / prefill / decode / generate seconds,
decode tok/s; and the summary's ``sample/job_tokens_per_s`` and ``sample/end_to_end_tokens_per_s``, and the
launcher's wall clock.

``hosts``: ``--prompts`` (default 16,384) addition prompts x 6 new tokens, greedy, ``tiny_local.yaml``'s
engine (256 slots), no ``batch_size`` (the planner's: 256 sequences per batch), so a host's time is its batches: 64 on
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
import hashlib
import json
import shutil
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

SAME = ("global_prompt_index", "generation_index", "generated_token_ids", "generated_text", "finish_reason")
"""What must match the baseline row for row (``process_index`` differs: another host samples the prompt)."""


def check_rows(path, n: int, baseline: list[dict] | None) -> dict:
    data = path.read_bytes()
    rows = [json.loads(line) for line in data.splitlines()]
    first = [{k: r[k] for k in SAME} for r in rows[:256]]
    return {
        "rows": len(rows),
        "every_row_once": sorted(r["global_prompt_index"] for r in rows) == list(range(n)),
        "first_256_identical": None if baseline is None else first == baseline,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def run_size(
    config_dir, n: int, hosts: int, flags: list[str], core_list, baseline, label: str = ""
) -> tuple[dict, list]:
    prompts = addition_prompts(n, config_dir / f"addition_{n}.txt")
    config = write_config(
        config_dir / f"config_{n}.yaml",
        prompts_file=str(prompts),
        task="addition",
        progress_interval_s=30,
        samples_table_rows=0,
    )
    out = config_dir / f"run_{n}{label}"
    shutil.rmtree(out, ignore_errors=True)
    run = launch(config, out, hosts, *flags, core_list=core_list)
    s = run["summary"]
    check = check_rows(out / "merged.jsonl", n, baseline)
    hosts_rows = []
    for m in run["host_metrics"]:
        hosts_rows.append(
            {
                "prompts": f"{n}{label}",
                "host": m["host"],
                "host_prompts": m["prompts"],
                "batches": m["batches"],
                "sequences": m["sequences"],
                "tokens": m["tokens_generated"],
                "peak_rss_MiB": m["peak_rss_bytes"] / 2**20,
                "compile_s": m["compile_s"],
                "prefill_s": m["prefill_s"],
                "decode_s": m["decode_s"],
                "generate_s": m["generate_s"],
                "decode_tok_s": m["decode_tokens_per_s"],
            }
        )
    rss = [m["peak_rss_bytes"] / 2**20 for m in run["host_metrics"]]
    row = {
        "prompts": f"{n}{label}",
        **check,
        "accuracy": s.get("sample/task_accuracy"),
        "batches_per_host": "/".join(str(m["batches"]) for m in run["host_metrics"]),
        "rss_max_MiB": max(rss),
        "rss_min_MiB": min(rss),
        "rss_leader_MiB": rss[0],
        "generate_max_s": s["sample/generate_time_max_s"],
        "decode_tok_s_mean": sum(m["decode_tokens_per_s"] for m in run["host_metrics"]) / hosts,
        "job_tok_s": s["sample/job_tokens_per_s"],
        "end_to_end_tok_s": s["sample/end_to_end_tokens_per_s"],
        "wall_s": run["wall_outside_s"],
        "load_1m": run["loadavg_1m"],
    }
    print(
        f"{n}{label} prompts: {row['rows']} rows, every row once {row['every_row_once']}, "
        f"accuracy {row['accuracy']:.4f}, RSS max {row['rss_max_MiB']:.0f} MiB, wall {row['wall_s']:.0f} s",
        flush=True,
    )
    return row, hosts_rows


def by_prompts(args) -> None:
    """More prompts on the same hosts: every row, accuracy, peak RSS, batches, tok/s."""
    report = Report("scale", args)
    core_list = cores()
    work = SCRATCH / "scale"
    shutil.rmtree(work / "jax_cache", ignore_errors=True)
    flags = [cache_flag(work / "jax_cache")]
    print(f"{args.hosts} hosts: {pinning_note(args.hosts, core_list)}", flush=True)
    wait_for_quiet()
    cold, cold_hosts = run_size(work, 256, args.hosts, flags, core_list, None, " (cold cache)")
    wait_for_quiet()
    base, base_hosts = run_size(work, 256, args.hosts, flags, core_list, None)
    baseline = [{k: r[k] for k in SAME} for r in map(json.loads, (work / "run_256" / "merged.jsonl").open())]
    rows, host_rows = [cold, base], cold_hosts + base_hosts
    for n in [int(p) for p in args.prompts.split(",")]:
        wait_for_quiet()
        row, hosts = run_size(work, n, args.hosts, flags, core_list, baseline)
        rows.append(row)
        host_rows += hosts
    report.table(f"Per run ({args.hosts} emulated hosts, 1 CPU device each)", rows, PROMPT_COLUMNS)
    report.table("Per host", host_rows, HOST_COLUMNS)
    report.write(args.out, runs=rows, hosts=host_rows, pinning=pinning_note(args.hosts, core_list))


PROMPT_COLUMNS = [
    ("prompts", "prompts", "{}"),
    ("rows", "rows", "{:d}"),
    ("every_row_once", "every row once", "{}"),
    ("first_256_identical", "first 256 = baseline", "{}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("batches_per_host", "batches/host", "{}"),
    ("rss_min_MiB", "RSS min MiB", "{:.0f}"),
    ("rss_max_MiB", "RSS max MiB", "{:.0f}"),
    ("generate_max_s", "generate max s", "{:.1f}"),
    ("decode_tok_s_mean", "decode tok/s/host", "{:.0f}"),
    ("job_tok_s", "job tok/s", "{:.0f}"),
    ("end_to_end_tok_s", "end-to-end tok/s", "{:.0f}"),
    ("wall_s", "wall s", "{:.0f}"),
]
HOST_COLUMNS = [
    ("prompts", "prompts", "{}"),
    ("host", "host", "{:d}"),
    ("host_prompts", "host prompts", "{:d}"),
    ("batches", "batches", "{:d}"),
    ("peak_rss_MiB", "peak RSS MiB", "{:.0f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("prefill_s", "prefill s", "{:.1f}"),
    ("decode_s", "decode s", "{:.1f}"),
    ("generate_s", "generate s", "{:.1f}"),
    ("decode_tok_s", "decode tok/s", "{:.0f}"),
]


WAYS = ("job", "sampling", "cpu", "wall")


def row_of(run: dict, repeat: int) -> dict:
    ms = run["host_metrics"]
    s = run["summary"]
    tokens = s["sample/tokens_sampled"]
    work = [m["prefill_s"] + m["decode_s"] for m in ms]
    cpu = [run["cpu"][m["host"]]["cpu_s"] for m in ms]
    return {
        "hosts": run["hosts"],
        "repeat": repeat,
        "tokens": tokens,
        "batches": "/".join(str(m["batches"]) for m in ms),
        "generate_max_s": s["sample/generate_time_max_s"],
        "imbalance": s["sample/host_imbalance"],
        "sampling_max_s": max(work),
        "cpu_max_s": max(cpu),
        "wall_s": run["wall_outside_s"],
        "job": s["sample/job_tokens_per_s"],
        "sampling": tokens / max(work),
        "cpu": tokens / max(cpu),
        "wall": tokens / run["wall_outside_s"],
        "accuracy": s.get("sample/task_accuracy"),
        "load_1m": run["loadavg_1m"][0],
    }


def by_hosts(args) -> None:
    """The same workload on more hosts: tokens/s four ways, the slowest host's time, speedups."""
    report = Report("scaling", args)
    counts = [int(h) for h in args.hosts.split(",")]
    core_list = cores()
    work = SCRATCH / "scaling"
    prompts = addition_prompts(args.prompts, work / f"addition_{args.prompts}.txt")
    config = write_config(
        work / "config.yaml", prompts_file=str(prompts), task="addition", progress_interval_s=0, samples_table_rows=0
    )
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
    report.table(
        f"Medians of {args.repeats} (speedups: medians of within-repeat ratios vs {counts[0]} host)",
        summary,
        SUMMARY_COLUMNS,
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    prompts = modes.add_parser("prompts", help=by_prompts.__doc__)
    prompts.add_argument("--prompts", default="4096,16384,65536", help="Prompt counts, comma-separated.")
    prompts.add_argument("--hosts", type=int, default=4)
    prompts.add_argument("--out", default=str(RESULTS / "scale.json"))
    hosts = modes.add_parser("hosts", help=by_hosts.__doc__)
    hosts.add_argument("--hosts", default="1,2", help="Host counts, comma-separated; the first is the baseline.")
    hosts.add_argument("--repeats", type=int, default=2)
    hosts.add_argument("--prompts", type=int, default=16384)
    hosts.add_argument("--out", default=str(RESULTS / "scaling.json"))
    args = parser.parse_args()
    (by_prompts if args.mode == "prompts" else by_hosts)(args)


if __name__ == "__main__":
    main()
