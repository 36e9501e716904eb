"""Gather cost at the seed's largest shape: this project's transport vs the reference encoding, in one run.

    uv run python bench/gather_cost.py                   # ~1-2 min on 2 cores; JSON to bench/results/gather_cost.json
    uv run python bench/gather_cost.py --repeats 5 --out /tmp/gather.json

1024 rows of 2048 generated token ids (plus text of matching size; the same synthetic rows as
``tests/gather_worker.py``'s ``synthetic_row``) spread over 4 emulated hosts (``infra/launch.py --local_hosts 4``,
JAX distributed on loopback, host i pinned to core i % cores by ``bench/pin.py``). In the same 4 processes,
alternating the order each repeat, every host sends its 256 rows to the leader with

* project: ``levanter_multihost.gather.KvGather`` (``payload.encode_payload``: compact JSON + zlib level 1, 4 MiB
  chunks with SHA-256 in a manifest, ``key_value_set_bytes`` / ``blocking_key_value_get_bytes``, keys deleted);
* reference: ``json.dumps`` (default separators) -> ``zlib.compress`` (default level) -> base64, one string key
  per host through ``key_value_set`` / ``blocking_key_value_get`` (keys deleted too).

Both start from a barrier (``wait_at_barrier``); the leader's clock runs from the barrier to every payload
decoded ("gather"), then ``outputs.merge_rows`` + ``outputs.jsonl_bytes`` + writing ``merged.jsonl`` ("merge",
the same code for both). Each host also reports its own encode+send time. The ratio is the median over repeats
of reference / project, each pair measured back to back in the same processes. Also reported: gather + merge as
a fraction of the seed's 107 s of generation per host.

Caveat: 4 hosts share 2 cores here, and loopback is not the data-center network between TPU hosts; the bytes
column says what would cross it.
"""

import argparse
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NUM_PROMPTS = 1024
TIMEOUT_S = 300


def synthetic_row(index: int, num_hosts: int) -> dict:
    """A row of the seed's largest shape (identical to tests/gather_worker.py's synthetic_row)."""
    rng = random.Random(index)
    ids = [rng.randrange(128256) for _ in range(2048)]
    return {
        "global_prompt_index": index,
        "generation_index": 0,
        "process_index": index * num_hosts // 1024,
        "prompt": f"Prompt number {index}: " + "tell me a long story. " * 8,
        "prompt_token_count": 60,
        "generated_token_ids": ids,
        "generated_text": " ".join(str(t) for t in ids[:1500]),
        "generated_token_count": 2048,
        "finish_reason": "length",
    }


# --------------------------------------------------------------------------------------------- worker (each host)


def _merge_and_write(rows: list[dict], out_dir: str) -> tuple[float, int]:
    from levanter_multihost import outputs

    start = time.perf_counter()
    merged = outputs.merge_rows(rows, NUM_PROMPTS, 1)
    data = outputs.jsonl_bytes(merged)
    outputs.write_atomic(os.path.join(out_dir, "merged.jsonl"), data)
    return time.perf_counter() - start, len(merged)


def _project(client, host: int, n: int, rows: list[dict], prefix: str) -> dict:
    from levanter_multihost.gather import KvGather

    kv = KvGather(client, prefix, n)
    start = time.perf_counter()
    sent = kv.send(host, {"rows": rows})
    result = {"send_s": time.perf_counter() - start, "bytes": sent.bytes_sent, "chunks": sent.num_chunks}
    if host != 0:
        kv.wait_for("done", TIMEOUT_S)
        return result
    got = kv.collect(TIMEOUT_S)
    result["gather_s"] = time.perf_counter() - start
    result["bytes_all"] = sum(g.bytes for g in got.values())
    result["rows"] = [r for h in sorted(got) for r in got[h].body["rows"]]
    kv.publish("done", True)
    return result


def _reference(client, host: int, n: int, rows: list[dict], prefix: str) -> dict:
    start = time.perf_counter()
    blob = base64.b64encode(zlib.compress(json.dumps({"rows": rows}).encode("utf-8"))).decode("ascii")
    client.key_value_set(f"{prefix}/host{host}", blob)
    result = {"send_s": time.perf_counter() - start, "bytes": len(blob), "chunks": 1}
    if host != 0:
        client.blocking_key_value_get(f"{prefix}/done", TIMEOUT_S * 1000)
        return result
    got, total = [], 0
    for h in range(n):
        text = client.blocking_key_value_get(f"{prefix}/host{h}", TIMEOUT_S * 1000)
        total += len(text)
        got.extend(json.loads(zlib.decompress(base64.b64decode(text)).decode("utf-8"))["rows"])
        client.key_value_delete(f"{prefix}/host{h}")
    result["gather_s"] = time.perf_counter() - start
    result["bytes_all"] = total
    result["rows"] = got
    client.key_value_set(f"{prefix}/done", "ok")
    return result


