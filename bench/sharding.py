"""Balanced vs contiguous sharding on a workload with skewed prompt lengths: batches per host and max/mean host time.

    uv run python bench/sharding.py                      # ~6 min on 2 cores; JSON to bench/results/sharding.json
    uv run python bench/sharding.py --repeats 1 --out /tmp/sharding.json

Workload: ``--prompts`` (default 8192) addition prompts, the first quarter of them long: their operands
zero-padded to ``--long_tokens`` (default 32) tokens, e.g. ``000000000000004821+000000000000000377=``; the rest
ordinary (4-10 tokens). 6 new tokens each, greedy, no task check (the model was not trained on padded operands).
Engine per host: ``--width`` (default 1024) slots (``max_seqs`` = ``max_seqs_in_prefill`` =
``max_tokens_per_round`` = ``max_queued_tokens``), ``max_prefill_size`` 8 x width tokens, ``max_seq_len`` 64,
``max_rounds`` 8: a batch holds ``width`` short prompts or 8 x width / 32 long ones, so a host's batches (each one
fixed-shape ``generate`` call) depend on its mix of long and short prompts.

Per strategy and host, the planner's batches (``levanter_multihost.plan_cli.plan_config``, the same code as
``levanter-multihost-plan``: the sampler's sharding and batch packing, no model). Then on ``--hosts`` (default
2) emulated hosts, one core each, ``--shard_strategy contiguous`` and ``balanced`` alternate, ``--repeats`` times,
with a warm compilation cache; per host from summary.json: ``generate_s`` (compile included; the cache makes it
small), prefill + decode (compile excluded), and the CPU seconds of its ``generate`` calls
(``bench/bench_sampler.py``), which other users' load hardly changes. Imbalance = max / mean over hosts. The
merged outputs of the two strategies are compared row by row (they must be identical but for ``process_index``).
"""

import argparse
import json
import statistics

from _common import (
    RESULTS,
    SCRATCH,
    Report,
    cache_flag,
    cores,
    launch,
    pinning_note,
    read_rows,
    wait_for_quiet,
    write_config,
)

NEW_TOKENS = 6


