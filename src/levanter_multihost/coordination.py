"""Everything that crosses hosts, all through the JAX distributed key-value store: no collective is ever run.

What crosses, in order (``docs/architecture.md`` draws it):

0. fingerprint — each other host's run fingerprint (its first message, right after it resolved the config); the
   leader compares every one with its own before it decides anything, and refuses a host that differs (a stale
   copy of the prompts or the model on one worker), so no host samples and no row is merged.
1. ``READY`` — the leader (host 0) has checked and prepared the run directory; the message carries the attempt
   id and the attempts whose rows belong to the run. The other hosts wait for it before reading or writing it.
2. parts — after every batch a host sends the part it just made durable (and, on resume, the rows it keeps),
   as checksummed chunks and then a manifest (the commit point); the leader's collector
   (:mod:`levanter_multihost.collector`) drains them into a local spool while it samples its own share, so the
   store never holds more than a few parts.
3. end — each host's metrics, or its error: the leader then knows every part has arrived, or why not.
4. ``DONE`` — the leader has merged and reported; the others may exit.

Every host bumps a heartbeat key from a background thread. A wait for another host gives up when that host's
heartbeat has not moved for ``silent_host_s`` (a SIGKILLed process cannot say goodbye, and JAX's own liveness
query blocks until its 100 s heartbeat timeout), naming it; slow hosts are waited for however long they take.
Chunk encoding lives in :mod:`levanter_multihost.payload`.
"""

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from levanter_multihost.errors import UserError
from levanter_multihost.kvstore import InMemoryKeyValue, KeyValueClient
from levanter_multihost.payload import Manifest, decode_payload, encode_payload, verify_chunk
from levanter_multihost.runplan import Timeouts

logger = logging.getLogger(__name__)

READY = "ready"
"""Leader to all: the run directory is ready (or why not)."""
DONE = "done"
"""Leader to all: the merged output is written (or why not)."""
FINGERPRINT = "fingerprint"
"""Each other host to the leader, first: the run as it resolved it, which must be the leader's."""
FAILED = "failed"
"""Leader to all: the run failed; every host watches for it from its heartbeat thread and stops at once."""
LEADER = 0
POLL_INTERVAL_S = 0.05
FROZEN_AFTER_S = 3.0
"""A background thread that wakes this much later than it asked was frozen with its whole process (SIGSTOP, a
suspended VM, swapping): the others saw this host go silent, so its errors say so rather than blame them."""
PREFIX = "levanter_multihost"


class CoordinationError(RuntimeError):
    """Another host failed or went silent; the message names it and why."""


class LeaderRefused(UserError):
    """The leader refused the run as a user's mistake; its own log says which, so this host says nothing more."""


class HostsDisagree(UserError):
    """Another host resolved a different run (other prompts, model or settings) than the leader's."""


