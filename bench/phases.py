"""Phase breakdown of one run: where the wall clock goes, from launching the processes to the launcher's exit.

    uv run python bench/phases.py                        # ~1 min on 2 cores; JSON to bench/results/phases.json
    uv run python bench/phases.py --cache --out bench/results/phases_warm.json    # after a run that fills a cache

The run: ``config/sampler/tiny_local.yaml`` (256 addition prompts x 6 new tokens, greedy, one batch per host) on
``--hosts`` emulated hosts (default 2, one core each, 1 CPU device each, ``--trainer.model_axis_size=1``), without
a compilation cache by default, as the config ships (``--cache``: a first run fills one, the measured run loads
from it).

Every host phase is a list of [start, end] spans in summary.json ``hosts[*].phases`` (seconds from the host
process's creation, ``started_at``); a phase's seconds are the sum of its spans:

* launch: the bench's clock before it starts ``infra/launch.py`` -> the host process's creation (``/proc``, to
  10 ms); startup: Python start, imports of JAX and Levanter, config parsing;
* distributed_init, prepare (config resolution, prompts, tokenizer, run directory), model_load, engine_build;
* compile, prefill, decode: per batch, the sampler splits the ``generate`` call with JAX's compile clock, so
  compile (tracing, lowering, compiling or loading from the cache, the first batch's) is its own phase;
* write (the part file), send (to the leader; the leader's own parts go to its spool); "between phases" is the
  rest up to the last send: building each batch's engine requests (a few eager JAX ops per sequence: its
  sampling key, its scalars), rows from tokens, checking the engine's state after the batch;
* wait (hosts other than the leader): last send -> the leader has this host's end message;
* the leader's own: collect (its wait for every host's parts), merge (``merged.jsonl``), timeline
  (``timeline.png``), tracker; then shutdown: the tracker's end -> the launcher's exit.
"""

import argparse
import shutil

from _common import (
    RESULTS,
    SCRATCH,
    TINY_CONFIG,
    Report,
    cache_flag,
    cores,
    launch,
    phase_s,
    pinning_note,
    wait_for_quiet,
    write_config,
)

HOST_PHASES = [
    ("launch", "launcher start -> host process created"),
    ("startup", "Python start, imports, config"),
    ("distributed_init", "jax.distributed init"),
    ("prepare", "prepare (config, prompts, tokenizer, run dir)"),
    ("model_load", "model load"),
    ("engine_build", "engine build (KV cache)"),
    ("compile", "compile (trace, lower, compile or cache load)"),
    ("prefill", "prefill (compile excluded)"),
    ("decode", "decode (compile excluded)"),
    ("write", "part write"),
    ("send", "send to the leader"),
    ("between", "between phases (requests, rows, engine check)"),
    ("wait", "wait: last send -> the leader has the host's end"),
]
LEADER_PHASES = [
    ("collect", "collect (leader: every host's parts in)"),
    ("merge", "merge (leader: merged.jsonl)"),
    ("timeline", "timeline.png"),
    ("tracker", "tracker (noop here)"),
    ("shutdown", "summary.json again, done, every process exiting"),
]


def breakdown(run: dict) -> tuple[list[dict], dict]:
    """Per-host phase seconds, and the leader's own."""
    rows = []
    for m in run["host_metrics"]:
        row = {"host": m["host"], "launch": m["started_at"] - run["launched_at"]}
        for name, _ in HOST_PHASES[1:]:
            if name != "between":
                row[name] = phase_s(m, name)
        last_send = max((end for _, end in m["phases"].get("send", [])), default=0.0)
        covered = sum(
            row[name]
            for name in (
                "startup",
                "distributed_init",
                "prepare",
                "model_load",
                "engine_build",
                "compile",
                "prefill",
                "decode",
                "write",
                "send",
            )
        )
        row["between"] = last_send - covered
        rows.append(row)
    leader = run["leader"]
    own = {name: phase_s(leader, name) for name, _ in LEADER_PHASES[:-1]}
    tracker_end = leader["started_at"] + max(end for _, end in leader["phases"]["tracker"])
    own["shutdown"] = run["ended_at"] - tracker_end
    return rows, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--cache", action="store_true", help="Measure a warm compilation-cache run.")
    parser.add_argument("--out", default=str(RESULTS / "phases.json"))
    args = parser.parse_args()
    report = Report("phases", args)
    core_list = cores()
    work = SCRATCH / "phases"
    config = write_config(work / "config.yaml", TINY_CONFIG)
    flags = []
    if args.cache:
        shutil.rmtree(work / "jax_cache", ignore_errors=True)
        flags = [cache_flag(work / "jax_cache")]
        wait_for_quiet()
        launch(config, work / "fill_cache", args.hosts, *flags, core_list=core_list)
    wait_for_quiet()
    run = launch(config, work / "run", args.hosts, *flags, core_list=core_list)
    hosts, own = breakdown(run)
    wall = run["wall_outside_s"]
    table = []
    for key, title in HOST_PHASES:
        entry = {"phase": title, **{f"h{r['host']}": r.get(key) for r in hosts}}
        entry["max"] = max(r.get(key) or 0.0 for r in hosts)
        entry["share"] = entry["max"] / wall
        table.append(entry)
    for key, title in LEADER_PHASES:
        table.append({"phase": title, "h0": own[key], "max": own[key], "share": own[key] / wall})
    table.append({"phase": "wall clock (launcher start -> exit)", "max": wall, "share": 1.0})
    columns = [
        ("phase", "phase", "{}"),
        *[(f"h{r['host']}", f"host {r['host']} s", "{:.2f}") for r in hosts],
        ("max", "max s", "{:.2f}"),
        ("share", "of wall", "{:.1%}"),
    ]
    mode = "warm compilation cache" if args.cache else "no compilation cache"
    report.table(f"{args.hosts} hosts ({pinning_note(args.hosts, core_list)}), {mode}; tiny_local", table, columns)
    s = run["summary"]
    print(
        f"job {s['sample/job_tokens_per_s']:.0f} tok/s (slowest host's generate {s['sample/generate_time_max_s']:.2f}"
        f" s), end to end {s['sample/end_to_end_tokens_per_s']:.0f} tok/s over {s['sample/wall_clock_s']:.2f} s, "
        f"launcher wall {wall:.2f} s"
    )
    report.write(args.out, mode=mode, hosts=hosts, leader=own, summary=s)


if __name__ == "__main__":
    main()
