"""The run directory's lock: one run at a time in an ``output_dir``, judged by whether its holder lives.

``.lock`` holds the attempt, the machine (host name and boot id), the pid and its start time, and a beat the
holder bumps every ``refresh_s``. Whether the holder lives is judged by alive-ness first: on this machine by its
process; on another, by its beat, aged by the storage's own clock (the lock's modification time against a
probe's, so no two machines' clocks are compared) or, where the storage keeps no times, watched on this machine's
monotonic clock. Age alone never decides while a holder may live. No JAX import.
"""

import contextlib
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from levanter_multihost import processes
from levanter_multihost.rundir import LOCK, LOCK_REFRESH_S, LOCK_STALE_BEATS, RunDir, RunDirError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def hold(run_dir: RunDir, attempt: str, refresh_s: float = LOCK_REFRESH_S):
    """Hold ``.lock`` (created atomically) while the block runs; refuse while another run's holder may live.

    Only a lock whose beat has been still for ``LOCK_STALE_BEATS`` x ``refresh_s`` is taken over (with a warning).
    A block that ends after another run took its lock over raises :class:`RunDirError`: two runs wrote there.
    """
    run_dir.fs.makedirs(run_dir.root, exist_ok=True)
    beats = itertools.count()
    try:
        with run_dir.fs.open(run_dir.path(LOCK), "xb") as f:
            f.write(_holder(attempt, next(beats)))
    except FileExistsError:
        other, why = _stale_lock(run_dir, refresh_s)
        logger.warning("Taking over the stale lock of run %s in %s: %s.", other.get("attempt"), run_dir.url, why)
        run_dir.write_atomic(LOCK, _holder(attempt, next(beats)))
    stop, lost = threading.Event(), threading.Event()

    def refresh():
        while not stop.wait(refresh_s):
            with contextlib.suppress(OSError):
                if _lock_holder(run_dir).get("attempt") != attempt:
                    lost.set()
                    logger.error("Another run took over the lock of %s from this run (%s).", run_dir.url, attempt)
                    return
                run_dir.write_atomic(LOCK, _holder(attempt, next(beats)))

    refresher = threading.Thread(target=refresh, name="lock-refresh", daemon=True)
    refresher.start()
    try:
        yield
    finally:
        stop.set()
        refresher.join()  # a rewrite in flight would otherwise put the lock back after it is removed
        with contextlib.suppress(OSError):
            if _lock_holder(run_dir).get("attempt") == attempt:
                run_dir.fs.rm(run_dir.path(LOCK))
    if lost.is_set():
        raise RunDirError(
            f"Another run took over the lock of output_dir ({run_dir.url}) while this run ({attempt}) "
            "held it, so both wrote there: check both runs' outputs, or rerun into another "
            "output_dir."
        )


def _stale_lock(run_dir: RunDir, refresh_s: float) -> tuple[dict[str, Any], str]:
    """The holder of an existing lock and why it is stale; raise :class:`RunDirError` while it may live."""
    path = run_dir.path(LOCK)
    if run_dir.fs.info(path).get("type") != "file":
        raise RunDirError(
            f"{run_dir.url_of(LOCK)} is a {run_dir.fs.info(path).get('type')}, not a lock file: no run "
            "can hold it. Remove it, or choose another output_dir."
        )
    other = _lock_holder(run_dir)
    if other.get("host") == socket.gethostname() and other.get("boot") == processes.boot_id():
        if processes.alive(other.get("pid"), other.get("pid_start")):
            raise _in_use(run_dir, other, "alive on this machine")
        return other, f"its process {other.get('pid')} on this machine is gone"
    stale_after = LOCK_STALE_BEATS * refresh_s
    age = _storage_age(run_dir, LOCK)
    if age is not None:  # the storage stamped both times: no clock of any machine is compared
        if age <= stale_after:
            raise _in_use(run_dir, other, f"its beat is {age:.0f}s old, stale after {stale_after:g}s")
        return other, f"its beat is {age:.0f}s old (stale after {stale_after:g}s)"
    watched = time.monotonic()
    while time.monotonic() - watched <= stale_after:
        time.sleep(min(1.0, refresh_s / 4))
        now = _lock_holder(run_dir)
        if now != other:
            raise _in_use(run_dir, now, "its beat moved while this run watched")
    return other, f"its beat did not move for {stale_after:g}s"


def _in_use(run_dir: RunDir, holder: dict[str, Any], why: str) -> RunDirError:
    return RunDirError(
        f"output_dir ({run_dir.url}) is in use by run {holder.get('attempt')} (pid {holder.get('pid')} on "
        f"{holder.get('host')}, {why}). Wait for it, choose another output_dir, or delete {run_dir.url_of(LOCK)} "
        "if that run is gone."
    )


def _storage_age(run_dir: RunDir, name: str) -> float | None:
    """Seconds since ``name`` was last written, by the storage's clock (a probe's time against its); None
    where the storage keeps no modification times."""
    probe = run_dir.path(f".lock-probe-{uuid.uuid4().hex[:8]}")
    try:
        with run_dir.fs.open(probe, "wb") as f:
            f.write(b"")
        try:
            return max((run_dir.fs.modified(probe) - run_dir.fs.modified(run_dir.path(name))).total_seconds(), 0.0)
        finally:
            run_dir.fs.rm(probe)
    except (NotImplementedError, OSError, TypeError, ValueError):
        return None


def _lock_holder(run_dir: RunDir) -> dict[str, Any]:
    try:
        holder = json.loads(run_dir.read_bytes(LOCK))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder(attempt: str, beat: int) -> bytes:
    pid = os.getpid()
    return json.dumps(
        {
            "attempt": attempt,
            "host": socket.gethostname(),
            "boot": processes.boot_id(),
            "pid": pid,
            "pid_start": processes.start_ticks(pid),
            "beat": beat,
            "time": time.time(),
        }
    ).encode()
