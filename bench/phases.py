"""Phase breakdown of one run: where the wall clock goes, from launching the processes to the launcher's exit.

    uv run python bench/phases.py                        # ~1.5 min on 2 cores; JSON to bench/results/phases.json
    uv run python bench/phases.py --hosts 4 --cache --out /tmp/phases.json

The run: ``config/sampler/tiny_local.yaml`` (256 addition prompts x 6 new tokens, greedy) on ``--hosts`` emulated
hosts (default 2, one core each, 1 CPU device each, ``--trainer.model_axis_size=1``); without a compilation cache
by default, as the config ships (``--cache``: a first run fills a cache, the second, measured one loads from it).

Where each number comes from (seconds; "share" is of the launcher's wall clock):

* launch: the bench's clock just before it starts ``infra/launch.py`` -> the host process's creation
  (``started_at``, from ``/proc``, to 10 ms); Python start: -> the host's ``runtime.start`` (Python start-up, imports
  of JAX/Levanter, config parsing: the ``startup`` phase);
* distributed init, prepare (prompts, tokenizer, preflight, output dir), model load, engine build, write, from
  ``summary.json`` ``hosts[*].phases``;
* prefill and decode from the same phases, each split into the engine program's trace + lower + XLA compile (or
  cache load), from JAX's ``JAX_LOG_COMPILES`` log lines, and the rest (running it);
* gather: per host, its write end -> the leader has its shard (``hosts[*].phases.gather``; a host that finishes
  first waits there for the leader; the leader's own shard never leaves it); on the critical path ("max"
  column): the last host's write end -> the leader has every shard;
* the leader's own phases from ``summary.json`` ``leader.phases``: collect (its wait for the other shards), merge
  (``merged.jsonl``), timeline (``timeline.png``), tracker; then shutdown: the tracker's end -> the launcher's exit
  (``summary.json`` rewritten, the ``done`` key, every process exiting).
"""

import argparse
import shutil
import time

from _common import (
    RESULTS,
    SCRATCH,
    TINY_CONFIG,
    cache_flag,
    cores,
    default_checkpoint,
    engine_compile_s,
    format_table,
    launch,
    machine,
    pinning_note,
    write_config,
    write_json,
)

PHASES = ("distributed_init", "prepare", "model_load", "engine_build", "prefill", "decode", "write", "gather")


def span(phases: dict, name: str) -> float:
    start, end = phases.get(name, (0.0, 0.0))
    return end - start


