"""Pin an emulated host to its own CPU core(s), then exec the host command.

The local launcher (infra/launch.py) runs one command for every host; put this in front of it so that each host
process is pinned by its LEVANTER_MULTIHOST_PROCESS_ID:

    python infra/launch.py --local_hosts 2 --devices_per_host 1 -- \
        python bench/pin.py python -m levanter_multihost.sample_lm_multihost --config_path ...

BENCH_CORES (default: every core this process may use, e.g. "0,1") lists the cores to hand out; host i gets core
BENCH_CORES[i % len(BENCH_CORES)]. With more hosts than cores, hosts share cores (said in the bench output).
BENCH_CORES=none turns pinning off. Linux only (os.sched_setaffinity).
"""

import os
import sys


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python bench/pin.py COMMAND [ARGS...]")
    spec = os.environ.get("BENCH_CORES", "")
    if spec != "none" and hasattr(os, "sched_setaffinity"):
        cores = [int(c) for c in spec.split(",") if c.strip()] or sorted(os.sched_getaffinity(0))
        host = int(os.environ.get("LEVANTER_MULTIHOST_PROCESS_ID", "0"))
        os.sched_setaffinity(0, {cores[host % len(cores)]})
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
