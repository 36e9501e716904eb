"""Balanced vs contiguous sharding on a workload with skewed prompt lengths: max/mean host time.

    uv run python bench/sharding.py                      # ~5 min on 2 cores; JSON to bench/results/sharding.json
    uv run python bench/sharding.py --repeats 1 --out /tmp/sharding.json

Workload: ``--prompts`` (default 8192) addition prompts, the first quarter of them long: their operands
zero-padded to ``--long_tokens`` (default 32) tokens, e.g. ``000000000000004821+000000000000000377=``; the rest are
ordinary (4-10 tokens). 6 new tokens each, greedy, no task check (the model was not trained on padded operands).
Engine per host: 1024 slots (``max_seqs = max_seqs_in_prefill = max_tokens_per_round = 1024``),
``max_prefill_size = 8192`` tokens, ``max_seq_len = 64``, ``max_rounds = 5`` (one outer round per wave of 6-token
answers, 13 rounds of budget).

On ``--hosts`` (default 2) emulated hosts, one core each, ``--shard_strategy contiguous`` and ``balanced``
alternate, ``--repeats`` times, through ``bench/bench_sampler.py`` with a warm compilation cache for every host (one run fills it first). Host
time three ways: the round time of summary.json (prefill + decode, wall clock, including ~2-3 s of tracing,
lowering and loading the engine's programs), generation only (the round minus that) and the round's CPU time
(which other users' load on this shared machine hardly changes; the wall-clock numbers move with it).
Imbalance = max / mean over hosts.

Also shown per host, from the capacity planner's replay of the engine's scheduling (``capacity._replay``): the
prompts, the ``sharding.prompt_cost`` sum (what ``balanced`` equalizes), the prefill waves and the decode
iterations, which are what the engine's fixed-shape steps actually cost; and the same for a "wave share" cost
model (each prompt's share of one admission wave), which docs/benchmarks.md proposes. Outputs of the two
strategies are compared row by row (they must be identical).
"""

import argparse
import json
import math
import statistics
import time

from _common import (
    RESULTS,
    SCRATCH,
    cache_flag,
    cores,
    default_checkpoint,
    engine_overhead_s,
    format_table,
    launch,
    machine,
    pinning_note,
    write_config,
    write_json,
)

NEW_TOKENS = 6


