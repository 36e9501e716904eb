"""One emulated host of tests/test_gather_jax.py: Coordinator and Collector over JAX's real key-value store.

    python tests/gather_worker.py MODE OUT_DIR SILENT_HOST_S    (environment: launch_env's three variables)

Each host prints one ``RESULT {json}`` line. Modes (host 0 leads):

* ``parts``: every other host sends ``PARTS`` parts of many chunks; the leader checks each arrived exactly, in
  order, and that every key was deleted once read.
* ``corrupt``: host 1 puts a part with a flipped byte in chunk 2; the leader names it, and its failure reaches host
  1 waiting for DONE.
* ``largest``: the seed's largest shape (1024 rows x 2048 tokens over 4 hosts, two parts each) through the
  collector, the leader's spool and ``write_merged``, checked byte for byte.

Hosts leave through :func:`leave`: the leader's process serves the store, so it waits for the others' goodbye
before it exits (a host that loses the store is killed by JAX), and nobody runs JAX's shutdown barrier.
"""

import json
import os
import random
import sys
import time

import jax
from jax._src import distributed
from synthetic_rows import synthetic_row

from levanter_multihost.collector import Collector
from levanter_multihost.coordination import DONE, READY, CoordinationError, Coordinator
from levanter_multihost.launch_env import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from levanter_multihost.payload import PayloadError, encode_payload
from levanter_multihost.runplan import Timeouts

PARTS = 6
PART_BYTES = 30_000
CHUNK_BYTES = 1000
LARGEST_PROMPTS = 1024
BYE_TIMEOUT_MS = 120_000


def part_data(host: int, batch: int) -> bytes:
    """Incompressible bytes, so every part is ~30 chunks (the transport does not look inside)."""
    return random.Random(host * 1000 + batch).randbytes(PART_BYTES)


def result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def leave(link: Coordinator, others: list[int], code: int = 0) -> None:
    """Exit without JAX's shutdown barrier; the leader first waits for the goodbye of every host in ``others``."""
    client = link.client
    if link.is_leader:
        for h in others:
            client.blocking_key_value_get_bytes(f"test/bye/{h}", BYE_TIMEOUT_MS)
        time.sleep(0.2)  # their os._exit follows their goodbye
    else:
        client.key_value_set_bytes(f"test/bye/{link.host}", b"1")
    sys.stdout.flush()
    os._exit(code)


def parts(link: Coordinator) -> None:
    if not link.is_leader:
        link.wait_for(READY)
        for b in range(PARTS):
            link.send_part({"kind": "batch", "batch": b}, part_data(link.host, b))
        link.send_end({"host": link.host, "bytes_sent": link.bytes_sent})
        result(message=link.wait_for(DONE))
        leave(link, [])
    received: dict[int, list] = {h: [] for h in range(1, link.num_hosts)}
    collector = Collector(link, lambda h, header, data: received[h].append((header, data))).start()
    link.announce(READY, {"attempt": "0000000a"})
    arrivals = collector.finish()
    exact = all(
        received[h] == [({"kind": "batch", "batch": b}, part_data(h, b)) for b in range(PARTS)] for h in received
    )
    keys = [
        link._key(h, f"part{b:06d}", name)
        for h in received
        for b in range(PARTS)
        for name in ("manifest", "chunk000000", "chunk000001")
    ]
    result(
        exact=exact,
        parts={h: a.parts for h, a in arrivals.items()},
        bytes={h: a.bytes for h, a in arrivals.items()},
        ends={h: a.end for h, a in arrivals.items()},
        left=[k for k in keys if link._try_get(k) is not None],
    )
    link.announce(DONE, {})
    leave(link, list(received))


def corrupt(link: Coordinator) -> None:
    if link.is_leader:
        collector = Collector(link, lambda h, header, data: None).start()
        try:
            collector.finish()
            result(error=None)
        except PayloadError as e:
            result(error=str(e))
            link.announce_failure(f"{type(e).__name__}: {e}")
        leave(link, [1])
    manifest, chunks = encode_payload(1, {"kind": "batch", "batch": 0}, part_data(1, 0), CHUNK_BYTES)
    chunks[2] = chunks[2][:-1] + bytes([chunks[2][-1] ^ 0xFF])
    for i, chunk in enumerate(chunks):
        link.client.key_value_set_bytes(link._key(1, "part000000", f"chunk{i:06d}"), chunk)
    link.client.key_value_set_bytes(link._key(1, "part000000", "manifest"), manifest.to_bytes())
    link.send_end({})
    try:
        link.wait_for(DONE)
        result(error=None)
    except CoordinationError as e:
        result(error=str(e))
    leave(link, [])


def largest(link: Coordinator, out_dir: str) -> None:
    from levanter_multihost.outputs import row_line
    from levanter_multihost.sharding import contiguous_shard

    n = link.num_hosts
    share = contiguous_shard(LARGEST_PROMPTS, n, link.host)
    half = len(share) // 2
    batches = (share[:half], share[half:])
    mine = [(b, [row_line(synthetic_row(i, n)) for i in indices]) for b, indices in enumerate(batches)]
    if not link.is_leader:
        for b, lines in mine:
            link.send_part({"kind": "batch", "batch": b, "rows": len(lines)}, b"".join(lines))
        link.send_end({"host": link.host})
        link.wait_for(DONE)
        leave(link, [])
    from levanter_multihost import leader
    from levanter_multihost.rundir import RunDir
    from levanter_multihost.runplan import Reporting

    spool = leader.Spool()
    headers = []
    collector = Collector(link, lambda h, header, data: (headers.append((h, header)), spool.add(h, header, data)))
    collector.start()
    for b, lines in mine:
        spool.add(0, {"kind": "batch", "batch": b, "rows": len(lines)}, b"".join(lines))
    arrivals = collector.finish()
    reporting = Reporting(
        tracker=None,
        run_name="largest",
        run_id=None,
        config={},
        samples_table_rows=2,
        task=None,
        progress_interval_s=0.0,
    )
    merged = leader.write_merged(spool, RunDir(out_dir), [1] * LARGEST_PROMPTS, "jsonl", reporting)
    spool.close()
    data = RunDir(out_dir).read_bytes("merged.jsonl")
    exact = data == b"".join(row_line(synthetic_row(i, n)) for i in range(LARGEST_PROMPTS))
    result(
        rows=merged.rows,
        exact=exact,
        samples=[r["global_prompt_index"] for r in merged.samples],
        headers=sorted((h, hd["batch"], hd["rows"]) for h, hd in headers),
        bytes=sum(a.bytes for a in arrivals.values()),
    )
    link.announce(DONE, {})
    leave(link, list(range(1, n)))


def main() -> None:
    mode, out_dir, silent_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
    jax.distributed.initialize(
        os.environ[ENV_COORDINATOR], int(os.environ[ENV_NUM_PROCESSES]), int(os.environ[ENV_PROCESS_ID])
    )
    chunk_bytes = 4 * 1024 * 1024 if mode == "largest" else CHUNK_BYTES
    timeouts = Timeouts(heartbeat_interval_s=min(0.25, silent_s / 4), silent_host_s=silent_s)
    link = Coordinator(
        distributed.global_state.client, jax.process_index(), jax.process_count(), chunk_bytes, timeouts
    )
    link.start_heartbeat()
    if mode == "largest":
        largest(link, out_dir)
    else:
        {"parts": parts, "corrupt": corrupt}[mode](link)


if __name__ == "__main__":
    main()
