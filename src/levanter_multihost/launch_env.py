"""The local launcher's environment and command line, in one place for the launcher, the tests and the benchmarks.

The launcher (``infra/launch.py --local_hosts N``) tells each emulated host where the JAX distributed job's
coordinator is, how many hosts there are and which one it is (``ENV_*``, read by ``runtime``) and how many CPU
devices it has (:func:`local_host_env`); tests and benchmarks start it with :func:`local_launch_command` in an
offline environment (:func:`offline_env`).

Imports only the standard library (and ``processes``, which does too), so that the launcher can read it without
loading JAX or Levanter.
"""

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from levanter_multihost.processes import start_ticks

ENV_COORDINATOR = "LEVANTER_MULTIHOST_COORDINATOR"
"""``host:port`` of the coordinator (host 0's JAX distributed service), e.g. ``127.0.0.1:43121``."""
ENV_NUM_PROCESSES = "LEVANTER_MULTIHOST_NUM_PROCESSES"
"""How many hosts form the job, as a decimal string."""
ENV_PROCESS_ID = "LEVANTER_MULTIHOST_PROCESS_ID"
"""This host's index in the job, ``0`` to ``NUM_PROCESSES - 1``; host 0 is the leader."""
ENV_LAUNCHER = "LEVANTER_MULTIHOST_LAUNCHER"
"""``pid:start`` of the launcher that set these variables (its start in clock ticks since boot): ``runtime``
refuses variables whose launcher does not run this process (left in a shell, they would make a plain process wait
for a job that is gone)."""
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
"""No hub or W&B traffic, and output line by line: how tests and benchmarks run the sampler."""
SAMPLER = ("-m", "levanter_multihost.sample_lm_multihost")
"""The sampler's entry module, as arguments of a Python interpreter."""


def local_host_env(base: Mapping[str, str], port: int, num_hosts: int, host: int, devices_per_host: int) -> dict:
    """The environment of emulated host ``host``: its coordinator, rank and CPU device count."""
    env = dict(base)
    flags = [
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_host}")
    env.update(
        {
            ENV_COORDINATOR: f"127.0.0.1:{port}",
            ENV_NUM_PROCESSES: str(num_hosts),
            ENV_PROCESS_ID: str(host),
            ENV_LAUNCHER: f"{os.getpid()}:{start_ticks()}",
            "XLA_FLAGS": " ".join(flags),
            "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def offline_env(base: Mapping[str, str], **extra: str) -> dict[str, str]:
    """``base`` (usually ``os.environ``) made offline (:data:`OFFLINE`), then ``extra``."""
    return {**base, **OFFLINE, **extra}


def local_launch_command(
    repo: Path, hosts: int, devices_per_host: int, host_command: Sequence[str], launcher_flags: Sequence[str] = ()
) -> list[str]:
    """The launcher's command line in checkout ``repo``: ``host_command`` on ``hosts`` emulated hosts."""
    return [
        sys.executable,
        str(Path(repo) / "infra" / "launch.py"),
        *launcher_flags,
        "--local_hosts",
        str(hosts),
        "--devices_per_host",
        str(devices_per_host),
        "--",
        *host_command,
    ]


def sampler_command(config: Path | str, output_dir: Path | str, *overrides: str) -> list[str]:
    """One host's sampler command: ``config`` into ``output_dir``, with draccus ``overrides``."""
    return [sys.executable, *SAMPLER, "--config_path", str(config), f"--output_dir={output_dir}", *overrides]