def breakdown(run: dict) -> tuple[list[dict], dict]:
    """Per-host rows of phase seconds, and the leader's post-gather spans."""
    rows = []
    launched = run["launched_at"]
    wall = run["wall_outside_s"]
    last_in = 0.0
    last_written = 0.0
    for m in sorted(run["host_metrics"], key=lambda m: m["host"]):
        host, ph = m["host"], m["phases"]
        row = {
            "host": host,
            "launch": m["started_at"] - launched,
            "python_start": ph.get("startup", (0.0, 0.0))[1],
            "process_start": m["started_at"] + ph.get("startup", (0.0, 0.0))[1] - launched,
        }
        for name in PHASES:
            row[name] = span(ph, name)
        compile_prefill = sum(
            run["compiles"].get(host, {}).get(step, {}).get("_run_prefill", 0.0)
            for step in ("trace", "lower", "compile")
        )
        compile_decode = sum(
            run["compiles"].get(host, {}).get(step, {}).get("_run_generation_loop", 0.0)
            for step in ("trace", "lower", "compile")
        )
        row["prefill_compile"] = compile_prefill
        row["prefill_run"] = row["prefill"] - compile_prefill
        row["decode_compile"] = compile_decode
        row["decode_run"] = row["decode"] - compile_decode
        row["xla_compile_only"] = engine_compile_s(run, host)
        end_of_gather = m["started_at"] + ph.get("gather", (0, 0))[1]
        last_in = max(last_in, end_of_gather)
        last_written = max(last_written, m["started_at"] + ph.get("write", (0, 0))[1])
        row["until_sent_s"] = end_of_gather - launched
        covered = row["process_start"] + sum(row[name] for name in PHASES)
        row["other"] = row["until_sent_s"] - covered
        rows.append(row)
    own = run["leader"]["phases"]
    tracker_end = run["leader"]["started_at"] + own["tracker"][1]
    leader = {
        "gather_critical": last_in - last_written,
        "collect": span(own, "collect"),
        "merge": span(own, "merge"),
        "timeline": span(own, "timeline"),
        "tracker": span(own, "tracker"),
        "shutdown": run["ended_at"] - tracker_end,
        "wall": wall,
    }
    return rows, leader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument(
        "--cache",
        action="store_true",
        help="Measure a warm compilation-cache run (after one run that fills it).",
    )
    parser.add_argument("--hf_checkpoint", default=default_checkpoint())
    parser.add_argument("--out", default=str(RESULTS / "phases.json"))
    args = parser.parse_args()
    core_list = cores()
    work = SCRATCH / "phases"
    config = write_config(work / "config.yaml", TINY_CONFIG, hf_checkpoint=args.hf_checkpoint)
    flags = []
    if args.cache:
        shutil.rmtree(work / "jax_cache", ignore_errors=True)
        flags = [cache_flag(work / "jax_cache")]
        launch(config, work / "fill_cache", args.hosts, *flags, core_list=core_list)
    run = launch(config, work / "run", args.hosts, *flags, core_list=core_list)
    rows, leader = breakdown(run)
    wall = leader["wall"]

    table = []
    names = [
        ("launch", "launcher start -> host process created"),
        ("python_start", "Python start, imports, config"),
        ("distributed_init", "jax.distributed init"),
        ("prepare", "prepare (prompts, tokenizer, preflight, output dir)"),
        ("model_load", "model load"),
        ("engine_build", "engine build (KV cache)"),
        ("prefill_compile", "prefill: trace+lower+compile _run_prefill"),
        ("prefill_run", "prefill: run"),
        ("decode_compile", "decode: trace+lower+compile _run_generation_loop"),
        ("decode_run", "decode: run (+ request/row building)"),
        ("write", "shard write"),
        ("gather", "gather (per host: write end -> leader has it; max: critical path)"),
        ("other", "between phases"),
    ]
    for key, title in names:
        entry = {"phase": title}
        for r in rows:
            entry[f"h{r['host']}"] = r[key]
        slowest = leader["gather_critical"] if key == "gather" else max(r[key] for r in rows)
        entry["max"] = slowest
        entry["share"] = slowest / wall
        table.append(entry)
    for key, title in (
        ("collect", "collect (leader: own shard sent -> every other shard in)"),
        ("merge", "merge (leader: merged.jsonl)"),
        ("timeline", "timeline.png"),
        ("tracker", "tracker (log the summary, table and timeline; finish)"),
        ("shutdown", "summary.json again, done, every process exiting"),
    ):
        table.append({"phase": title, "h0": leader[key], "max": leader[key], "share": leader[key] / wall})
    table.append({"phase": "wall clock (launcher start -> exit)", "max": wall, "share": 1.0})
    columns = [("phase", "phase", "{}")]
    columns += [(f"h{r['host']}", f"host {r['host']} s", "{:.2f}") for r in rows]
    columns += [("max", "max s", "{:.2f}"), ("share", "of wall", "{:.1%}")]
    mode = "warm compilation cache" if args.cache else "no compilation cache"
    print(f"{args.hosts} hosts ({pinning_note(args.hosts, core_list)}), {mode}; tiny_local workload")
    print(format_table(table, columns))
    s = run["summary"]
    print(
        f"tokens {s['sample/total_generated_tokens']}, round max {s['sample/round_time_max_s']:.2f}s, "
        f"in-process wall (leader started_at -> summary) {s['sample/wall_clock_s']:.2f}s, "
        f"launcher wall {wall:.2f}s; XLA compile of the engine's programs per host: "
        + ", ".join(f"{r['xla_compile_only']:.2f}s" for r in rows)
    )
    write_json(
        args.out,
        {
            "bench": "phases",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(),
            "args": vars(args),
            "mode": mode,
            "hosts": rows,
            "leader": leader,
            "table": table,
            "summary": s,
        },
    )


if __name__ == "__main__":
    main()
