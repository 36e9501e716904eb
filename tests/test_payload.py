"""Shard payloads: header and bytes, chunking, manifests and checksums, and the gather over an in-process store."""

import hashlib
import json
import threading
import zlib

import pytest

from levanter_multihost.gather import GatherError, InMemoryKeyValue, KvGather
from levanter_multihost.payload import Manifest, PayloadError, decode_payload, encode_payload


def shard(n, tokens=50):
    """``n`` JSON lines of the size of real rows (not the row schema: the payload does not look inside)."""
    rows = [
        {"global_prompt_index": i, "generated_token_ids": list(range(i, i + tokens)), "text": "é\n" * 5}
        for i in range(n)
    ]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def test_many_chunk_payload_round_trips_exactly():
    header = {"metrics": {"host": 2, "phases": {"write": [1.0, 2.5]}}}
    manifest, chunks = encode_payload(2, header, shard(300), chunk_bytes=100)
    assert manifest.num_chunks == len(chunks) > 10
    assert sum(manifest.chunk_sizes) == manifest.total_bytes
    assert decode_payload(manifest, chunks) == (header, shard(300))


def test_empty_data_and_data_with_newlines_round_trip():
    for data in (b"", b"\n", b"\n\nline\n", bytes(range(256))):
        manifest, chunks = encode_payload(1, {"metrics": {}}, data, chunk_bytes=7)
        assert decode_payload(manifest, chunks) == ({"metrics": {}}, data)


def test_corrupted_truncated_and_missing_chunks_are_named():
    manifest, chunks = encode_payload(3, {"metrics": {}}, shard(100), chunk_bytes=64)
    bad = list(chunks)
    bad[5] = bytes([bad[5][0] ^ 1]) + bad[5][1:]
    with pytest.raises(PayloadError, match=r"Host 3 chunk 5/\d+: checksum mismatch"):
        decode_payload(manifest, bad)
    bad = list(chunks)
    bad[2] = bad[2][:-1]
    with pytest.raises(PayloadError, match=r"Host 3 chunk 2/\d+: \d+ bytes, expected"):
        decode_payload(manifest, bad)
    with pytest.raises(PayloadError, match="Host 3: got"):
        decode_payload(manifest, chunks[:-1])


def test_a_payload_without_a_json_object_header_is_refused():
    for blob in (zlib.compress(b"[1, 2]\nx"), zlib.compress(b"no header"), b"not zlib"):
        manifest = Manifest(4, "ok", 1, [len(blob)], [hashlib.sha256(blob).hexdigest()], len(blob))
        with pytest.raises(PayloadError, match="Host 4: payload does not"):
            decode_payload(manifest, [blob])


def test_gather_collects_the_hosts_asked_for_and_deletes_their_keys():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=3, chunk_bytes=128)
    for host in (1, 2):
        gather.send(host, {"metrics": {"host": host}}, shard(20 * host))
    got = gather.collect(timeout_s=5, hosts=range(1, 3))
    assert sorted(got) == [1, 2]
    assert got[2].header == {"metrics": {"host": 2}}
    assert got[2].data == shard(40)
    assert got[2].bytes > 128
    assert kv.store == {}


def test_gather_names_a_corrupted_chunk_in_the_store():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=2, chunk_bytes=64)
    gather.send(1, {"metrics": {}}, shard(30))
    key = "run/host00001/chunk000003"
    kv.store[key] = kv.store[key][:-3] + b"xyz"
    with pytest.raises(PayloadError, match="Host 1 chunk 3/"):
        gather.collect(timeout_s=5, hosts=[1])


def test_gather_names_failed_and_silent_hosts_within_the_timeout():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=4)
    gather.send(1, {"metrics": {}}, b"")
    gather.send_failure(2, "ValueError: boom")
    with pytest.raises(
        GatherError, match=r"host 2 failed: ValueError: boom; host\(s\) \[3\] sent no rows and no heartbeat for"
    ):
        gather.collect(timeout_s=0.3, hosts=range(1, 4))


def test_a_slow_host_with_a_heartbeat_is_waited_for():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=3)
    gather.send(1, {"metrics": {}}, b"")
    alive = gather.heartbeat(2, interval_s=0.05)
    timer = threading.Timer(1.0, lambda: (gather.send(2, {"metrics": {}}, shard(3)), alive.set()))
    timer.start()
    got = gather.collect(timeout_s=0.3, hosts=[1, 2])
    timer.join()
    assert got[2].data == shard(3)
