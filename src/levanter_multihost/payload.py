"""Encoding a host's rows for the trip to the leader, and checking them on arrival.

A payload is JSON (rows plus the host's metrics), zlib-compressed and cut into chunks of at most
``chunk_bytes``. Its manifest records the chunk count, the byte sizes and a SHA-256 per chunk, so a corrupted,
truncated or missing chunk is named (host, chunk) instead of turning into a bad row. Payloads are only ever
parsed as JSON: never unpickled or evaluated. This module knows nothing of the transport (see
:mod:`levanter_multihost.gather`). No JAX import.
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
    status: str
    """``ok``, or ``failed`` when the host sends an error instead of rows."""
    num_chunks: int
    """How many chunks follow."""
    chunk_sizes: list[int]
    """Byte size of each chunk."""
    chunk_sha256: list[str]
    """Hex SHA-256 of each chunk."""
    total_bytes: int
    """Sum of ``chunk_sizes``: the compressed payload size."""
    error: str | None = None
    """The host's error message when ``status == "failed"``."""

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
    host: int, body: dict[str, Any], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[Manifest, list[bytes]]:
    """Serialize ``body`` (JSON-able) into chunks and the manifest that describes them."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes ({chunk_bytes}) must be >= 1.")
    blob = zlib.compress(json.dumps(body, separators=(",", ":")).encode("utf-8"), COMPRESSION_LEVEL)
    chunks = [blob[i : i + chunk_bytes] for i in range(0, len(blob), chunk_bytes)] or [b""]
    manifest = Manifest(
        host=host,
        status="ok",
        num_chunks=len(chunks),
        chunk_sizes=[len(c) for c in chunks],
        chunk_sha256=[hashlib.sha256(c).hexdigest() for c in chunks],
        total_bytes=len(blob),
    )
    return manifest, chunks


def failure_manifest(host: int, error: str) -> Manifest:
    """A manifest that carries a host's error instead of rows."""
    return Manifest(
        host=host, status="failed", num_chunks=0, chunk_sizes=[], chunk_sha256=[], total_bytes=0, error=error
    )


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


def decode_payload(manifest: Manifest, chunks: list[bytes]) -> dict[str, Any]:
    """Verify every chunk against ``manifest`` and return the decoded body."""
    if len(chunks) != manifest.num_chunks:
        raise PayloadError(f"Host {manifest.host}: got {len(chunks)} chunks, manifest says {manifest.num_chunks}.")
    for i, chunk in enumerate(chunks):
        verify_chunk(manifest, i, chunk)
    try:
        return json.loads(zlib.decompress(b"".join(chunks)).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(f"Host {manifest.host}: payload does not decode ({e}).") from None