class Coordinator:
    """This host's view of the job's key-value store."""

    def __init__(self, client: KeyValueClient, host: int, num_hosts: int, chunk_bytes: int, timeouts: Timeouts):
        self.client = client
        self.host = host
        self.num_hosts = num_hosts
        self.chunk_bytes = chunk_bytes
        self.timeouts = timeouts
        self.parts_sent = 0
        self.bytes_sent = 0
        self.frozen_note = ""
        """Said after this host's coordination errors once it noticed it had been frozen."""

    @property
    def is_leader(self) -> bool:
        return self.host == LEADER

    def _key(self, host: int, *names: str) -> str:
        return "/".join((PREFIX, f"host{host:05d}", *names))

    def _part_key(self, host: int, index: int, name: str) -> str:
        return self._key(host, f"part{index:06d}", name)

    def _chunk_key(self, host: int, index: int, chunk: int) -> str:
        return self._part_key(host, index, f"chunk{chunk:06d}")

    def heartbeat_of(self, host: int) -> bytes | None:
        """``host``'s heartbeat counter as last written, or None before its first beat."""
        return self._try_get(self._key(host, "heartbeat"))

    # -- barriers ----------------------------------------------------------------------------------------------

    def announce(self, name: str, message: dict[str, Any]) -> None:
        """Leader: tell every other host that ``name`` happened, with ``message``."""
        self.client.key_value_set_bytes(f"{PREFIX}/{name}", json.dumps({"ok": True, **message}).encode())

    def announce_failure(self, error: str, user: bool = False) -> None:
        """Leader: tell every other host, whatever it waits for or does, that the run failed (``user``: refused
        as a user's mistake, which every host exits with 2 for)."""
        message = json.dumps({"ok": False, "error": error, "user": user}).encode()
        for name in (READY, DONE, FAILED):
            with contextlib.suppress(Exception):  # one may be announced already; the other still tells them
                self.client.key_value_set_bytes(f"{PREFIX}/{name}", message)

    def wait_for(self, name: str) -> dict[str, Any]:
        """Wait for the leader's ``name`` announcement while its heartbeat moves; return the message."""
        watch = Silence(self, LEADER)
        while True:
            try:
                raw = self._try_get(f"{PREFIX}/{name}")
                silent = watch.silent_for() if raw is None else 0.0
            except Exception as e:  # the leader's process hosts the store: an error here means it is gone
                raise CoordinationError(
                    f"This host lost contact with the leader (host 0) while it waited for "
                    f"'{name}' ({type(e).__name__}): the leader died. This host's parts are "
                    f"durable in the run directory; rerun with resume: true.{self.frozen_note}"
                ) from None
            if raw is not None:
                message = json.loads(raw)
                if not message.get("ok"):
                    raise leader_failure(message, note=self.frozen_note)
                return message
            if silent > self.timeouts.silent_host_s:
                raise CoordinationError(
                    f"The leader (host 0) went silent while this host waited for '{name}' (no heartbeat for "
                    f"{silent:.0f}s > silent_host_s {self.timeouts.silent_host_s:g}s): it died or hung. This "
                    f"host's parts are durable in the run directory; rerun with resume: true.{self.frozen_note}"
                )
            time.sleep(POLL_INTERVAL_S)

    def agree(self, fields: dict[str, Any]) -> None:
        """Every host must sample the same run. A non-leader sends its fingerprint ``fields`` (its first message);
        the leader waits for every other host's and raises :class:`HostsDisagree` naming each host that differs
        and how, before anything is decided, sampled or merged."""
        if not self.is_leader:
            self.client.key_value_set_bytes(self._key(self.host, FINGERPRINT), json.dumps(fields).encode(), True)
            return
        mine = json.loads(json.dumps(fields))  # as the others' arrive: tuples are lists
        waiting = {h: Silence(self, h) for h in range(self.num_hosts) if h != self.host}
        differ = []
        while waiting:
            for h in sorted(waiting):
                raw = self._try_get(self._key(h, FINGERPRINT))
                if raw is not None:
                    del waiting[h]
                    theirs = json.loads(raw)
                    changed = [
                        f"{k} ({_short(theirs.get(k))} vs the leader's {_short(mine.get(k))})"
                        for k in sorted(set(mine) | set(theirs))
                        if mine.get(k) != theirs.get(k)
                    ]
                    if changed:
                        differ.append(f"host {h} differs in {', '.join(changed)}")
                elif (end := self.end_of(h)) is not None:  # it failed before it could say: its error says why
                    raise CoordinationError(f"host {h} failed: {end.get('error')}")
                elif waiting[h].silent_for() > self.timeouts.silent_host_s:
                    raise CoordinationError(
                        f"host {h} went silent before it sent its run fingerprint (no heartbeat "
                        f"for silent_host_s={self.timeouts.silent_host_s:g}s: dead or hung)."
                    )
            time.sleep(POLL_INTERVAL_S if waiting else 0)
        if differ:
            raise HostsDisagree(
                f"The hosts resolved different runs: {'; '.join(differ)}. Give every host the same "
                "prompts, model and config (a stale local copy on one worker?). Nothing was sampled "
                "or merged."
            )

    # -- liveness ----------------------------------------------------------------------------------------------

    def start_heartbeat(self, on_leader_failure: Callable[[Exception], None] | None = None) -> threading.Event:
        """Bump this host's heartbeat every ``heartbeat_interval_s`` until the returned event is set (a killed
        process stops bumping it).

        A non-leader also calls ``on_leader_failure(error)`` from a background thread when the leader announces
        a failure, or when the store (which lives in the leader's process) has not answered for ``silent_host_s``:
        a frozen leader freezes every call into the store, so only a watch from outside the call can notice it.
        """
        stop = threading.Event()
        answered = [time.monotonic()]

        def beat():
            count = 0
            while not stop.is_set():
                count += 1
                with contextlib.suppress(Exception):  # the store going away ends the job anyway
                    self.client.key_value_set_bytes(self._key(self.host, "heartbeat"), str(count).encode(), True)
                    answered[0] = time.monotonic()
                    failed = None if self.is_leader else self._try_get(f"{PREFIX}/{FAILED}")
                    if failed is not None and on_leader_failure is not None:  # the leader's own log says why
                        on_leader_failure(
                            leader_failure(
                                json.loads(failed),
                                "Stopping: the leader (host 0) reported a failure.",
                                self.frozen_note,
                            )
                        )
                asked = time.monotonic()  # after the store call, which a frozen leader holds up
                stop.wait(self.timeouts.heartbeat_interval_s)
                self._woke(time.monotonic() - asked - self.timeouts.heartbeat_interval_s)

        def watch():
            period = min(1.0, self.timeouts.heartbeat_interval_s)
            asked = time.monotonic()
            while not stop.wait(period):
                if self._woke(time.monotonic() - asked - period):
                    answered[0] = time.monotonic()  # the store's silence was this host's own: watch it afresh
                asked = time.monotonic()
                quiet = time.monotonic() - answered[0]
                if quiet > self.timeouts.silent_host_s:
                    on_leader_failure(
                        CoordinationError(
                            f"The leader (host 0) went silent: its key-value store has not answered for {quiet:.0f}s "
                            f"(silent_host_s {self.timeouts.silent_host_s:g}s): it is frozen or hung. This host's "
                            f"parts are durable in the run directory; rerun with resume: true.{self.frozen_note}"
                        )
                    )
                    return

        threading.Thread(target=beat, name=f"heartbeat-{self.host}", daemon=True).start()
        if not self.is_leader and on_leader_failure is not None:
            threading.Thread(target=watch, name="leader-watch", daemon=True).start()
        return stop

    def _woke(self, late_s: float) -> bool:
        """A background thread woke ``late_s`` later than it asked; True (and noted) if the process was frozen."""
        if late_s < FROZEN_AFTER_S:
            return False
        self.frozen_note = (
            f" This host itself was frozen (stopped or starved) for {late_s:.0f}s, and "
            f"silent_host_s is {self.timeouts.silent_host_s:g}s: the other hosts may have given up "
            "on it first."
        )
        logger.warning("host %d: this process was frozen for %.0fs (stopped or starved).", self.host, late_s)
        return True

    def leave(self, timeout_s: float = 2.0) -> None:
        """Non-leader, on its way out after a failure: say so, so the leader need not wait for it. Gives up after
        ``timeout_s``: a frozen leader's store never answers."""

        def say():
            with contextlib.suppress(Exception):
                self.client.key_value_set_bytes(self._key(self.host, "left"), b"1", True)

        thread = threading.Thread(target=say, name="leave", daemon=True)
        thread.start()
        thread.join(timeout_s)

    def wait_for_others_to_leave(self, timeout_s: float) -> list[int]:
        """Leader, after announcing a failure: wait until every other host has left or gone silent (at most
        ``timeout_s``), so none of them sees the leader's store vanish and dies with JAX's fatal-error dumps.
        Returns the hosts still there."""
        watches = {h: Silence(self, h) for h in range(self.num_hosts) if h != self.host}
        deadline = time.monotonic() + timeout_s
        while watches and time.monotonic() < deadline:
            for h in list(watches):
                try:
                    gone = self._try_get(self._key(h, "left")) is not None
                    gone = gone or watches[h].silent_for() > 3 * self.timeouts.heartbeat_interval_s
                except Exception:
                    gone = True
                if gone:
                    del watches[h]
            time.sleep(POLL_INTERVAL_S)
        return sorted(watches)

    # -- rows to the leader ------------------------------------------------------------------------------------

    def send_part(self, header: dict[str, Any], data: bytes) -> None:
        """Non-leader: send one part (a header and the part file's bytes) as chunks, then its manifest."""
        manifest, chunks = encode_payload(self.host, header, data, self.chunk_bytes)
        for i, chunk in enumerate(chunks):
            self.client.key_value_set_bytes(self._chunk_key(self.host, self.parts_sent, i), chunk)
        self.client.key_value_set_bytes(self._part_key(self.host, self.parts_sent, "manifest"), manifest.to_bytes())
        self.parts_sent += 1
        self.bytes_sent += manifest.total_bytes

    def take_part(self, host: int, index: int) -> tuple[dict[str, Any], bytes, int] | None:
        """Leader: ``host``'s part number ``index`` as (header, data, bytes through the store), removed from the
        store; None while its manifest (the commit point) is not in. Its chunks are all in before the manifest, so
        the wait for them is bounded by ``silent_host_s``."""
        raw = self._try_get(self._part_key(host, index, "manifest"))
        if raw is None:
            return None
        manifest = Manifest.from_bytes(raw, host)
        chunks = []
        deadline = time.monotonic() + self.timeouts.silent_host_s
        for i in range(manifest.num_chunks):
            remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            chunk = bytes(self.client.blocking_key_value_get_bytes(self._chunk_key(host, index, i), remaining_ms))
            verify_chunk(manifest, i, chunk)
            chunks.append(chunk)
        header, data = decode_payload(manifest, chunks)
        for i in range(manifest.num_chunks):
            self.client.key_value_delete(self._chunk_key(host, index, i))
        self.client.key_value_delete(self._part_key(host, index, "manifest"))
        return header, data, manifest.total_bytes

    def end_of(self, host: int) -> dict[str, Any] | None:
        """Leader: ``host``'s end message (``status``, ``parts``, and ``metrics`` or ``error``), once it is in."""
        raw = self._try_get(self._key(host, "end"))
        return None if raw is None else json.loads(raw)

    def send_end(self, metrics: dict[str, Any]) -> None:
        """Non-leader: every part is sent; here are this host's metrics."""
        end = {"status": "ok", "parts": self.parts_sent, "metrics": metrics}
        self.client.key_value_set_bytes(self._key(self.host, "end"), json.dumps(end).encode())

    def send_failure(self, error: str) -> None:
        """Non-leader: this host failed, so the leader reports the error instead of waiting for it."""
        end = {"status": "failed", "parts": self.parts_sent, "error": error}
        self.client.key_value_set_bytes(self._key(self.host, "end"), json.dumps(end).encode(), True)

    @contextlib.contextmanager
    def failures_reported(self):
        """Tell the other hosts when this one fails, so nobody waits for it until the timeout."""
        try:
            yield
        except BaseException as e:
            message = f"{type(e).__name__}: {e}"
            try:
                if self.is_leader:
                    self.announce_failure(message, user=isinstance(e, UserError))
                else:
                    self.send_failure(message)
            except Exception:
                logger.exception("host %d: could not report its failure to the other hosts", self.host)
            raise

    def _try_get(self, key: str) -> bytes | None:
        try:
            return bytes(self.client.key_value_try_get_bytes(key))
        except Exception as e:  # JAX raises a generic error whose message says NOT_FOUND
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise


