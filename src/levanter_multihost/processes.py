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
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
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
