"""Carrying the other hosts' shards to the leader through the JAX distributed key-value store.

Each host but the leader (which keeps its own shard) writes its chunks with the bytes API, then its manifest (the
manifest is the commit point). Every host also bumps a heartbeat key from a background thread. The leader polls
for manifests, reads and verifies each host's chunks, deletes the keys it read, and reports hosts that failed
(their manifest carries the error) or whose heartbeat stopped for ``timeout_s`` (a SIGKILLed process cannot say
goodbye, and JAX's own liveness query blocks until its 100 s heartbeat timeout, so slow hosts are waited for and
silent ones given up on). After merging, the leader publishes a ``done`` key that the other hosts wait for, so
nobody tears the job down while the leader still reads. No collective is used: a host that never arrives cannot
hang the others past the timeout. Encoding lives in :mod:`levanter_multihost.payload`.
"""

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from levanter_multihost.payload import (
    DEFAULT_CHUNK_BYTES,
    Manifest,
    decode_payload,
    encode_payload,
    failure_manifest,
    verify_chunk,
)

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
LEADER_WAIT_S = 24 * 3600
"""How long the other hosts wait for the leader's ``done``: the leader bounds its own wait (gather timeout) but
not its tracker upload. A dead leader takes JAX's coordination service with it, and JAX then stops the other
processes within seconds, so this long wait never holds up a failed run."""


class GatherError(RuntimeError):
    """Some hosts' rows did not arrive; the message names the hosts and why."""


class KeyValueClient(Protocol):
    """The part of JAX's ``DistributedRuntimeClient`` that the gather uses."""

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None: ...

    def key_value_try_get_bytes(self, key: str) -> bytes: ...

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes: ...

    def key_value_delete(self, key: str) -> None: ...


@dataclass(frozen=True)
class SendStats:
    bytes_sent: int
    """Compressed payload bytes written to the store."""
    num_chunks: int
    """Chunks written."""
    seconds: float
    """Time to encode and write."""


@dataclass(frozen=True)
class Received:
    header: dict[str, Any]
    """The payload's JSON header (the host's metrics)."""
    data: bytes
    """The payload's data: the host's shard file, byte for byte."""
    bytes: int
    """Compressed payload size."""
    at: float
    """``time.time()`` on the leader when the payload was complete."""


