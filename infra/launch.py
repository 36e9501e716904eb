"""Run a command on every host of a job: N local processes standing in for hosts, or every worker of a TPU VM.

    # 4 emulated hosts x 4 CPU devices on this machine
    uv run python infra/launch.py --local_hosts 4 -- \
        uv run python -m levanter_multihost.sample_lm_multihost --config_path config/sampler/tiny_local.yaml

Local mode starts N processes that form one JAX distributed job on loopback (a free port): each gets
``LEVANTER_MULTIHOST_COORDINATOR``, ``..._NUM_PROCESSES``, ``..._PROCESS_ID`` (named in
``levanter_multihost.launch_env``) and its own CPU devices through ``XLA_FLAGS``. Every output line is prefixed
with its host index; when a host fails, the others are stopped and the launcher exits with that host's status.

Each host leads its own process group. SIGTERM, SIGINT or SIGHUP to the launcher goes to every host's group; the
hosts get ``--grace_s`` seconds to exit (cut short by a second signal), then what is left gets SIGKILL, and the
launcher exits with 128 + the signal's number. A failed host's peers are stopped the same way with SIGTERM.

Any run without ``--local_hosts`` goes to the TPU backend (``infra/tpu.py``), imported only then: it loads
Levanter's ``cli_helpers``, which a local run has no use for.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NoReturn

try:
    from levanter_multihost.launch_env import local_host_env
except ImportError as e:
    raise ImportError(
        f"{e}: this Python ({sys.executable}) lacks the levanter_multihost package; "
        "run `uv sync`, then start the launcher as `uv run python infra/launch.py ...`"
    ) from e

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals the local launcher passes on to every host before it exits with 128 + their number."""
DEFAULT_GRACE_S = 30.0


def say(text: str) -> None:
    try:
        sys.stdout.write(f"[launch] {text}\n")
        sys.stdout.flush()
    except OSError:
        pass  # stdout gone (a closed terminal, the SIGHUP case): stopping the hosts matters more than the message


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode("utf-8", errors="replace"))
        out.flush()


