"""Row payloads: chunking, manifests and checksums, and the gather over an in-process key-value store."""

import threading

import pytest

from levanter_multihost.gather import GatherError, InMemoryKeyValue, KvGather
from levanter_multihost.payload import PayloadError, decode_payload, encode_payload


def rows(n, tokens=50):
    return [
        {"global_prompt_index": i, "generated_token_ids": list(range(i, i + tokens)), "text": "é" * 5}
        for i in range(n)
    ]


def test_many_chunk_payload_round_trips_exactly():
    body = {"rows": rows(300), "metrics": {"host": 2}}
    manifest, chunks = encode_payload(2, body, chunk_bytes=100)
    assert manifest.num_chunks == len(chunks) > 10
    assert sum(manifest.chunk_sizes) == manifest.total_bytes
    assert decode_payload(manifest, chunks) == body


def test_corrupted_truncated_and_missing_chunks_are_named():
    manifest, chunks = encode_payload(3, {"rows": rows(100)}, chunk_bytes=64)
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


def test_gather_collects_every_host_and_deletes_its_keys():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=3, chunk_bytes=128)
    for host in range(3):
        gather.send(host, {"rows": rows(20 * host), "metrics": {"host": host}})
    got = gather.collect(timeout_s=5)
    assert sorted(got) == [0, 1, 2]
    assert got[2].body["rows"] == rows(40)
    assert kv.store == {}


def test_gather_names_a_corrupted_chunk_in_the_store():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=1, chunk_bytes=64)
    gather.send(0, {"rows": rows(30)})
    key = "run/host00000/chunk000003"
    kv.store[key] = kv.store[key][:-3] + b"xyz"
    with pytest.raises(PayloadError, match="Host 0 chunk 3/"):
        gather.collect(timeout_s=5)


def test_gather_names_failed_and_silent_hosts_within_the_timeout():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=3)
    gather.send(0, {"rows": []})
    gather.send_failure(1, "ValueError: boom")
    with pytest.raises(
        GatherError, match=r"host 1 failed: ValueError: boom; host\(s\) \[2\] sent no rows and no heartbeat for"
    ):
        gather.collect(timeout_s=0.3)


def test_a_slow_host_with_a_heartbeat_is_waited_for():
    kv = InMemoryKeyValue()
    gather = KvGather(kv, "run", num_hosts=2)
    gather.send(0, {"rows": []})
    alive = gather.heartbeat(1, interval_s=0.05)
    timer = threading.Timer(1.0, lambda: (gather.send(1, {"rows": rows(3)}), alive.set()))
    timer.start()
    got = gather.collect(timeout_s=0.3)
    timer.join()
    assert got[1].body["rows"] == rows(3)
