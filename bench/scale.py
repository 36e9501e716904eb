"""Scale: 4,096 / 16,384 / 65,536 addition prompts on 4 emulated hosts: every row, accuracy, peak RSS, batches, tok/s.

    uv run python bench/scale.py                         # ~12 min on 2 cores; JSON to bench/results/scale.json
    uv run python bench/scale.py --prompts 4096 --out /tmp/scale.json

Workload: ``addition.make_prompts(n, 0)`` (a larger n extends a smaller one, so the first 256 prompts are
``config/prompts/addition_256.txt``), ``config/sampler/tiny_local.yaml`` otherwise (6 new tokens, greedy, an
engine of ``max_seqs`` = ``max_seqs_in_prefill`` = ``max_queued_tokens`` = ``max_tokens_per_round`` = 256,
``max_pages`` 1024), ``--task=addition``, no ``batch_size`` (the planner's: 256 sequences per batch). First the
256-prompt baseline, then each size, on ``--hosts`` (default 4) hosts of 1 CPU device each
(``--trainer.model_axis_size=1``), host i pinned to core i % cores (4 hosts on 2 cores run two to a core). One
compilation cache for all runs: a first 256-prompt run fills it (reported as "cold cache": compiling raises its
RSS), then the 256-prompt baseline and every size load the engine's programs from it (they have fixed shapes).

Checked per size: merged.jsonl has every global index 0..n-1 exactly once; the first 256 rows equal the
baseline's in every field but ``process_index`` (same tokens whatever the batching and host); the accuracy. Reported per host (from
summary.json ``hosts``): ``peak_rss_bytes`` (``ru_maxrss``: the host's largest resident set over the whole run,
model, engine and JAX included), batches, compile / prefill / decode / generate seconds, decode tok/s; and the
summary's ``sample/job_tokens_per_s`` and ``sample/end_to_end_tokens_per_s``, and the launcher's wall clock.
"""

import argparse
import hashlib
import json
import shutil

from _common import (
    RESULTS,
    SCRATCH,
    Report,
    addition_prompts,
    cache_flag,
    cores,
    launch,
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
    config = write_config(config_dir / f"config_{n}.yaml", prompts_file=str(prompts), task="addition",
                          progress_interval_s=30, samples_table_rows=0)  # fmt: skip
    out = config_dir / f"run_{n}{label}"
    shutil.rmtree(out, ignore_errors=True)
    run = launch(config, out, hosts, *flags, core_list=core_list)
    s = run["summary"]
    check = check_rows(out / "merged.jsonl", n, baseline)
    hosts_rows = []
    for m in run["host_metrics"]:
        hosts_rows.append({"prompts": f"{n}{label}", "host": m["host"], "host_prompts": m["prompts"], "batches": m["batches"],
                           "sequences": m["sequences"], "tokens": m["tokens_generated"],
                           "peak_rss_MiB": m["peak_rss_bytes"] / 2**20, "compile_s": m["compile_s"],
                           "prefill_s": m["prefill_s"], "decode_s": m["decode_s"], "generate_s": m["generate_s"],
                           "decode_tok_s": m["decode_tokens_per_s"]})  # fmt: skip
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
    print(f"{n}{label} prompts: {row['rows']} rows, every row once {row['every_row_once']}, accuracy {row['accuracy']:.4f}, "
          f"RSS max {row['rss_max_MiB']:.0f} MiB, wall {row['wall_s']:.0f} s", flush=True)  # fmt: skip
    return row, hosts_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="4096,16384,65536", help="Prompt counts, comma-separated.")
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = parser.parse_args()
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
    report.table(f"Per run ({args.hosts} emulated hosts, 1 CPU device each)", rows, COLUMNS)
    report.table("Per host", host_rows, HOST_COLUMNS)
    report.write(args.out, runs=rows, hosts=host_rows, pinning=pinning_note(args.hosts, core_list))


COLUMNS = [
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

if __name__ == "__main__":
    main()