def skewed_prompts(n: int, long_tokens: int, path):
    from levanter_multihost.addition import make_prompts

    prompts = make_prompts(n, 0)
    width = (long_tokens - 2) // 2
    out = []
    for i, p in enumerate(prompts):
        if i < n // 4:
            a, b = p[:-1].split("+")
            p = f"{a.zfill(width)}+{b.zfill(long_tokens - 2 - width)}="
        out.append(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")
    return path, out


def wave_share_costs(tokens: list[int], engine: dict) -> list[float]:
    """Proposed cost model: the share of one admission wave a prompt uses (its binding engine limit)."""
    page = engine["page_size"]
    return [
        max(
            t / engine["max_prefill_size"],
            1 / engine["max_seqs_in_prefill"],
            1 / engine["max_seqs"],
            math.ceil((t + NEW_TOKENS) / page) / engine["max_pages"],
        )
        for t in tokens
    ]


def plan_rows(tokens: list[int], engine: dict, hosts: int) -> list[dict]:
    """Per strategy and host: prompts, prompt_cost sum, planned waves and decode iterations (planner replay)."""
    from levanter_multihost.capacity import EngineLimits, _replay
    from levanter_multihost.sharding import all_shards, balanced_shards, prompt_cost

    limits = EngineLimits(
        max_seq_len=engine["max_seq_len"],
        page_size=engine["page_size"],
        max_pages=engine["max_pages"],
        max_seqs=engine["max_seqs"],
        max_seqs_in_prefill=engine["max_seqs_in_prefill"],
        max_prefill_size=engine["max_prefill_size"],
        max_queued_tokens=engine["max_queued_tokens"],
        max_tokens_per_round=engine["max_tokens_per_round"],
        max_rounds=engine["max_rounds"],
        kv_dtype_bytes=4,
    )
    costs = [prompt_cost(t, NEW_TOKENS, 1) for t in tokens]
    strategies = {
        "contiguous": all_shards("contiguous", hosts, costs),
        "balanced": all_shards("balanced", hosts, costs),
        "wave share (proposed)": balanced_shards(wave_share_costs(tokens, engine), hosts),
    }
    rows = []
    for name, shards in strategies.items():
        for h, shard in enumerate(shards):
            replay = _replay(tuple(tokens[i] for i in shard), limits, engine["max_pages"], NEW_TOKENS, 1)
            rows.append(
                {
                    "strategy": name,
                    "host": h,
                    "prompts": len(shard),
                    "long": sum(1 for i in shard if i < len(tokens) // 4),
                    "cost_sum": sum(costs[i] for i in shard),
                    "waves": len(replay.waves),
                    "decode_iterations": replay.decode_iterations,
                    "truncated": sum(1 for t in replay.new_tokens if t < NEW_TOKENS),
                }
            )
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        for key in ("cost_sum", "waves", "decode_iterations"):
            mean = statistics.mean(r[key] for r in mine)
            for r in mine:
                r[f"{key}_imbalance"] = max(x[key] for x in mine) / mean if mean else 1.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8192)
    parser.add_argument("--long_tokens", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024, help="Engine slots per host.")
    parser.add_argument("--hf_checkpoint", default=default_checkpoint())
    parser.add_argument("--out", default=str(RESULTS / "sharding.json"))
    args = parser.parse_args()
    core_list = cores()
    work = SCRATCH / "sharding"
    prompts_path, prompts = skewed_prompts(args.prompts, args.long_tokens, work / "skewed_prompts.txt")
    tokens = [len(p) for p in prompts]  # the tiny model's tokenizer has one token per character
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
        "max_rounds": 5,
    }
    config = write_config(
        work / "config.yaml",
        hf_checkpoint=args.hf_checkpoint,
        prompts_file=str(prompts_path),
        max_new_tokens=NEW_TOKENS,
        task=None,
        progress_interval_s=0,
        trainer={"model_axis_size": 1},
        engine=engine,
    )
    planned = plan_rows(tokens, engine, args.hosts)
    print(f"{args.prompts} prompts ({args.prompts // 4} of {args.long_tokens} tokens first, the rest 4-10 tokens); "
          f"engine width {w}; {args.hosts} hosts ({pinning_note(args.hosts, core_list)})")  # fmt: skip
    print("Planner replay per host:")
    print(format_table(planned, PLAN_COLUMNS))

    flags = [cache_flag(work / "jax_cache")]
    # fills host 0's cache entries (1 host could not fit all prompts in the decode budget)
    launch(config, work / "fill_cache", args.hosts, *flags, "--shard_strategy=balanced", core_list=core_list)
    runs, merged = [], {}
    for rep in range(args.repeats):
        order = ["contiguous", "balanced"] if rep % 2 == 0 else ["balanced", "contiguous"]
        for strategy in order:
            out = work / f"{strategy}_{rep}"
            run = launch(
                config, out, args.hosts, *flags, f"--shard_strategy={strategy}", core_list=core_list,
                bench_sampler=True,
            )  # fmt: skip
            metrics = sorted(run["host_metrics"], key=lambda m: m["host"])
            rounds = [m["round_total_s"] for m in metrics]
            gen = [m["round_total_s"] - engine_overhead_s(run, m["host"]) for m in metrics]
            cpu = [run["cpu"][m["host"]]["cpu_s"] for m in metrics]
            row = {
                "strategy": strategy,
                "repeat": rep,
                "prompts": "/".join(str(m["prompts"]) for m in metrics),
                "round_s": "/".join(f"{r:.2f}" for r in rounds),
                "round_imbalance": max(rounds) / statistics.mean(rounds),
                "gen_s": "/".join(f"{g:.2f}" for g in gen),
                "gen_imbalance": max(gen) / statistics.mean(gen),
                "gen_max_s": max(gen),
                "cpu_s": "/".join(f"{c:.2f}" for c in cpu),
                "cpu_imbalance": max(cpu) / statistics.mean(cpu),
                "per_host_cpu_s": cpu,
                "wall_s": run["wall_outside_s"],
                "per_host_round_s": rounds,
                "per_host_gen_s": gen,
            }
            runs.append(row)
            print(format_table([row], RUN_COLUMNS), flush=True)
            rows = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
            merged[strategy] = [(r["global_prompt_index"], r["generated_token_ids"]) for r in rows]
    identical = merged["contiguous"] == merged["balanced"]
    summary = {}
    for strategy in ("contiguous", "balanced"):
        mine = [r for r in runs if r["strategy"] == strategy]
        summary[strategy] = {
            "gen_imbalance": statistics.median(r["gen_imbalance"] for r in mine),
            "cpu_imbalance": statistics.median(r["cpu_imbalance"] for r in mine),
            "round_imbalance": statistics.median(r["round_imbalance"] for r in mine),
            "gen_max_s": statistics.median(r["gen_max_s"] for r in mine),
            "wall_s": statistics.median(r["wall_s"] for r in mine),
        }
    print("\nAll runs:")
    print(format_table(runs, RUN_COLUMNS))
    print("\nMedian max/mean host time:")
    print(format_table([dict(strategy=k, **v) for k, v in summary.items()], SUMMARY_COLUMNS))
    print(f"outputs identical between the strategies: {identical} ({len(merged['balanced'])} rows)")
    write_json(
        args.out,
        {
            "bench": "sharding",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(),
            "args": vars(args),
            "engine": engine,
            "planned": planned,
            "runs": runs,
            "summary": summary,
            "outputs_identical": identical,
        },
    )


PLAN_COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("host", "host", "{:d}"),
    ("prompts", "prompts", "{:d}"),
    ("long", "long", "{:d}"),
    ("cost_sum", "prompt_cost sum", "{:d}"),
    ("cost_sum_imbalance", "cost max/mean", "{:.3f}"),
    ("waves", "waves", "{:d}"),
    ("waves_imbalance", "waves max/mean", "{:.3f}"),
    ("decode_iterations", "decode iters", "{:d}"),
    ("decode_iterations_imbalance", "iters max/mean", "{:.3f}"),
    ("truncated", "truncated", "{:d}"),
]
RUN_COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("repeat", "rep", "{:d}"),
    ("prompts", "prompts/host", "{}"),
    ("round_s", "round s/host", "{}"),
    ("round_imbalance", "round max/mean", "{:.3f}"),
    ("gen_s", "gen s/host", "{}"),
    ("gen_imbalance", "gen max/mean", "{:.3f}"),
    ("cpu_s", "round CPU s/host", "{}"),
    ("cpu_imbalance", "CPU max/mean", "{:.3f}"),
    ("wall_s", "wall s", "{:.1f}"),
]
SUMMARY_COLUMNS = [
    ("strategy", "strategy", "{}"),
    ("round_imbalance", "round max/mean", "{:.3f}"),
    ("gen_imbalance", "gen max/mean", "{:.3f}"),
    ("cpu_imbalance", "CPU max/mean", "{:.3f}"),
    ("gen_max_s", "gen max s", "{:.2f}"),
    ("wall_s", "wall s", "{:.1f}"),
]

if __name__ == "__main__":
    main()
