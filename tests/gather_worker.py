"""One emulated host of the JAX key-value gather test (run by tests/test_gather_jax.py through infra/launch.py).

python infra/launch.py --local_hosts 3 --devices_per_host 1 -- python tests/gather_worker.py ok|corrupt|silent
"""

import json
import os
import sys

import jax
from synthetic_rows import synthetic_row

from levanter_multihost.gather import GatherError, KvGather, for_this_job
from levanter_multihost.outputs import jsonl_bytes, merge_jsonl, parse_jsonl
from levanter_multihost.payload import PayloadError, encode_payload
from levanter_multihost.sharding import contiguous_shard

mode = sys.argv[1]
jax.distributed.initialize(
    os.environ["LEVANTER_MULTIHOST_COORDINATOR"],
    int(os.environ["LEVANTER_MULTIHOST_NUM_PROCESSES"]),
    int(os.environ["LEVANTER_MULTIHOST_PROCESS_ID"]),
)
host, n = jax.process_index(), jax.process_count()
if mode == "largest":  # as the sampler does it: the leader keeps its own shard and merges the others' lines
    gather = for_this_job(n, chunk_bytes=4 * 1024 * 1024, prefix="test/largest")
    own = jsonl_bytes(synthetic_row(i, n) for i in contiguous_shard(1024, n, host))
    if host != 0:
        gather.send(host, {"metrics": {"host": host}}, own)
        gather.wait_for("done", 120)
        sys.exit(0)
    got = gather.collect(timeout_s=120, hosts=range(1, n))
    merged = parse_jsonl(merge_jsonl([own] + [got[h].data for h in range(1, n)], 1024, 1))
    exact = [row["global_prompt_index"] for row in merged] == list(range(1024)) and all(
        row == synthetic_row(row["global_prompt_index"], n) for row in merged
    )
    headers = all(got[h].header == {"metrics": {"host": h}} for h in range(1, n))
    gather.publish("done", True)
    result = {"rows": len(merged), "exact": exact, "headers": headers, "bytes": sum(g.bytes for g in got.values())}
    print("RESULT " + json.dumps(result))
    sys.exit(0)

gather: KvGather = for_this_job(n, chunk_bytes=1000, prefix=f"test/{mode}")
rows = [{"global_prompt_index": host * 1000 + i, "generated_token_ids": list(range(i, i + 300))} for i in range(40)]
data = json.dumps(rows).encode("utf-8")
header = {"metrics": {"host": host}}

if host != 0:
    if mode == "corrupt" and host == 1:
        manifest, chunks = encode_payload(host, header, data, gather.chunk_bytes)
        chunks[2] = chunks[2][:-1] + bytes([chunks[2][-1] ^ 0xFF])
        for i, chunk in enumerate(chunks):
            gather.client.key_value_set_bytes(f"test/{mode}/host{host:05d}/chunk{i:06d}", chunk)
        gather.client.key_value_set_bytes(f"test/{mode}/host{host:05d}/manifest", manifest.to_bytes())
    elif not (mode == "silent" and host == 2):
        gather.send(host, header, data)
    gather.wait_for("done", 60)
    sys.exit(0)

gather.send(0, header, data)  # the transport carries the leader's own payload too, though the sampler keeps it
try:
    got = gather.collect(timeout_s=3 if mode == "silent" else 60)
    result = {
        "ok": True,
        "hosts": sorted(got),
        "rows": {h: json.loads(got[h].data) for h in got},
        "headers": {h: got[h].header for h in got},
        "chunks": {h: got[h].bytes for h in got},
    }
except (GatherError, PayloadError) as e:
    result = {"ok": False, "error": str(e)}
gather.publish("done", True)
print("RESULT " + json.dumps(result))