def skewed_prompts(n: int, long_tokens: int, path):
    from levanter_multihost.addition import make_prompts

    width = (long_tokens - 2) // 2
    out = []
    for i, p in enumerate(make_prompts(n, 0)):
        if i < n // 4:
            a, b = p[:-1].split("+")
            p = f"{a.zfill(width)}+{b.zfill(long_tokens - 2 - width)}="
        out.append(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path


def planned(config_path, hosts: int, strategy: str) -> list[dict]:
    import draccus

    from levanter_multihost.capacity import report
    from levanter_multihost.config import SampleLmMultihostConfig
    from levanter_multihost.plan_cli import plan_config

    config = draccus.parse(
        SampleLmMultihostConfig, config_path=str(config_path), args=[f"--shard_strategy={strategy}"]
    )
    plan = report.to_dict(plan_config(config, hosts, None, None))
    return [
        {
            "strategy": strategy,
            "host": h["host"],
            "prompts": h["prompts"],
            "batches": len(h["batch_sequences"]),
            "sequences": "/".join(map(str, h["batch_sequences"])),
            "decode_iterations": h["decode_iterations"],
        }
        for h in plan["hosts"]
    ]


def imbalance(values: list[float]) -> float:
    return max(values) / statistics.mean(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8192)
    parser.add_argument("--long_tokens", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024, help="Engine slots per host.")
    parser.add_argument("--out", default=str(RESULTS / "sharding.json"))
    args = parser.parse_args()
    report = Report("sharding", args)
    core_list = cores()
    work = SCRATCH / "sharding"
    w = args.width
    engine = {
        "max_seq_len": 64,
        "page_size": 8,
        "max_pages": 6 * w,
        "max_seqs": w,
        "max_seqs_in_prefill": w,
        "max_prefill_size": 8 * w,
        "max_queued_tokens": w,
        "max_tokens_per_round": w,
        "max_rounds": 8,
    }
    config = write_config(
        work / "config.yaml",
        prompts_file=str(skewed_prompts(args.prompts, args.long_tokens, work / "skewed_prompts.txt")),
        max_new_tokens=NEW_TOKENS,
        task=None,
        progress_interval_s=0,
        samples_table_rows=0,
        engine=engine,
    )
    plan = [row for s in ("contiguous", "balanced") for row in planned(config, args.hosts, s)]
    report.table(
        f"Planned batches per host ({args.prompts} prompts, {args.prompts // 4} of {args.long_tokens} "
        f"tokens first; engine width {w})",
        plan,
        PLAN_COLUMNS,
    )

    flags = [cache_flag(work / "jax_cache")]
    wait_for_quiet()
    launch(config, work / "fill_cache", args.hosts, *flags, "--shard_strategy=balanced", core_list=core_list)
    runs, merged = [], {}
    for rep in range(args.repeats):
        for strategy in ["contiguous", "balanced"] if rep % 2 == 0 else ["balanced", "contiguous"]:
            wait_for_quiet()
            out = work / f"{strategy}_{rep}"
            run = launch(config, out, args.hosts, *flags, f"--shard_strategy={strategy}", core_list=core_list)
            ms = run["host_metrics"]
            gen = [m["generate_s"] for m in ms]
            work_s = [m["prefill_s"] + m["decode_s"] for m in ms]
            cpu = [run["cpu"][m["host"]]["cpu_s"] for m in ms]
            runs.append(
                {
                    "strategy": strategy,
                    "repeat": rep,
                    "batches": "/".join(str(m["batches"]) for m in ms),
                    "generate_s": "/".join(f"{g:.2f}" for g in gen),
                    "generate_imbalance": imbalance(gen),
                    "work_s": "/".join(f"{g:.2f}" for g in work_s),
                    "work_imbalance": imbalance(work_s),
                    "cpu_s": "/".join(f"{c:.2f}" for c in cpu),
                    "cpu_imbalance": imbalance(cpu),
                    "generate_max_s": max(gen),
                    "wall_s": run["wall_outside_s"],
                    "load_1m": run["loadavg_1m"][0],
                }
            )
            rows = read_rows(out / "merged.jsonl")
            merged[strategy] = [(r["global_prompt_index"], r["generated_token_ids"]) for r in rows]
    identical = merged["contiguous"] == merged["balanced"]
    summary = []
    for strategy in ("contiguous", "balanced"):
        mine = [r for r in runs if r["strategy"] == strategy]
        summary.append(
            {
                "strategy": strategy,
                **{
                    k: statistics.median(r[k] for r in mine)
                    for k in ("generate_imbalance", "work_imbalance", "cpu_imbalance", "generate_max_s", "wall_s")
                },
            }
        )
    report.table(f"Every run ({args.hosts} hosts, {pinning_note(args.hosts, core_list)})", runs, RUN_COLUMNS)
    report.table("Medians", summary, SUMMARY_COLUMNS)
    print(f"outputs identical between the strategies: {identical} ({len(merged['balanced'])} rows)")
    report.write(
        args.out,
        engine=engine,
        planned=plan,
        runs=runs,
        summary=summary,
        outputs_identical=identical,
        config=json.dumps(config.read_text()),
    )


PLAN_COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("host", "host", "{:d}"),
    ("prompts", "prompts", "{:d}"),
    ("batches", "batches", "{:d}"),
    ("sequences", "sequences per batch", "{}"),
    ("decode_iterations", "decode iterations", "{:d}"),
]
RUN_COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("repeat", "rep", "{:d}"),
    ("batches", "batches/host", "{}"),
    ("generate_s", "generate s/host", "{}"),
    ("generate_imbalance", "max/mean", "{:.3f}"),
    ("work_s", "prefill+decode s/host", "{}"),
    ("work_imbalance", "max/mean", "{:.3f}"),
    ("cpu_s", "generate CPU s/host", "{}"),
    ("cpu_imbalance", "max/mean", "{:.3f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("load_1m", "load", "{:.1f}"),
]
SUMMARY_COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("generate_imbalance", "generate max/mean", "{:.3f}"),
    ("work_imbalance", "prefill+decode max/mean", "{:.3f}"),
    ("cpu_imbalance", "CPU max/mean", "{:.3f}"),
    ("generate_max_s", "generate max s", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"),
]

if __name__ == "__main__":
    main()
