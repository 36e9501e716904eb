"""Carrying every host's rows to the leader through the JAX distributed key-value store.

Each host writes its chunks with the bytes API, then its manifest (the manifest is the commit point). The leader
polls for manifests until ``timeout_s``, reads and verifies each host's chunks, deletes the keys it read, and
reports hosts that failed (their manifest carries the error), died (no longer live in the coordination service)
or never answered. After merging, the leader publishes a ``done`` key that the other hosts wait for, so nobody
tears the job down while the leader still reads. No collective is used: a host that never arrives cannot hang
the others past the timeout. Encoding lives in :mod:`levanter_multihost.payload`.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from levanter_multihost.payload import (
    DEFAULT_CHUNK_BYTES,
    Manifest,
    PayloadError,
    decode_payload,
    encode_payload,
    failure_manifest,
    verify_chunk,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05


class GatherError(RuntimeError):
    """Some hosts' rows did not arrive; the message names the hosts and why."""


class KeyValueClient(Protocol):
    """The part of JAX's ``DistributedRuntimeClient`` that the gather uses."""

    def key_value_set_bytes(self, key: str, value: bytes) -> None: ...

    def key_value_try_get_bytes(self, key: str) -> bytes: ...

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes: ...

    def key_value_delete(self, key: str) -> None: ...


def jax_kv_client() -> KeyValueClient:
    """The key-value client of the running ``jax.distributed`` job."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: the gather needs its key-value store.")
    return client


@dataclass(frozen=True)
class SendStats:
    bytes_sent: int
    """Compressed payload bytes written to the store."""
    num_chunks: int
    """Chunks written."""
    seconds: float
    """Time to encode and write."""


class KvGather:
    """Sends and collects payloads under keys unique to one run (``prefix``)."""

    def __init__(
        self,
        client: KeyValueClient,
        prefix: str,
        num_hosts: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        live_hosts: Callable[[list[int]], set[int]] | None = None,
    ):
        self.client = client
        self.prefix = prefix
        self.num_hosts = num_hosts
        self.chunk_bytes = chunk_bytes
        self.live_hosts = live_hosts

    def _key(self, host: int, part: str) -> str:
        return f"{self.prefix}/host{host:05d}/{part}"

    def send(self, host: int, body: dict[str, Any]) -> SendStats:
        """Write ``body`` as chunks, then the manifest that commits them."""
        start = time.perf_counter()
        manifest, chunks = encode_payload(host, body, self.chunk_bytes)
        for i, chunk in enumerate(chunks):
            self.client.key_value_set_bytes(self._key(host, f"chunk{i:06d}"), chunk)
        self.client.key_value_set_bytes(self._key(host, "manifest"), manifest.to_bytes())
        return SendStats(manifest.total_bytes, manifest.num_chunks, time.perf_counter() - start)

    def send_failure(self, host: int, error: str) -> None:
        """Tell the leader this host failed, so it reports the error instead of waiting for rows."""
        self.client.key_value_set_bytes(self._key(host, "manifest"), failure_manifest(host, error).to_bytes())

    def collect(self, timeout_s: float, hosts: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """Leader: wait for every host's payload (or a reason it cannot come) and return them by host.

        Raises :class:`GatherError` naming failed, dead and missing hosts once every host is accounted for or
        ``timeout_s`` passes; :class:`PayloadError` names a corrupted chunk.
        """
        deadline = time.monotonic() + timeout_s
        pending = list(range(self.num_hosts)) if hosts is None else list(hosts)
        bodies: dict[int, dict[str, Any]] = {}
        failed: dict[int, str] = {}
        dead: set[int] = set()
        while pending:
            for host in list(pending):
                raw = self._try_get(self._key(host, "manifest"))
                if raw is None:
                    continue
                manifest = Manifest.from_bytes(raw, host)
                pending.remove(host)
                if manifest.status != "ok":
                    failed[host] = manifest.error or "unknown error"
                    continue
                bodies[host] = self._read(manifest, deadline)
            if pending and self.live_hosts is not None:
                alive = self.live_hosts(pending)
                newly_dead = [h for h in pending if h not in alive]
                # a host may have committed just before dying: look once more before declaring it dead
                for host in newly_dead:
                    if self._try_get(self._key(host, "manifest")) is None:
                        dead.add(host)
                        pending.remove(host)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL_S)
        if failed or dead or pending:
            raise GatherError(_describe(failed, dead, pending, timeout_s))
        return bodies

    def _read(self, manifest: Manifest, deadline: float) -> dict[str, Any]:
        chunks = []
        for i in range(manifest.num_chunks):
            key = self._key(manifest.host, f"chunk{i:06d}")
            remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            chunk = bytes(self.client.blocking_key_value_get_bytes(key, remaining_ms))
            verify_chunk(manifest, i, chunk)
            chunks.append(chunk)
        body = decode_payload(manifest, chunks)
        for i in range(manifest.num_chunks):
            self.client.key_value_delete(self._key(manifest.host, f"chunk{i:06d}"))
        self.client.key_value_delete(self._key(manifest.host, "manifest"))
        return body

    def _try_get(self, key: str) -> bytes | None:
        try:
            return bytes(self.client.key_value_try_get_bytes(key))
        except Exception as e:  # JAX raises a generic error whose message says NOT_FOUND
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def publish_done(self, ok: bool, message: str = "") -> None:
        """Leader: tell the other hosts the run is finished (or failed) so they may exit."""
        self.client.key_value_set_bytes(f"{self.prefix}/done", (("ok:" if ok else "failed:") + message).encode())

    def wait_done(self, timeout_s: float) -> tuple[bool, str]:
        """Non-leader: wait for the leader's verdict; raise :class:`GatherError` if it never comes."""
        try:
            raw = bytes(self.client.blocking_key_value_get_bytes(f"{self.prefix}/done", int(timeout_s * 1000)))
        except Exception as e:
            raise GatherError(
                f"The leader (host 0) did not finish within {timeout_s:.0f}s ({type(e).__name__}). "
                "It may have died; this host's shard file is kept."
            ) from None
        status, _, message = raw.decode().partition(":")
        return status == "ok", message


def _describe(failed: dict[int, str], dead: set[int], pending: list[int], timeout_s: float) -> str:
    parts = []
    for host, error in sorted(failed.items()):
        parts.append(f"host {host} failed: {error}")
    if dead:
        parts.append(f"host(s) {sorted(dead)} died (no longer live in the coordination service)")
    if pending:
        parts.append(f"host(s) {sorted(pending)} sent nothing within gather_timeout_s={timeout_s:.0f}s")
    return "Gather incomplete: " + "; ".join(parts) + ". No merged output was written."


__all__ = ["GatherError", "KvGather", "PayloadError", "SendStats", "jax_kv_client"]