def worker(repeats: int) -> None:
    import jax
    from jax._src import distributed

    from levanter_multihost.sharding import contiguous_shard

    jax.distributed.initialize(
        os.environ["LEVANTER_MULTIHOST_COORDINATOR"],
        int(os.environ["LEVANTER_MULTIHOST_NUM_PROCESSES"]),
        int(os.environ["LEVANTER_MULTIHOST_PROCESS_ID"]),
    )
    host, n = jax.process_index(), jax.process_count()
    client = distributed.global_state.client
    rows = [synthetic_row(i, n) for i in contiguous_shard(NUM_PROMPTS, n, host)]
    raw_bytes = len(json.dumps({"rows": rows}, separators=(",", ":")).encode("utf-8"))
    transports = {"project": _project, "reference": _reference}
    results = []
    out_dir = tempfile.mkdtemp(prefix="gather_cost_")
    for rep in range(repeats):
        order = ["project", "reference"] if rep % 2 == 0 else ["reference", "project"]
        for name in order:
            prefix = f"bench_gather/{rep}/{name}"
            client.wait_at_barrier(f"{prefix}/start", TIMEOUT_S * 1000)
            res = transports[name](client, host, n, rows, prefix)
            client.key_value_set(
                f"{prefix}/stats{host}", json.dumps({"send_s": res["send_s"], "bytes": res["bytes"]})
            )
            if host == 0:
                merge_s, merged = _merge_and_write(res.pop("rows"), out_dir)
                stats = [json.loads(client.blocking_key_value_get(f"{prefix}/stats{h}", 60000)) for h in range(n)]
                results.append(
                    {
                        "repeat": rep,
                        "transport": name,
                        "gather_s": res["gather_s"],
                        "merge_s": merge_s,
                        "total_s": res["gather_s"] + merge_s,
                        "bytes": res["bytes_all"],
                        "chunks_host0": res["chunks"],
                        "send_s_per_host": [s["send_s"] for s in stats],
                        "rows_merged": merged,
                    }
                )
            client.wait_at_barrier(f"{prefix}/end", TIMEOUT_S * 1000)
    raw_all = client.key_value_increment("bench_gather/raw_bytes", raw_bytes)
    client.wait_at_barrier("bench_gather/raw", TIMEOUT_S * 1000)
    if host == 0:
        raw_all = client.key_value_increment("bench_gather/raw_bytes", 0)
        print("RESULT " + json.dumps({"hosts": n, "raw_json_bytes": raw_all, "results": results}), flush=True)


# ------------------------------------------------------------------------------------------------------- driver


def single_core_costs(hosts: int, repeats: int = 3) -> dict:
    """Encode (one host's rows) and decode (one payload) of each encoding in this process, on one core, median."""
    from levanter_multihost.payload import decode_payload, encode_payload
    from levanter_multihost.sharding import contiguous_shard

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    body = {"rows": [synthetic_row(i, hosts) for i in contiguous_shard(NUM_PROMPTS, hosts, 0)]}
    times: dict[str, list[float]] = {k: [] for k in ("project_encode", "project_decode", "ref_encode", "ref_decode")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        manifest, chunks = encode_payload(0, body)
        t1 = time.perf_counter()
        decode_payload(manifest, chunks)
        t2 = time.perf_counter()
        text = base64.b64encode(zlib.compress(json.dumps(body).encode("utf-8"))).decode("ascii")
        t3 = time.perf_counter()
        json.loads(zlib.decompress(base64.b64decode(text)).decode("utf-8"))
        t4 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key].append(value)
    return {key: statistics.median(v) for key, v in times.items()}


