"""Run a command on every host of a job: N local processes standing in for hosts, or every worker of a TPU VM.

    # 4 emulated hosts x 4 CPU devices on this machine
    uv run python infra/launch.py --local_hosts 4 -- \
        uv run python -m levanter_multihost.sample_lm_multihost --config_path config/sampler/tiny_local.yaml

Local mode starts N processes that form one JAX distributed job on loopback (a free port): each gets
``LEVANTER_MULTIHOST_COORDINATOR``, ``..._NUM_PROCESSES``, ``..._PROCESS_ID`` (named in
``levanter_multihost.launch_env``) and its own CPU devices through ``XLA_FLAGS``. Every output line is prefixed
with its host index; when a host fails, the others are stopped and the launcher exits with that host's status.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import tpu

try:
    from levanter_multihost.launch_env import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
except ImportError as e:
    raise ImportError(
        f"{e}: this Python ({sys.executable}) lacks the levanter_multihost package; "
        "run `uv sync`, then start the launcher as `uv run python infra/launch.py ...`"
    ) from e


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_host_env(base: dict[str, str], port: int, num_hosts: int, host: int, devices_per_host: int) -> dict:
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
            "XLA_FLAGS": " ".join(flags),
            "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode("utf-8", errors="replace"))
        out.flush()


def run_local(
    command: list[str], num_hosts: int, devices_per_host: int, keep_going: bool = False, poll_s: float = 0.2
) -> int:
    """Run ``command`` as ``num_hosts`` processes of one JAX job; return the first non-zero status, else 0.

    A failed host stops the others at once, unless ``keep_going``: then every host runs to its own end, as on a
    real slice where nobody stops the survivors (used to test how they cope with a dead peer).
    """
    port = free_port()
    procs, pumps = [], []
    try:
        for host in range(num_hosts):
            env = local_host_env(dict(os.environ), port, num_hosts, host, devices_per_host)
            p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[host {host}] ", sys.stdout), daemon=True)
            t.start()
            procs.append(p)
            pumps.append(t)
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(h, c) for h, c in enumerate(codes) if c not in (None, 0)]
            if failed and not keep_going:
                host, status = failed[0]
                sys.stdout.write(f"[launch] host {host} exited with status {status}; stopping the others\n")
                break
            if all(c is not None for c in codes):
                status = failed[0][1] if failed else 0
                for host, code in failed:
                    sys.stdout.write(f"[launch] host {host} exited with status {code}\n")
                break
            time.sleep(poll_s)
        return status
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    local = parser.add_argument_group("local emulation")
    local.add_argument("--local_hosts", type=int, help="Emulate this many hosts as local processes.")
    local.add_argument("--devices_per_host", type=int, default=4, help="CPU devices per emulated host.")
    local.add_argument("--keep_going", action="store_true", help="Let the other hosts run on when one fails.")
    tpu.add_arguments(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command to run on every host, after --.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: put it after --")
    if args.local_hosts is not None:
        if args.local_hosts < 1:
            parser.error(f"--local_hosts ({args.local_hosts}) must be >= 1")
        return run_local(command, args.local_hosts, args.devices_per_host, args.keep_going)
    if args.tpu_name:
        return tpu.run(args, command)
    parser.error("choose a backend: --local_hosts N or --tpu_name NAME")


if __name__ == "__main__":
    sys.exit(main())
