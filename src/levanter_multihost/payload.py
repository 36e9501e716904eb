"""Encoding a part for the trip to the leader, and checking it on arrival.

A payload is a small JSON header (what the part is), a newline, then opaque bytes (the part file, exactly as
written), zlib-compressed and cut into chunks of at most ``chunk_bytes``. Its manifest records the chunk count, the
byte sizes and a SHA-256 per chunk, so a corrupted, truncated or missing chunk is named (host, chunk) instead of
turning into a bad row. Headers are only ever parsed as JSON and the bytes are handed on as they are: nothing is
unpickled or evaluated. This module knows nothing of the transport (see :mod:`levanter_multihost.coordination`)
or of what the bytes hold (see :mod:`levanter_multihost.outputs`). No JAX import.
"""

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
COMPRESSION_LEVEL = 1


class PayloadError(RuntimeError):
    """A payload that does not match its manifest; the message names the host and chunk."""


@dataclass(frozen=True)
class Manifest:
    host: int
    """Process index of the sender."""
    num_chunks: int
    """How many chunks follow."""
    chunk_sizes: list[int]
    """Byte size of each chunk."""
    chunk_sha256: list[str]
    """Hex SHA-256 of each chunk."""
    total_bytes: int
    """Sum of ``chunk_sizes``: the compressed payload size."""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")

    @staticmethod
    def from_bytes(data: bytes, host: int) -> "Manifest":
        try:
            fields = json.loads(data.decode("utf-8"))
            manifest = Manifest(**fields)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise PayloadError(f"Host {host}: manifest is not valid ({e}).") from None
        if manifest.host != host:
            raise PayloadError(f"Host {host}: manifest claims to come from host {manifest.host}.")
        return manifest


def encode_payload(
    host: int, header: dict[str, Any], data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[Manifest, list[bytes]]:
    """Compress ``header`` (JSON-able) and ``data`` into chunks and the manifest that describes them."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes ({chunk_bytes}) must be >= 1.")
    compressor = zlib.compressobj(COMPRESSION_LEVEL)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8") + b"\n"
    blob = compressor.compress(head) + compressor.compress(data) + compressor.flush()
    chunks = [blob[i : i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)] or [b""]
    manifest = Manifest(
        host=host,
        num_chunks=len(chunks),
        chunk_sizes=[len(c) for c in chunks],
        chunk_sha256=[hashlib.sha256(c).hexdigest() for c in chunks],
        total_bytes=len(blob),
    )
    return manifest, chunks


def verify_chunk(manifest: Manifest, index: int, chunk: bytes) -> None:
    """Raise :class:`PayloadError` naming host and chunk if ``chunk`` is not the one the manifest describes."""
    if len(chunk) != manifest.chunk_sizes[index]:
        raise PayloadError(
            f"Host {manifest.host} chunk {index}/{manifest.num_chunks}: {len(chunk)} bytes, "
            f"expected {manifest.chunk_sizes[index]} (truncated or corrupted)."
        )
    if hashlib.sha256(chunk).hexdigest() != manifest.chunk_sha256[index]:
        raise PayloadError(
            f"Host {manifest.host} chunk {index}/{manifest.num_chunks}: checksum mismatch (corrupted)."
        )


def decode_payload(manifest: Manifest, chunks: list[bytes]) -> tuple[dict[str, Any], bytes]:
    """Verify every chunk against ``manifest`` and return the header and the data."""
    if len(chunks) != manifest.num_chunks:
        raise PayloadError(f"Host {manifest.host}: got {len(chunks)} chunks, manifest says {manifest.num_chunks}.")
    for i, chunk in enumerate(chunks):
        verify_chunk(manifest, i, chunk)
    try:
        head, newline, data = zlib.decompress(b"".join(chunks)).partition(b"\n")
        header = json.loads(head.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(f"Host {manifest.host}: payload does not decode ({e}).") from None
    if not newline or not isinstance(header, dict):
        raise PayloadError(f"Host {manifest.host}: payload does not start with a JSON object header and a newline.")
    return header, data