def main() -> None:
    from _common import RESULTS, SEED_GENERATION_S, cores, format_table, host_env, machine, pinning_note, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default=str(RESULTS / "gather_cost.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats)
        return
    here = Path(__file__).resolve()
    core_list = cores()
    machine_info = machine()
    command = [
        sys.executable, str(here.parents[1] / "infra" / "launch.py"), "--local_hosts", str(args.hosts),
        "--devices_per_host", "1", "--", sys.executable, str(here.parent / "pin.py"),
        sys.executable, str(here), "--worker", "--repeats", str(args.repeats),
    ]  # fmt: skip
    env = host_env(BENCH_CORES=",".join(map(str, core_list)))
    start = time.time()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, check=False)
    wall = time.time() - start
    lines = [line for line in proc.stdout.splitlines() if "RESULT " in line]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"gather bench failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(lines[-1].split("RESULT ", 1)[1])
    results = data["results"]
    for r in results:
        r["send_max_s"] = max(r["send_s_per_host"])
        r["fraction_of_seed"] = r["total_s"] / SEED_GENERATION_S
        r["MB"] = r["bytes"] / 1e6
    print(f"{args.hosts} hosts ({pinning_note(args.hosts, core_list)}), {NUM_PROMPTS} rows x 2048 tokens; "
          f"raw compact JSON {data['raw_json_bytes'] / 1e6:.1f} MB")  # fmt: skip
    print(format_table(results, COLUMNS))
    summary = {}
    for name in ("project", "reference"):
        mine = [r for r in results if r["transport"] == name]
        summary[name] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("gather_s", "merge_s", "total_s", "bytes", "send_max_s", "fraction_of_seed")
        }
    pairs = {}
    for r in results:
        pairs.setdefault(r["repeat"], {})[r["transport"]] = r
    ratios_gather = [p["reference"]["gather_s"] / p["project"]["gather_s"] for p in pairs.values()]
    ratios_total = [p["reference"]["total_s"] / p["project"]["total_s"] for p in pairs.values()]
    summary["speedup_gather"] = statistics.median(ratios_gather)
    summary["speedup_gather_each"] = ratios_gather
    summary["speedup_gather_plus_merge"] = statistics.median(ratios_total)
    summary["bytes_ratio"] = summary["reference"]["bytes"] / summary["project"]["bytes"]
    summary["single_core"] = single_core_costs(args.hosts)
    rows = [dict(transport=name, **summary[name]) for name in ("project", "reference")]
    for row in rows:
        row["MB"] = row["bytes"] / 1e6
    print("\nMedians:")
    print(format_table(rows, SUMMARY_COLUMNS))
    print(
        f"\nreference / project: gather {summary['speedup_gather']:.2f}x (each repeat: "
        f"{', '.join(f'{x:.2f}' for x in ratios_gather)}), gather+merge {summary['speedup_gather_plus_merge']:.2f}x, "
        f"bytes {summary['bytes_ratio']:.2f}x; project gather+merge = "
        f"{100 * summary['project']['fraction_of_seed']:.2f}% of the seed's {SEED_GENERATION_S:.0f} s"
    )
    one = summary["single_core"]
    print(
        f"one host's rows on one core (no other host running): project encode {one['project_encode']:.3f}s, "
        f"decode {one['project_decode']:.3f}s; reference encode {one['ref_encode']:.3f}s, decode "
        f"{one['ref_decode']:.3f}s. With a core per host, the leader's path is about encode + {args.hosts} x decode "
        f"+ merge = {one['project_encode'] + args.hosts * one['project_decode'] + summary['project']['merge_s']:.2f}s "
        f"(project) vs {one['ref_encode'] + args.hosts * one['ref_decode'] + summary['reference']['merge_s']:.2f}s "
        "(reference), before transfer."
    )
    write_json(
        args.out,
        {
            "bench": "gather_cost",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine_info,
            "hosts": args.hosts,
            "rows": NUM_PROMPTS,
            "raw_json_bytes": data["raw_json_bytes"],
            "launcher_wall_s": wall,
            "results": results,
            "summary": summary,
        },
    )


COLUMNS = [
    ("repeat", "rep", "{:d}"),
    ("transport", "transport", "{}"),
    ("MB", "MB sent", "{:.2f}"),
    ("send_max_s", "slowest send s", "{:.3f}"),
    ("gather_s", "gather s", "{:.3f}"),
    ("merge_s", "merge+write s", "{:.3f}"),
    ("total_s", "total s", "{:.3f}"),
    ("fraction_of_seed", "of 107 s", "{:.2%}"),
]
SUMMARY_COLUMNS = [
    ("transport", "transport", "{}"),
    ("MB", "MB sent", "{:.2f}"),
    ("send_max_s", "slowest send s", "{:.3f}"),
    ("gather_s", "gather s", "{:.3f}"),
    ("merge_s", "merge+write s", "{:.3f}"),
    ("total_s", "total s", "{:.3f}"),
    ("fraction_of_seed", "of 107 s", "{:.2%}"),
]

if __name__ == "__main__":
    main()
