"""Gather + merge cost at the seed's largest shape: this project's path vs the seed's, in one run.

    uv run python bench/gather_cost.py                   # ~1-2 min on 2 cores; JSON to bench/results/gather_cost.json
    uv run python bench/gather_cost.py --repeats 5 --out /tmp/gather.json

1024 rows of 2048 generated token ids (plus text of matching size; the same synthetic rows as
``tests/synthetic_rows.py``) spread over 4 emulated hosts (``infra/launch.py --local_hosts 4``,
JAX distributed on loopback, host i pinned to core i % cores by ``bench/pin.py``). In the same 4 processes,
rotating the order each repeat, the leader gets every host's rows into ``merged.jsonl`` three ways:

* project: what the sampler does. Each host already has its parts' bytes (one part of ``BATCH_ROWS`` rows per
  batch, ``outputs.row_line`` per row, made before the clock starts, as the sampler has them once each part is
  durable); hosts 1..3 send every part with ``Coordinator.send_part`` (zlib level 1 of a small JSON header + the
  bytes, 4 MiB chunks, SHA-256 per chunk in a manifest, bytes API) and then ``send_end``; the leader's
  ``Collector`` drains them into a ``leader.Spool`` (every line's key checked, keys deleted), its own parts go
  straight into the spool, and ``collector.finish()`` ends the "gather". ``leader.write_merged`` then streams the
  heap merge with the completeness check into ``merged.jsonl`` in a ``RunDir`` ("merge").
* project+jsonl: the same, with every host making its parts' bytes from its rows inside the clock, so the cost of
  producing the JSONL is counted too (the sampler pays it anyway for the part files).
* reference: the seed's path. Every host, the leader included: ``json.dumps`` (default separators) of its rows ->
  ``zlib.compress`` (default level) -> base64, one string key per host through ``key_value_set`` /
  ``blocking_key_value_get`` (keys deleted); the leader decodes every payload, sorts the dicts, checks
  completeness (``outputs.Completeness``), ``outputs.row_line`` and writes ``merged.jsonl`` with the same
  ``RunDir.write_atomic``.

Each starts from a barrier (``wait_at_barrier``); the leader's clock runs from the barrier to every payload
decoded ("gather"), then to ``merged.jsonl`` written ("merge"); each host also reports its own encode + send time.
The three merged files are checked to be byte for byte the same. Ratios are the median over repeats of
reference / project, measured back to back in the same processes. Also reported: gather + merge as a fraction of
the seed's 107 s round per host (v5p-16, 64 prompts x 2048 new tokens a host), and single-core costs of each
step. In the sampler the collector drains parts while the leader samples its own share, so most of the "gather"
overlaps generation; here all of it is on the clock. Caveat: 4 hosts share 2 cores here, and loopback is not the data-center network between TPU hosts; the
bytes column says what would cross it.
"""

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic_rows import synthetic_row  # shared with the tests, found through the path above

NUM_PROMPTS = 1024
BATCH_ROWS = 64
"""Rows a part: a batch of the seed's shape (256 prompts a host in 4 batches)."""
CHUNK_BYTES = 4 * 1024 * 1024
TIMEOUT_S = 300
TRANSPORTS = ("project", "project+jsonl", "reference")


# --------------------------------------------------------------------------------------------- worker (each host)


def make_parts(rows: list[dict]) -> list[tuple[dict, bytes]]:
    """A host's parts as the sampler makes them: one sorted JSONL part (header, bytes) per batch."""
    from levanter_multihost.outputs import row_line

    batches = [rows[i : i + BATCH_ROWS] for i in range(0, len(rows), BATCH_ROWS)]
    return [
        ({"kind": "batch", "batch": b, "rows": len(batch)}, b"".join(row_line(r) for r in batch))
        for b, batch in enumerate(batches)
    ]