class KvGather:
    """Sends and collects payloads under keys unique to one run (``prefix``)."""

    def __init__(
        self,
        client: KeyValueClient,
        prefix: str,
        num_hosts: int,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.client = client
        self.prefix = prefix
        self.num_hosts = num_hosts
        self.chunk_bytes = chunk_bytes

    def _key(self, host: int, part: str) -> str:
        return f"{self.prefix}/host{host:05d}/{part}"

    def send(self, host: int, header: dict[str, Any], data: bytes) -> SendStats:
        """Write ``header`` and ``data`` as chunks, then the manifest that commits them."""
        start = time.perf_counter()
        manifest, chunks = encode_payload(host, header, data, self.chunk_bytes)
        for i, chunk in enumerate(chunks):
            self.client.key_value_set_bytes(self._key(host, f"chunk{i:06d}"), chunk)
        self.client.key_value_set_bytes(self._key(host, "manifest"), manifest.to_bytes())
        return SendStats(manifest.total_bytes, manifest.num_chunks, time.perf_counter() - start)

    def send_failure(self, host: int, error: str) -> None:
        """Tell the leader this host failed, so it reports the error instead of waiting for its shard."""
        self.client.key_value_set_bytes(self._key(host, "manifest"), failure_manifest(host, error).to_bytes())

    def collect(self, timeout_s: float, hosts: Iterable[int] | None = None) -> dict[int, Received]:
        """Leader: wait for the payload of every host in ``hosts`` (default: all) or a reason it cannot come, and
        return them by host.

        A host that is still alive (its heartbeat moves, see :meth:`heartbeat`) is waited for however slow it
        is; one whose heartbeat has not moved for ``timeout_s`` (dead, or hung) is given up on. Raises
        :class:`GatherError` naming failed and silent hosts once every host is accounted for;
        :class:`PayloadError` names a corrupted chunk.
        """
        pending = list(range(self.num_hosts)) if hosts is None else list(hosts)
        last_beat = {host: (None, time.monotonic()) for host in pending}
        received: dict[int, Received] = {}
        failed: dict[int, str] = {}
        silent: list[int] = []
        while pending:
            for host in list(pending):
                raw = self._try_get(self._key(host, "manifest"))
                if raw is None:
                    beat = self._try_get(self._key(host, "heartbeat"))
                    if beat != last_beat[host][0]:
                        last_beat[host] = (beat, time.monotonic())
                    elif time.monotonic() - last_beat[host][1] > timeout_s:
                        pending.remove(host)
                        silent.append(host)
                    continue
                manifest = Manifest.from_bytes(raw, host)
                pending.remove(host)
                if manifest.status != "ok":
                    failed[host] = manifest.error or "unknown error"
                    continue
                deadline = time.monotonic() + timeout_s
                header, data = self._read(manifest, deadline)
                received[host] = Received(header, data, manifest.total_bytes, time.time())
            if pending:
                time.sleep(POLL_INTERVAL_S)
        if failed or silent:
            raise GatherError(_describe(failed, silent, timeout_s))
        return received

    def heartbeat(self, host: int, interval_s: float) -> threading.Event:
        """Show the leader this host is alive until the returned event is set: a counter in the store, bumped
        every ``interval_s`` by a daemon thread (a killed process stops bumping it)."""
        stop = threading.Event()

        def beat():
            count = 0
            while not stop.is_set():
                count += 1
                with contextlib.suppress(Exception):  # the store going away ends the job anyway
                    self.client.key_value_set_bytes(self._key(host, "heartbeat"), str(count).encode(), True)
                stop.wait(interval_s)

        threading.Thread(target=beat, name=f"heartbeat-{host}", daemon=True).start()
        return stop

    def _read(self, manifest: Manifest, deadline: float) -> tuple[dict[str, Any], bytes]:
        chunks = []
        for i in range(manifest.num_chunks):
            key = self._key(manifest.host, f"chunk{i:06d}")
            remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            chunk = bytes(self.client.blocking_key_value_get_bytes(key, remaining_ms))
            verify_chunk(manifest, i, chunk)
            chunks.append(chunk)
        header, data = decode_payload(manifest, chunks)
        for i in range(manifest.num_chunks):
            self.client.key_value_delete(self._key(manifest.host, f"chunk{i:06d}"))
        self.client.key_value_delete(self._key(manifest.host, "manifest"))
        self.client.key_value_delete(self._key(manifest.host, "heartbeat"))
        return header, data

    def _try_get(self, key: str) -> bytes | None:
        try:
            return bytes(self.client.key_value_try_get_bytes(key))
        except Exception as e:  # JAX raises a generic error whose message says NOT_FOUND
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def publish(self, name: str, ok: bool, message: str = "") -> None:
        """Leader: announce a milestone (``ready``, ``done``) or a failure to the other hosts."""
        self.client.key_value_set_bytes(f"{self.prefix}/{name}", (("ok:" if ok else "failed:") + message).encode())

    def wait_for(self, name: str, timeout_s: float) -> None:
        """Non-leader: wait for the leader's announcement; raise :class:`GatherError` if it failed or never came."""
        try:
            raw = bytes(self.client.blocking_key_value_get_bytes(f"{self.prefix}/{name}", int(timeout_s * 1000)))
        except Exception as e:
            raise GatherError(
                f"The leader (host 0) did not announce '{name}' within {timeout_s:.0f}s ({type(e).__name__}). "
                "It may have died; this host's shard file (if written) is kept."
            ) from None
        status, _, message = raw.decode().partition(":")
        if status != "ok":
            raise GatherError(f"The leader (host 0) failed: {message}")


def _describe(failed: dict[int, str], silent: list[int], timeout_s: float) -> str:
    parts = [f"host {host} failed: {error}" for host, error in sorted(failed.items())]
    if silent:
        parts.append(
            f"host(s) {sorted(silent)} sent no rows and no heartbeat for gather_timeout_s={timeout_s:.0f}s (dead or hung)"
        )
    return "Gather incomplete: " + "; ".join(parts) + ". No merged output was written."


class InMemoryKeyValue:
    """A single-process stand-in for the JAX key-value store (one host, no ``jax.distributed``)."""

    def __init__(self):
        self.store: dict[str, bytes] = {}

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        if key in self.store and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: key {key} already set")
        self.store[key] = bytes(value)

    def key_value_try_get_bytes(self, key: str) -> bytes:
        if key not in self.store:
            raise RuntimeError(f"NOT_FOUND: key {key}")
        return self.store[key]

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        return self.key_value_try_get_bytes(key)

    def key_value_delete(self, key: str) -> None:
        self.store.pop(key, None)


def for_this_job(num_hosts: int, chunk_bytes: int, prefix: str = "levanter_multihost/gather") -> KvGather:
    """The gather of the running job: JAX's store when distributed, an in-memory one for a single process."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        if num_hosts != 1:
            raise RuntimeError("jax.distributed is not initialized but there are several hosts.")
        return KvGather(InMemoryKeyValue(), prefix, 1, chunk_bytes)
    return KvGather(client, prefix, num_hosts, chunk_bytes)


@contextlib.contextmanager
def failures_reported(kv: KvGather, host: int):
    """Tell the other hosts when this one fails, so nobody waits for it until the timeout."""
    try:
        yield
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
        try:
            if host == 0:
                for name in ("ready", "done"):
                    with contextlib.suppress(Exception):  # already announced: the other one still tells them
                        kv.publish(name, False, message)
            else:
                kv.send_failure(host, message)
        except Exception:
            logger.exception("host %d: could not report its failure to the other hosts", host)
        raise
