"""The leader's collector: a background thread that drains every other host's parts from the key-value store.

It runs while the leader samples its own share, so parts leave the store (which lives in the leader's process)
as soon as they arrive, and hands each to a callback (the leader's spool) in the order its host sent them, until
every host has ended, failed or gone silent. The protocol it reads is :mod:`levanter_multihost.coordination`'s.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from levanter_multihost.coordination import LEADER, POLL_INTERVAL_S, CoordinationError, Coordinator, Silence


@dataclass
class HostArrivals:
    """What the leader has received from one host."""

    parts: int = 0
    """Parts received."""
    bytes: int = 0
    """Compressed bytes received through the store."""
    end: dict[str, Any] | None = None
    """The host's end message (``status``, ``metrics`` or ``error``), once it came."""
    ended_at: float | None = None
    """``time.time()`` on the leader when the end message arrived."""


class Collector:
    """Leader: drains the other hosts' parts into ``receive`` from a background thread, until each host ends.

    ``receive(host, header, data)`` is called on the collector's thread, one part at a time, in the order each host
    sent them. :meth:`finish` waits for every host and raises :class:`CoordinationError` naming the hosts that
    failed or went silent.
    """

    def __init__(self, coordinator: Coordinator, receive: Callable[[int, dict, bytes], None]):
        self.c = coordinator
        self.receive = receive
        self.arrivals = {h: HostArrivals() for h in range(coordinator.num_hosts) if h != LEADER}
        self.silent: list[int] = []
        self.error: BaseException | None = None
        self.trouble = threading.Event()
        """Set as soon as a host failed or went silent, so the leader can stop early (:meth:`check`)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def start(self) -> "Collector":
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise now if a host has failed or gone silent (the leader calls this between its own batches)."""
        if self.trouble.is_set():
            self._thread.join(timeout=5 * POLL_INTERVAL_S)
            self._raise()

    def finish(self) -> dict[int, HostArrivals]:
        """Wait until every host has ended or gone silent; return what arrived from each."""
        self._thread.join()
        self._raise()
        return self.arrivals

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
        failed = {
            h: a.end.get("error", "unknown error")
            for h, a in self.arrivals.items()
            if a.end is not None and a.end.get("status") != "ok"
        }
        if failed or self.silent:
            parts = [f"host {h} failed: {error}" for h, error in sorted(failed.items())]
            if self.silent:
                parts.append(
                    f"host(s) {sorted(self.silent)} went silent (no heartbeat for silent_host_s="
                    f"{self.c.timeouts.silent_host_s:g}s: dead or hung)"
                )
            raise CoordinationError("Gather incomplete: " + "; ".join(parts) + ". No merged output was written.")

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        watches = {h: Silence(self.c, h) for h in self.arrivals}
        pending = set(self.arrivals)
        try:
            while pending and not self._stop.is_set():
                progressed = False
                for host in sorted(pending):
                    if self._drain(host):
                        progressed = True
                    elif self.arrivals[host].end is not None:
                        pending.discard(host)
                        if self.arrivals[host].end.get("status") != "ok":
                            self.trouble.set()
                    elif watches[host].silent_for() > self.c.timeouts.silent_host_s:
                        self.silent.append(host)
                        pending.discard(host)
                        self.trouble.set()
                if not progressed:
                    time.sleep(POLL_INTERVAL_S)
        except BaseException as e:  # reported by finish() on the leader's main thread
            self.error = e
            self.trouble.set()

    def _drain(self, host: int) -> bool:
        """Receive the host's next part, or its end message once every part it sent is in; True if a part came."""
        arrivals = self.arrivals[host]
        part = self.c.take_part(host, arrivals.parts)
        if part is None:
            end = self.c.end_of(host)
            # the end message is written after the host's last part, so it can only be ahead on a failure
            if end is not None and (end.get("status") != "ok" or end.get("parts") == arrivals.parts):
                arrivals.end, arrivals.ended_at = end, time.time()
            return False
        header, data, size = part
        self.receive(host, header, data)
        arrivals.parts += 1
        arrivals.bytes += size
        return True