def write_merged(parts_by_host: list[list[tuple[dict, bytes]]], out_dir: str) -> None:
    """The leader's merge of every host's parts into ``merged.jsonl``: spool, heap merge, completeness, write."""
    from levanter_multihost import leader
    from levanter_multihost.rundir import RunDir

    spool = leader.Spool()
    try:
        for host, parts in enumerate(parts_by_host):
            for header, data in parts:
                spool.add(host, header, data)
        leader.write_merged(spool, RunDir(out_dir), [1] * NUM_PROMPTS, "jsonl", _reporting())
    finally:
        spool.close()


def _reporting():
    """Nothing reported, no task, no samples: the merge alone."""
    from levanter_multihost.runplan import Reporting

    return Reporting(
        tracker=None,
        run_name="gather_cost",
        run_id=None,
        config={},
        samples_table_rows=0,
        task=None,
        progress_interval_s=0.0,
    )


def _project(client, host: int, n: int, rows: list[dict], parts: list | None, prefix: str, out_dir: str) -> dict:
    """The sampler's path; ``parts`` None: make the parts' bytes from ``rows`` inside the clock."""
    from levanter_multihost import leader
    from levanter_multihost.collector import Collector
    from levanter_multihost.coordination import Coordinator
    from levanter_multihost.rundir import MERGED_JSONL, RunDir
    from levanter_multihost.runplan import Timeouts

    link = Coordinator(client, host, n, CHUNK_BYTES, Timeouts(heartbeat_interval_s=2.0, silent_host_s=TIMEOUT_S))
    start = time.perf_counter()
    mine = make_parts(rows) if parts is None else parts
    if host != 0:
        for header, data in mine:
            link.send_part(header, data)
        link.send_end({"host": host})
        result = {"send_s": time.perf_counter() - start, "bytes": link.bytes_sent}
        client.blocking_key_value_get(f"{prefix}/done", TIMEOUT_S * 1000)
        return result
    spool = leader.Spool()
    try:
        collector = Collector(link, spool.add).start()
        for header, data in mine:
            spool.add(0, header, data)
        arrivals = collector.finish()
        gathered = time.perf_counter()
        merged = leader.write_merged(spool, RunDir(out_dir), [1] * NUM_PROMPTS, "jsonl", _reporting())
        end = time.perf_counter()
    finally:
        spool.close()
    for h in arrivals:  # the next repeat's hosts end again under the same keys
        client.key_value_delete(link._key(h, "end"))
    data = RunDir(out_dir).read_bytes(MERGED_JSONL)
    client.key_value_set(f"{prefix}/done", "ok")
    return {
        "send_s": 0.0,
        "bytes": 0,
        "gather_s": gathered - start,
        "merge_s": end - gathered,
        "bytes_all": sum(a.bytes for a in arrivals.values()),
        "rows_merged": merged.rows,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _reference(client, host: int, n: int, rows: list[dict], parts: list | None, prefix: str, out_dir: str) -> dict:
    """The seed's path: every host's rows as JSON -> zlib (default level) -> base64 through string keys."""
    from levanter_multihost.rundir import MERGED_JSONL, RunDir

    start = time.perf_counter()
    blob = base64.b64encode(zlib.compress(json.dumps({"rows": rows}).encode("utf-8"))).decode("ascii")
    client.key_value_set(f"{prefix}/host{host}", blob)
    result = {"send_s": time.perf_counter() - start, "bytes": len(blob)}
    if host != 0:
        client.blocking_key_value_get(f"{prefix}/done", TIMEOUT_S * 1000)
        return result
    got, total = [], 0
    for h in range(n):
        text = client.blocking_key_value_get(f"{prefix}/host{h}", TIMEOUT_S * 1000)
        total += len(text)
        got.extend(json.loads(zlib.decompress(base64.b64decode(text)).decode("utf-8"))["rows"])
        client.key_value_delete(f"{prefix}/host{h}")
    gathered = time.perf_counter()
    merged = _seed_merge(got)
    RunDir(out_dir).write_atomic(MERGED_JSONL, merged)
    end = time.perf_counter()
    client.key_value_set(f"{prefix}/done", "ok")
    return {
        **result,
        "gather_s": gathered - start,
        "merge_s": end - gathered,
        "bytes_all": total,
        "rows_merged": len(got),
        "sha256": hashlib.sha256(merged).hexdigest(),
    }


def _seed_merge(rows: list[dict]) -> bytes:
    """The seed's merge of decoded rows: sort the dicts, completeness check, one JSON line each."""
    from levanter_multihost import outputs

    ordered = sorted(rows, key=lambda r: (r["global_prompt_index"], r["generation_index"]))
    completeness = outputs.Completeness([1] * NUM_PROMPTS)
    for r in ordered:
        completeness.see((r["global_prompt_index"], r["generation_index"]))
    completeness.check()
    return b"".join(outputs.row_line(r) for r in ordered)


def worker(repeats: int) -> None:
    import jax
    from jax._src import distributed

    from levanter_multihost import leader  # noqa: F401 - imported here, before any clock starts
    from levanter_multihost.coordination import Coordinator
    from levanter_multihost.runplan import Timeouts
    from levanter_multihost.sharding import contiguous_shard

    jax.distributed.initialize(
        os.environ["LEVANTER_MULTIHOST_COORDINATOR"],
        int(os.environ["LEVANTER_MULTIHOST_NUM_PROCESSES"]),
        int(os.environ["LEVANTER_MULTIHOST_PROCESS_ID"]),
    )
    host, n = jax.process_index(), jax.process_count()
    client = distributed.global_state.client
    # every host beats for the whole bench, as in the sampler (the collector names a host whose beat stops)
    beat = Coordinator(client, host, n, CHUNK_BYTES, Timeouts(2.0, TIMEOUT_S)).start_heartbeat()
    rows = [synthetic_row(i, n) for i in contiguous_shard(NUM_PROMPTS, n, host)]
    parts = make_parts(rows)  # the parts' bytes, which the sampler has made (and made durable) before it sends
    sizes = {
        "raw_json_bytes": len(json.dumps({"rows": rows}, separators=(",", ":")).encode("utf-8")),
        "jsonl_bytes": sum(len(data) for _, data in parts),
    }
    transports = {"project": _project, "project+jsonl": _project, "reference": _reference}
    results = []
    out_dir = tempfile.mkdtemp(prefix="gather_cost_")
    for rep in range(repeats):
        order = TRANSPORTS[rep % 3 :] + TRANSPORTS[: rep % 3]
        for name in order:
            prefix = f"bench_gather/{rep}/{name}"
            client.wait_at_barrier(f"{prefix}/start", TIMEOUT_S * 1000)
            given = None if name == "project+jsonl" else parts
            res = transports[name](client, host, n, rows, given, prefix, out_dir)
            stats = {"send_s": res["send_s"], "bytes": res["bytes"]}
            client.key_value_set(f"{prefix}/stats{host}", json.dumps(stats))
            if host == 0:
                stats = [json.loads(client.blocking_key_value_get(f"{prefix}/stats{h}", 60000)) for h in range(n)]
                results.append(
                    {
                        "repeat": rep,
                        "transport": name,
                        "gather_s": res["gather_s"],
                        "merge_s": res["merge_s"],
                        "total_s": res["gather_s"] + res["merge_s"],
                        "bytes": res["bytes_all"],
                        "send_s_per_host": [s["send_s"] for s in stats],
                        "rows_merged": res["rows_merged"],
                        "merged_sha256": res["sha256"],
                    }
                )
            client.wait_at_barrier(f"{prefix}/end", TIMEOUT_S * 1000)
    totals = {key: client.key_value_increment(f"bench_gather/{key}", value) for key, value in sizes.items()}
    client.wait_at_barrier("bench_gather/sizes", TIMEOUT_S * 1000)
    beat.set()
    shutil.rmtree(out_dir, ignore_errors=True)
    if host == 0:
        totals = {key: client.key_value_increment(f"bench_gather/{key}", 0) for key in sizes}
        print("RESULT " + json.dumps({"hosts": n, **totals, "results": results}), flush=True)


# ------------------------------------------------------------------------------------------------------- driver


def single_core_costs(hosts: int, repeats: int = 3) -> dict:
    """Each step of both paths in this process, on one core, median: one host's rows (encode, decode) or all of
    them (merge and write)."""
    from levanter_multihost import leader  # noqa: F401 - imported here, before any clock starts
    from levanter_multihost.payload import decode_payload, encode_payload
    from levanter_multihost.rundir import MERGED_JSONL, RunDir
    from levanter_multihost.sharding import contiguous_shard

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    all_rows = [[synthetic_row(i, hosts) for i in contiguous_shard(NUM_PROMPTS, hosts, h)] for h in range(hosts)]
    parts_by_host = [make_parts(rows) for rows in all_rows]
    rows = all_rows[0]
    out_dir = tempfile.mkdtemp(prefix="gather_cost_single_")

    def ref_merge():
        RunDir(out_dir).write_atomic(MERGED_JSONL, _seed_merge([r for host_rows in all_rows for r in host_rows]))

    steps = {
        "jsonl": lambda: make_parts(rows),
        "project_encode": lambda: [encode_payload(0, header, data, CHUNK_BYTES) for header, data in parts_by_host[0]],
        "project_merge": lambda: write_merged(parts_by_host, out_dir),
        "ref_encode": lambda: base64.b64encode(zlib.compress(json.dumps({"rows": rows}).encode("utf-8"))),
        "ref_merge": ref_merge,
    }
    encoded = steps["project_encode"]()
    text = steps["ref_encode"]().decode("ascii")
    steps["project_decode"] = lambda: [decode_payload(manifest, chunks) for manifest, chunks in encoded]
    steps["ref_decode"] = lambda: json.loads(zlib.decompress(base64.b64decode(text)).decode("utf-8"))
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {key: statistics.median(v) for key, v in times.items()}


def summarize(results: list[dict]) -> dict:
    """Medians per transport and the per-repeat ratios reference / project."""
    summary: dict = {}
    for name in TRANSPORTS:
        mine = [r for r in results if r["transport"] == name]
        summary[name] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("gather_s", "merge_s", "total_s", "bytes", "send_max_s", "fraction_of_seed")
        }
    pairs: dict[int, dict[str, dict]] = {}
    for r in results:
        pairs.setdefault(r["repeat"], {})[r["transport"]] = r
    for name in ("project", "project+jsonl"):
        ratios = [p["reference"]["total_s"] / p[name]["total_s"] for p in pairs.values()]
        summary[f"speedup_{name}"] = statistics.median(ratios)
        summary[f"speedup_{name}_each"] = ratios
    summary["bytes_ratio"] = summary["reference"]["bytes"] / summary["project"]["bytes"]
    return summary