def leader_failure(message: dict[str, Any], said: str | None = None, note: str = "") -> Exception:
    """The error a non-leader stops with when the leader announced ``message``, a failure: ``said``, else its
    error, then ``note`` (this host's own freeze)."""
    if message.get("user"):
        return LeaderRefused(f"The leader (host 0) refused the run: {message.get('error')}")
    return CoordinationError((said or f"The leader (host 0) failed: {message.get('error')}") + note)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


class Silence:
    """How long a host's heartbeat has not moved, as seen from here."""

    def __init__(self, coordinator: Coordinator, host: int):
        self.coordinator, self.host = coordinator, host
        self.beat: bytes | None = None
        self.since = time.monotonic()

    def silent_for(self) -> float:
        beat = self.coordinator.heartbeat_of(self.host)
        if beat != self.beat:
            self.beat, self.since = beat, time.monotonic()
        return time.monotonic() - self.since


_current: Coordinator | None = None


def connect(client: KeyValueClient | None, host: int, num_hosts: int, chunk_bytes: int, timeouts: Timeouts):
    """The coordinator of the running job: JAX's store when distributed (``client``), an in-memory one for a
    single process. It is also :func:`current` for the rest of the process."""
    global _current
    if client is None:
        if num_hosts != 1:
            raise RuntimeError("jax.distributed is not initialized but there are several hosts.")
        client = InMemoryKeyValue()
    _current = Coordinator(client, host, num_hosts, chunk_bytes, timeouts)
    return _current


def current() -> Coordinator | None:
    """The process's coordinator, once connected (the command-line entry uses it to leave after a failure)."""
    return _current
