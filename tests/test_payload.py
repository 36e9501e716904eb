"""Payload encoding: header and bytes, chunking, manifests and checksums, and every damaged payload named by host
and chunk. (The transport that carries payloads is tested in test_coordination.py and test_gather_jax.py.)"""

import hashlib
import json
import zlib

import pytest

from levanter_multihost.payload import Manifest, PayloadError, decode_payload, encode_payload, verify_chunk


def part_bytes(n, tokens=50):
    """``n`` JSON lines of the size of real rows (not the row schema: the payload does not look inside)."""
    rows = [
        {"global_prompt_index": i, "generated_token_ids": list(range(i, i + tokens)), "text": "é\n\u2028" * 5}
        for i in range(n)
    ]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def test_many_chunk_payload_round_trips_exactly():
    header = {"kind": "batch", "batch": 3, "rows": 300}
    manifest, chunks = encode_payload(2, header, part_bytes(300), chunk_bytes=100)
    assert manifest.host == 2
    assert manifest.num_chunks == len(chunks) > 10
    assert all(len(c) <= 100 for c in chunks)
    assert manifest.chunk_sizes == [len(c) for c in chunks]
    assert sum(manifest.chunk_sizes) == manifest.total_bytes < len(part_bytes(300))  # compressed
    assert decode_payload(manifest, chunks) == (header, part_bytes(300))


def test_empty_data_and_data_with_newlines_round_trip():
    for data in (b"", b"\n", b"\n\nline\n", bytes(range(256))):
        manifest, chunks = encode_payload(1, {}, data, chunk_bytes=7)
        assert decode_payload(manifest, chunks) == ({}, data)


def test_the_manifest_round_trips_as_json_and_checks_its_sender():
    manifest, _ = encode_payload(5, {"kind": "kept"}, part_bytes(10), chunk_bytes=64)
    assert Manifest.from_bytes(manifest.to_bytes(), 5) == manifest
    with pytest.raises(PayloadError, match="Host 4: manifest claims to come from host 5"):
        Manifest.from_bytes(manifest.to_bytes(), 4)
    for raw in (b"not json", b"[1, 2]", b'{"host": 5}', b"\xff"):
        with pytest.raises(PayloadError, match="Host 5: manifest is not valid"):
            Manifest.from_bytes(raw, 5)


def test_corrupted_truncated_and_missing_chunks_are_named():
    manifest, chunks = encode_payload(3, {}, part_bytes(100), chunk_bytes=64)
    bad = list(chunks)
    bad[5] = bytes([bad[5][0] ^ 1]) + bad[5][1:]
    with pytest.raises(PayloadError, match=rf"Host 3 chunk 5/{len(chunks)}: checksum mismatch"):
        decode_payload(manifest, bad)
    with pytest.raises(PayloadError, match=rf"Host 3 chunk 5/{len(chunks)}: checksum mismatch"):
        verify_chunk(manifest, 5, bad[5])
    bad = list(chunks)
    bad[2] = bad[2][:-1]
    with pytest.raises(PayloadError, match=rf"Host 3 chunk 2/{len(chunks)}: 63 bytes, expected 64"):
        decode_payload(manifest, bad)
    with pytest.raises(PayloadError, match=rf"Host 3: got {len(chunks) - 1} chunks, manifest says {len(chunks)}"):
        decode_payload(manifest, chunks[:-1])


def test_a_payload_without_a_json_object_header_is_refused():
    for blob in (zlib.compress(b"[1, 2]\nx"), zlib.compress(b"no header"), b"not zlib"):
        manifest = Manifest(4, 1, [len(blob)], [hashlib.sha256(blob).hexdigest()], len(blob))
        with pytest.raises(PayloadError, match="Host 4: payload does not"):
            decode_payload(manifest, [blob])


def test_a_chunk_size_below_one_byte_is_refused():
    with pytest.raises(ValueError, match=r"chunk_bytes \(0\) must be >= 1"):
        encode_payload(0, {}, b"x", chunk_bytes=0)
