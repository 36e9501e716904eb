"""Which machine this is and whether a process on it lives (Linux ``/proc``), for the run directory's lock and
the phase clock. No JAX import."""

import os
from typing import Any


def boot_id() -> str | None:
    """This machine's boot id: with the host name, what tells a pid here from one elsewhere."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def start_ticks(pid: int | str = "self") -> int | None:
    """Process ``pid``'s start time in clock ticks since boot, so a reused pid is not taken for it."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def runs_under(ancestor: int, started: int | None) -> bool:
    """Whether this process descends from process ``ancestor`` (started at ``started`` ticks, if known); True
    where ``/proc`` cannot tell."""
    if _stat("self") is None:
        return True
    pid = os.getpid()
    while pid > 1:
        fields = _stat(pid)
        if fields is None:
            return False
        pid = int(fields[1])
        if pid == ancestor:
            return started is None or start_ticks(pid) == started
    return False


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/pid/stat`` after the command name (state, ppid, ...)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: Any, started: Any) -> bool:
    """Whether process ``pid``, started at ``started`` ticks (None: any start), lives on this machine."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # someone else's live process, or a lock we cannot read: assume it lives
    return started is None or start_ticks(int(pid)) in (None, started)