def main() -> None:
    from _common import RESULTS, SEED_GENERATION_S, Report, cores, host_env, pinned_launch_command, pinning_note

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6, help="each repeat runs every transport once")
    parser.add_argument("--out", default=str(RESULTS / "gather_cost.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats)
        return
    report = Report("gather_cost", args)
    here = Path(__file__).resolve()
    core_list = cores()
    command = pinned_launch_command(
        args.hosts, [sys.executable, str(here), "--worker", "--repeats", str(args.repeats)]
    )
    env = host_env(BENCH_CORES=",".join(map(str, core_list)))
    start = time.time()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, check=False)
    wall = time.time() - start
    lines = [line for line in proc.stdout.splitlines() if "RESULT " in line]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"gather bench failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(lines[-1].split("RESULT ", 1)[1])
    results = data["results"]
    digests = {r["merged_sha256"] for r in results}
    if len(digests) != 1 or {r["rows_merged"] for r in results} != {NUM_PROMPTS}:
        raise SystemExit(f"the paths wrote different merged.jsonl files: {digests}")
    for r in results:
        r["send_max_s"] = max(r["send_s_per_host"])
        r["fraction_of_seed"] = r["total_s"] / SEED_GENERATION_S
        r["MB"] = r["bytes"] / 1e6
    print(
        f"{args.hosts} hosts ({pinning_note(args.hosts, core_list)}), {NUM_PROMPTS} rows x 2048 tokens; "
        f"raw compact JSON {data['raw_json_bytes'] / 1e6:.1f} MB, parts' JSONL {data['jsonl_bytes'] / 1e6:.1f} MB; "
        "merged.jsonl identical on every path"
    )
    report.table("Every repeat", results, COLUMNS)
    summary = summarize(results)
    summary["single_core"] = one = single_core_costs(args.hosts)
    rows = [dict(transport=name, **summary[name]) for name in TRANSPORTS]
    for row in rows:
        row["MB"] = row["bytes"] / 1e6
    report.table("Medians", rows, COLUMNS[1:])
    print(
        f"\nreference / project (gather + merge): {summary['speedup_project']:.2f}x (each repeat: "
        f"{', '.join(f'{x:.2f}' for x in summary['speedup_project_each'])}); counting the JSONL: "
        f"{summary['speedup_project+jsonl']:.2f}x; bytes {summary['bytes_ratio']:.2f}x. Gather + merge = "
        f"{100 * summary['project']['fraction_of_seed']:.2f}% of the seed's {SEED_GENERATION_S:.0f} s "
        f"({100 * summary['project+jsonl']['fraction_of_seed']:.2f}% counting the JSONL) vs "
        f"{100 * summary['reference']['fraction_of_seed']:.2f}% for the reference"
    )
    others = args.hosts - 1
    estimate = {
        "project": one["project_encode"] + others * one["project_decode"] + one["project_merge"],
        "reference": one["ref_encode"] + args.hosts * one["ref_decode"] + one["ref_merge"],
    }
    estimate["project+jsonl"] = estimate["project"] + one["jsonl"]
    summary["core_per_host_estimate_s"] = estimate
    print(
        "one host's rows on one core (no other host running): "
        + ", ".join(f"{key} {value:.3f}s" for key, value in one.items() if "merge" not in key)
        + f"; merging and writing all {NUM_PROMPTS} rows: project {one['project_merge']:.3f}s, "
        f"reference {one['ref_merge']:.3f}s.\n"
        f"With a core per host, the leader's path is about encode + {others} x decode + merge = "
        f"{estimate['project']:.2f}s = {100 * estimate['project'] / SEED_GENERATION_S:.2f}% (project; "
        f"{estimate['project+jsonl']:.2f}s = {100 * estimate['project+jsonl'] / SEED_GENERATION_S:.2f}% with the "
        f"JSONL) vs encode + {args.hosts} x decode + merge = {estimate['reference']:.2f}s = "
        f"{100 * estimate['reference'] / SEED_GENERATION_S:.2f}% (reference), before transfer and the write."
    )
    report.write(
        args.out,
        hosts=args.hosts,
        rows=NUM_PROMPTS,
        raw_json_bytes=data["raw_json_bytes"],
        parts_jsonl_bytes=data["jsonl_bytes"],
        batch_rows=BATCH_ROWS,
        launcher_wall_s=wall,
        results=results,
        summary=summary,
    )


COLUMNS = [
    ("repeat", "rep", "{:d}"),
    ("transport", "transport", "{}"),
    ("MB", "MB sent", "{:.2f}"),
    ("send_max_s", "slowest send s", "{:.3f}"),
    ("gather_s", "gather s", "{:.3f}"),
    ("merge_s", "merge+write s", "{:.3f}"),
    ("total_s", "total s", "{:.3f}"),
    ("fraction_of_seed", "of the seed's 107 s round", "{:.2%}"),
]

if __name__ == "__main__":
    main()