GUARDIAN = """\
import os, signal, sys
groups = []
for line in sys.stdin:
    if line == "done\\n":
        sys.exit(0)
    groups.append(int(line))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""
"""Watches the launcher from a session of its own: reads the hosts' process groups, one a line, until ``done``; an
end of input without it means the launcher died unawares (SIGKILL, which it cannot pass on), so it kills them."""


@contextlib.contextmanager
def caught_signals():
    """Within the block, FORWARDED_SIGNALS are appended to the yielded list instead of acted on.

    Only the main thread can set handlers; elsewhere the list stays empty and the signals keep their handlers.
    """
    caught: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in FORWARDED_SIGNALS:
            # a signal ignored on purpose (nohup's SIGHUP, SIGINT of a shell's background job) stays ignored
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, lambda received, frame: caught.append(received))
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            # None: a handler not set from Python, which Python cannot put back; the default is the closest
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class LocalHosts:
    """The emulated hosts' processes, each the leader of its own process group, their output relays, and the
    guardian that kills those groups if the launcher dies without stopping them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        # Own session: a signal to the launcher's group or session (a supervisor's killpg) spares it.
        self.guardian = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", GUARDIAN],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )

    def start(self, command: list[str], env: dict[str, str]) -> None:
        host = len(self.procs)
        p = subprocess.Popen(
            command,
            env=env,
            # Own group: signalling it also reaches the host's children (``uv run`` starts python as a child), and
            # a terminal's Ctrl-C reaches only the launcher, which passes it on once.
            process_group=0,
            # a background group reading the terminal would be stopped (SIGTTIN); hosts read nothing
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(p)
        self._tell_guardian(f"{p.pid}\n")
        t = threading.Thread(target=_pump, args=(p.stdout, f"[host {host}] ", sys.stdout), daemon=True)
        t.start()
        self.pumps.append(t)

    def _tell_guardian(self, line: str) -> None:
        try:
            self.guardian.stdin.write(line)
            self.guardian.stdin.flush()
        except OSError:
            pass  # the guardian is gone (killed by hand); the launcher itself still stops the hosts

    def codes(self) -> list[int | None]:
        """Each host's exit status as Popen gives it (negative: killed by that signal), None while it runs.

        Looks without reaping (``WNOWAIT``): an unreaped host's pid, hence its group id, cannot be handed out
        again, so ``signal`` never reaches a stranger's group that took the number of a group emptied long ago.
        """
        if not hasattr(os, "waitid"):  # not on every Unix; there the hosts are reaped as they exit
            return [p.poll() for p in self.procs]
        no_reap = os.WEXITED | os.WNOHANG | os.WNOWAIT
        codes = []
        for p in self.procs:
            info = None if p.returncode is not None else os.waitid(os.P_PID, p.pid, no_reap)
            if info is None:
                codes.append(p.returncode)  # None: still running
            else:
                codes.append(-info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status)
        return codes

    def running(self) -> list[int]:
        return [host for host, code in enumerate(self.codes()) if code is None]

    def signal(self, hosts, signum: int) -> None:
        for host in hosts:
            if self.procs[host].returncode is not None:
                continue  # reaped: its group id may belong to someone else by now
            try:
                os.killpg(self.procs[host].pid, signum)
            except (ProcessLookupError, PermissionError):
                pass  # that group has no member left

    def stop(self, signum: int, grace_s: float, caught: list[int]) -> None:
        """Send ``signum`` to every running host's group and wait up to ``grace_s`` for them to exit (less when a
        further signal is caught meanwhile); then SIGKILL every group, which also ends what exited hosts left."""
        running = self.running()
        if running:
            self.signal(running, signum)
            seen = len(caught)
            deadline = time.monotonic() + grace_s
            while (running := self.running()) and time.monotonic() < deadline and len(caught) == seen:
                time.sleep(0.05)
            if running:
                why = "a second signal" if len(caught) > seen else f"{grace_s:g} s"
                say(f"host(s) {', '.join(map(str, running))} still running after {why}; sending SIGKILL")
        # Every host's group, also those of hosts that exited: a child that outlived its host dies too. Safe, as
        # no host is reaped before this (see codes).
        self.signal(range(len(self.procs)), signal.SIGKILL)
        for p in self.procs:
            p.wait()
        for t in self.pumps:
            t.join(timeout=5)
        if not self.guardian.stdin.closed:
            self._tell_guardian("done\n")
            with contextlib.suppress(OSError):
                self.guardian.stdin.close()
            self.guardian.wait()


def run_local(
    command: list[str],
    num_hosts: int,
    devices_per_host: int,
    keep_going: bool = False,
    grace_s: float = DEFAULT_GRACE_S,
    poll_s: float = 0.2,
) -> int:
    """Run ``command`` as ``num_hosts`` processes of one JAX job; return the first non-zero status, else 0.

    A failed host stops the others, unless ``keep_going``: they get ``grace_s`` to stop on their own, then a
    signal. With ``keep_going`` every host runs to its own end, as on a real slice where nobody stops the
    survivors (used to test how they cope with a dead peer). A caught signal
    stops every host and returns 128 + its number.
    """
    port = free_port()
    hosts = LocalHosts()
    with caught_signals() as caught:
        try:
            for host in range(num_hosts):
                if caught:
                    break
                try:
                    hosts.start(command, local_host_env(dict(os.environ), port, num_hosts, host, devices_per_host))
                except OSError as e:
                    say(f"error: cannot start {command[0]!r} for host {host}: {e.strerror}; fix the command after --")
                    return 127 if isinstance(e, FileNotFoundError) else 126
            while not caught:
                codes = hosts.codes()
                failed = [(h, c) for h, c in enumerate(codes) if c not in (None, 0)]
                if failed and not keep_going:
                    host, status = failed[0]
                    say(f"host {host} exited with status {status}; stopping the others")
                    # the sampler's hosts hear of a failed peer through JAX's store and stop on their own, each
                    # saying why; signals come only for those still running after the grace period
                    deadline = time.monotonic() + grace_s
                    while hosts.running() and time.monotonic() < deadline and not caught:
                        time.sleep(poll_s)
                    # several may have failed within one poll (a host and the leader that noticed it): name each
                    for other, code in enumerate(hosts.codes()):
                        if other != host and code not in (None, 0):
                            say(f"host {other} exited with status {code}")
                    return status
                if all(c is not None for c in codes):
                    for host, code in failed:
                        say(f"host {host} exited with status {code}")
                    return failed[0][1] if failed else 0
                time.sleep(poll_s)
            signum = caught[0]
            say(f"got {signal.Signals(signum).name}; passing it to every host, SIGKILL after {grace_s:g} s")
            hosts.stop(signum, grace_s, caught)
            return 128 + signum
        finally:
            hosts.stop(signal.SIGTERM, grace_s, caught)


def add_local_arguments(parser: argparse.ArgumentParser) -> None:
    local = parser.add_argument_group("local emulation")
    local.add_argument("--local_hosts", type=int, help="Emulate this many hosts as local processes.")
    local.add_argument("--devices_per_host", type=int, default=4, help="CPU devices per emulated host.")
    local.add_argument("--keep_going", action="store_true", help="Let the other hosts run on when one fails.")
    local.add_argument(
        "--grace_s",
        type=float,
        default=DEFAULT_GRACE_S,
        help=f"Seconds the hosts get to exit after a signal or a failed peer, before SIGKILL ({DEFAULT_GRACE_S:g}).",
    )


def is_local_run(argv: list[str]) -> bool:
    """Whether ``argv`` asks for emulated hosts; decided before the full parser exists, as that needs the backend."""
    probe = argparse.ArgumentParser(add_help=False)
    # all the local flags, so that their values are not taken for the start of the command
    add_local_arguments(probe)
    probe.add_argument("command", nargs=argparse.REMAINDER)
    return probe.parse_known_args(argv)[0].local_hosts is not None


def tpu_backend():
    """``infra/tpu.py``, imported on demand: loading it loads Levanter's ``cli_helpers`` and reads the config."""
    import tpu

    return tpu


def build_parser(tpu=None) -> argparse.ArgumentParser:
    """The launcher's flags; the TPU backend's too when ``tpu`` (the module) is given."""
    epilog = None if tpu else "TPU flags (--tpu_name, ...): see --help without --local_hosts."
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=epilog)
    add_local_arguments(parser)
    if tpu:
        tpu.add_arguments(parser)
    else:
        # only so that a run naming both backends gets a clear error, not "unrecognized arguments"
        parser.add_argument("--tpu_name", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="The command to run on every host, after --.")
    return parser


def refuse(message: str) -> NoReturn:
    """A bad value: one line and exit status 2 (argparse's error would print its multi-line usage first)."""
    sys.stderr.write(f"launch.py: error: {message}\n")
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    local = is_local_run(argv)
    tpu = None if local else tpu_backend()
    parser = build_parser(tpu)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given: put it after --")
    if local:
        if args.tpu_name:
            refuse(
                f"--local_hosts {args.local_hosts} and --tpu_name {args.tpu_name} ask for two backends; pass only one"
            )
        if args.local_hosts < 1:
            refuse(f"--local_hosts ({args.local_hosts}) must be >= 1")
        if args.devices_per_host < 1:
            refuse(f"--devices_per_host ({args.devices_per_host}) must be >= 1 (CPU devices per emulated host)")
        if args.grace_s < 0:
            refuse(f"--grace_s ({args.grace_s:g}) must be >= 0 seconds")
        return run_local(command, args.local_hosts, args.devices_per_host, args.keep_going, args.grace_s)
    if args.tpu_name:
        return tpu.run(args, command)
    parser.error("choose a backend: --local_hosts N or --tpu_name NAME")


if __name__ == "__main__":
    sys.exit(main())
