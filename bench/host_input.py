"""Per-host input against every host reading everything: the prompt stage of 4 hosts on a 1 M-prompt JSONL file.

    uv run python bench/host_input.py                     # ~13 min on 2 cores; JSON to bench/results/host_input.json
    uv run python bench/host_input.py --prompts 100000 --out /tmp/host_input.json
    uv run python bench/host_input.py --format parquet    # the same as a Parquet file; host_input_parquet.json

Workload: ``--prompts`` (default 1,000,000) held-out addition prompts (``addition.make_prompts``) written as a
JSONL file in a temporary directory, one ``{"prompt": "4821+377=", "id": i}`` object a line (``--format parquet``:
the same two columns as a Parquet file, in row groups of 65,536 rows); ``tiny_local.yaml``
otherwise (the tiny tokenizer, ``assets/tiny-addition``), ``model_axis_size`` 1. No model is loaded and nothing is
sampled.

Measured, for each of ``--hosts`` (default 4) hosts, in its own fresh process, one process at a time, old and
new alternating (the machine has 2 cores; on a slice each host runs this stage on its own machine): the stage that
reads the prompts, ``resolution.resolve`` (config checks, the tokenizer, the prompts, capacity, the fingerprint)
then ``host_work.host_prompts`` (the host's share; with per-host input, reading, checking and tokenizing it). Two
modes, the same file: ``old`` with ``per_host_input_min_bytes: null`` (every host reads and tokenizes every prompt,
as before per-host input) and ``new`` with the default threshold (each host scans the file's lines and reads its
share). Per host:

- ``stage s``: wall time of that stage (``time.perf_counter``);
- ``stage CPU s``: the process's CPU seconds in it, all threads (``resource.getrusage``): other users' load on
  the shared machine hardly moves it;
- ``RSS before MiB``: the process's resident set (``/proc/self/status`` VmRSS) after its imports, before the stage;
- ``peak RSS MiB``: the process's peak resident set at the end (``resource.getrusage`` ``ru_maxrss``);
- ``stage +MiB``: peak less before: the memory the stage itself took;
- ``work items +MiB``: what the next step, ``host_work.work_items`` (a ``WorkItem`` per prompt of the share, the
  same in both modes), then adds to the resident set; not part of the stage.

Also, once for ``new``: the leader's pass over every row's ``n_generations`` that its completeness check reads at
merge time (after sampling, host 0 only; ``HostInput.n_generations``).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PY, RESULTS, Report, host_env, wait_for_quiet, write_config


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def host_stage(config_path: str, host: int, hosts: int, leader_pass: bool) -> dict:
    """One host's prompt stage, in this process (run by the parent with ``--host``)."""
    import draccus

    from levanter_multihost import host_work
    from levanter_multihost.config import SampleLmMultihostConfig
    from levanter_multihost.host_input import HostInput
    from levanter_multihost.resolution import resolve

    config = draccus.parse(SampleLmMultihostConfig, config_path=config_path, args=[])
    before = rss_mib()
    cpu = cpu_s()
    start = time.perf_counter()
    plan = resolve(config, host, hosts, 1)
    prompts, share, to_sample = host_work.host_prompts(plan.prompts, host, hosts, plan.shard_strategy, set())
    seconds = time.perf_counter() - start
    cpu = cpu_s() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after = rss_mib()
    items = host_work.work_items(prompts, to_sample, set())  # the next step, the same in both modes
    result = {
        "host": host,
        "per_host": isinstance(plan.prompts, HostInput),
        "prompts_read": len(prompts),
        "share": len(share),
        "work_items": len(items),
        "stage_s": seconds,
        "stage_cpu_s": cpu,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "stage_mib": peak - before,
        "work_items_mib": rss_mib() - after,
    }
    if leader_pass and isinstance(plan.prompts, HostInput):
        start = time.perf_counter()
        total = int(plan.prompts.n_generations.sum())
        result["leader_n_generations_s"] = time.perf_counter() - start
        result["leader_sequences"] = total
    return result


def write_prompts(n: int, path: Path) -> Path:
    from levanter_multihost.addition import make_prompts

    prompts = make_prompts(n, 0)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"prompt": prompts, "id": list(range(n))}), path, row_group_size=65_536)
        return path
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": prompt, "id": i}) + "\n" for i, prompt in enumerate(prompts))
    return path


COLUMNS = [
    ("mode", "mode", "{}"),
    ("host", "host", "{}"),
    ("prompts_read", "prompts read", "{:,}"),
    ("share", "share", "{:,}"),
    ("stage_s", "stage s", "{:.2f}"),
    ("stage_cpu_s", "stage CPU s", "{:.2f}"),
    ("rss_before_mib", "RSS before MiB", "{:.0f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("stage_mib", "stage +MiB", "{:.0f}"),
    ("work_items_mib", "work items +MiB", "{:.0f}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=1_000_000)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    parser.add_argument("--out", help="default: bench/results/host_input.json, host_input_parquet.json for Parquet")
    parser.add_argument("--patience_s", type=float, default=1200, help="how long to wait for a quiet machine")
    parser.add_argument("--host", type=int, help=argparse.SUPPRESS)  # the child: one host's stage
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host is not None:
        print(json.dumps(host_stage(args.config, args.host, args.hosts, leader_pass=args.host == 0)))
        return
    args.out = args.out or str(RESULTS / ("host_input.json" if args.format == "jsonl" else "host_input_parquet.json"))
    report = Report("host_input", args)
    wait_for_quiet(patience_s=args.patience_s)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = write_prompts(args.prompts, work / f"prompts.{args.format}")
        size = prompts.stat().st_size
        print(f"{args.prompts:,} prompts, {size / 2**20:.1f} MiB at {prompts}", flush=True)
        configs = {
            mode: write_config(
                work / f"{mode}.yaml",
                prompts_file=str(prompts),
                output_dir=str(work / f"out_{mode}"),
                per_host_input_min_bytes=threshold,
            )
            for mode, threshold in (("old", None), ("new", 8 * 2**20))
        }
        rows = []
        for host in range(args.hosts):  # old and new side by side, host by host: the same load on both
            for mode, config in configs.items():
                command = [PY, __file__, "--config", str(config), "--host", str(host), "--hosts", str(args.hosts)]
                done = subprocess.run(command, env=host_env(), capture_output=True, text=True, check=True)
                rows.append({"mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])})
                print(rows[-1], flush=True)
    report.table(
        f"{args.hosts} hosts' prompt stage (resolve + the host's share), {args.prompts:,} prompts, "
        f"{size / 2**20:.1f} MiB {args.format}",
        rows,
        COLUMNS,
    )
    summary = {}
    for mode in ("old", "new"):
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {
            "max_stage_s": max(r["stage_s"] for r in mine),
            "max_stage_cpu_s": max(r["stage_cpu_s"] for r in mine),
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            "max_stage_mib": max(r["stage_mib"] for r in mine),
        }
    ratios = {key: summary["new"][key] / summary["old"][key] for key in summary["old"]}
    leader = next(r for r in rows if r["mode"] == "new" and r["host"] == 0)
    print(f"new / old (slowest or largest host): {ratios}", flush=True)
    print(f"leader's n_generations pass at merge: {leader.get('leader_n_generations_s', 0):.2f} s", flush=True)
    report.write(args.out, file_bytes=size, summary=summary, ratios=ratios)


if __name__ == "__main__":
    sys.exit(main())
