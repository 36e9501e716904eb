"""The local backend of infra/launch.py: which modules a run loads, signals, and a failed host, with fake hosts.

    uv run pytest tests/test_launch_local.py

Each fake host is a small Python script (no JAX): it writes ``ready_<host>.json`` (its pid, its child's pid and the
launcher's variables) once its signal handlers are in place, and ``signal_<host>_<signum>`` from its handler, so
the tests see which host got which signal. The launcher runs as a subprocess in a session of its own; the tests
signal its pid alone, as a supervisor would, and check afterwards that no host or child of a host is left.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "infra" / "launch.py"
HOSTS = 3

FAKE_HOST = '''\
"""Fake host: records its start and each signal it gets as files in DIR, then acts as MODE says.

MODE: wait (until a signal), stubborn:H (host H records SIGTERM but keeps running), child (each host starts a
child that ignores SIGTERM), fail:H (host H exits 3 once every host is ready), keep_going:H (the same, and the
others finish 1 s after it), follow:H (the same, and the others fail 0.3 s after it, as peers that noticed).
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
env = {k: v for k, v in os.environ.items() if k.startswith("LEVANTER_MULTIHOST_")}
host, hosts = int(env["LEVANTER_MULTIHOST_PROCESS_ID"]), int(env["LEVANTER_MULTIHOST_NUM_PROCESSES"])
kind, _, target = mode.partition(":")
child = None
if kind == "child":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited through exec: the child ignores SIGTERM too
    child = subprocess.Popen(["sleep", "120"])


def on_signal(signum, frame):
    (out / f"signal_{host}_{signum}").touch()
    if not (kind == "stubborn" and target == str(host)):
        sys.exit(0)


def wait_for(*names):
    while not all((out / name).exists() for name in names):
        time.sleep(0.02)


for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, on_signal)
(out / f"ready_{host}.tmp").write_text(json.dumps({"pid": os.getpid(), "child": child and child.pid, "env": env}))
(out / f"ready_{host}.tmp").rename(out / f"ready_{host}.json")
print(f"ready (pid {os.getpid()})", flush=True)
if kind in ("fail", "keep_going", "follow"):
    if target == str(host):
        wait_for(*(f"ready_{h}.json" for h in range(hosts)))
        (out / f"exiting_{host}").touch()
        sys.exit(3)
    if kind == "keep_going":
        wait_for(f"exiting_{target}")
        time.sleep(1)  # the launcher sees host `target` fail meanwhile; it must leave this host alone
        (out / f"finished_{host}").touch()
        sys.exit(0)
    if kind == "follow":
        wait_for(f"exiting_{target}")
        time.sleep(0.3)
        sys.exit(1)
deadline = time.monotonic() + 120  # a host the launcher lost still ends, and the test then fails on its pid
while time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(99)
'''


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by whoever adopted it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def dispositions(ignored: tuple) -> None:
    """In the launcher's process before exec: ignore ``ignored``, default the rest. An ignored disposition
    survives exec, and pytest started in the background (``&`` in a script) ignores SIGINT, which the launcher
    would then rightly keep ignoring."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)


class Launch:
    """The launcher running fake hosts in ``mode``, started in a session of its own."""

    def __init__(self, root: Path, mode: str, *flags: str, hosts: int = HOSTS, ignored: tuple = ()):
        self.dir, self.hosts = root, hosts
        script = root / "host.py"
        script.write_text(FAKE_HOST)
        argv = [sys.executable, str(LAUNCH), "--local_hosts", str(hosts), "--devices_per_host", "1", *flags, "--"]
        self.proc = subprocess.Popen(
            [*argv, sys.executable, str(script), str(root), mode],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: dispositions(ignored),
        )
        self.output = ""

    def ready(self, timeout: float = 60) -> list[dict]:
        """Every host's ready record, once all have written one."""
        paths = [self.dir / f"ready_{h}.json" for h in range(self.hosts)]
        deadline = time.monotonic() + timeout
        while not all(p.exists() for p in paths):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.finish(timeout=5)
                status = self.proc.returncode
                raise AssertionError(f"not every host got ready (launcher status {status}):\n{self.output}")
            time.sleep(0.02)
        return [json.loads(p.read_text()) for p in paths]

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def finish(self, timeout: float = 60) -> int:
        """The launcher's exit status; fails the test when it does not exit within ``timeout`` seconds."""
        try:
            self.output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            self.output = self.proc.communicate()[0]
            raise AssertionError(f"launcher still running after {timeout} s:\n{self.output}")
        return self.proc.returncode

    def pids(self) -> list[int]:
        """Every host's pid and its child's, from the ready records written so far."""
        records = [json.loads(p.read_text()) for p in self.dir.glob("ready_*.json")]
        return [pid for r in records for pid in (r["pid"], r["child"]) if pid]

    def survivors(self, wait_s: float = 5) -> list[int]:
        """The hosts' processes still running ``wait_s`` seconds after the launcher's exit (a killed child of a
        host may take a moment to be reaped by whoever adopts it)."""
        deadline = time.monotonic() + wait_s
        while (left := [pid for pid in self.pids() if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def kill_everything(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in self.pids():
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def signals_of(self, host: int) -> set[int]:
        return {int(p.name.rsplit("_", 1)[1]) for p in self.dir.glob(f"signal_{host}_*")}


@pytest.fixture
def launch(tmp_path):
    """Starts launchers; afterwards kills whatever a failed test left running."""
    started: list[Launch] = []

    def start(mode: str, *flags: str, hosts: int = HOSTS, ignored: tuple = ()) -> Launch:
        started.append(Launch(tmp_path, mode, *flags, hosts=hosts, ignored=ignored))
        return started[-1]

    yield start
    for run in started:
        run.kill_everything()
        run.proc.wait()


HARNESS = """\
import json, sys
sys.path.insert(0, sys.argv[1])
import launch
try:
    status = launch.main(sys.argv[2:])
except SystemExit as e:
    status = e.code
roots = ("tpu", "jax", "jaxlib", "levanter", "google")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in roots or m.startswith("_levanter_infra_"))
print(json.dumps({"status": status, "heavy": heavy}))
"""


@pytest.mark.parametrize(
    "argv, loads_tpu, shown",
    [
        (
            ["--local_hosts", "1", "--devices_per_host", "1", "--", sys.executable, "-c", "print('host ran')"],
            False,
            "[host 0] host ran",
        ),
        (["--local_hosts", "1", "--help"], False, "--grace_s"),
        (["--help"], True, "--tpu_name TPU_NAME"),
        (
            [
                "--dry_run",
                "--zone",
                "us-central1-a",
                "--tpu_name",
                "simpo-worker-3",
                "--tpu_type",
                "v5p-32",
                "--",
                "true",
            ],
            True,
            "gcloud compute tpus tpu-vm describe simpo-worker-3",
        ),
    ],
    ids=["local-run", "local-help", "help", "tpu-dry-run"],
)
def test_only_a_tpu_run_loads_the_tpu_backend(argv, loads_tpu, shown):
    env = {k: v for k, v in os.environ.items() if k not in ("ZONE", "TPU_NAME", "TPU_TYPE", "CAPACITY_TYPE")}
    proc = subprocess.run(
        [sys.executable, "-c", HARNESS, str(ROOT / "infra"), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["status"] == 0 and shown in proc.stdout, output
    if loads_tpu:
        # the counter-check: the harness does see the backend, and what it registers, when a TPU run asks for it
        assert {"tpu", "google.cloud.storage"} <= set(result["heavy"]), output
    else:
        assert result["heavy"] == [], output
        assert "--tpu_type" not in proc.stdout, output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_reaches_every_host_and_sets_the_exit_status(launch, signum):
    run = launch("wait")
    records = run.ready()
    run.signal(signum)
    status = run.finish()
    assert status == 128 + signum, run.output
    assert f"[launch] got {signum.name}; passing it to every host" in run.output
    for host in range(HOSTS):
        assert run.signals_of(host) == {signum}, f"host {host}:\n{run.output}"
    assert run.survivors() == [], run.output
    # what each host was told: one coordinator for all, its own index
    envs = [r["env"] for r in records]
    assert [e["LEVANTER_MULTIHOST_PROCESS_ID"] for e in envs] == ["0", "1", "2"]
    assert {e["LEVANTER_MULTIHOST_NUM_PROCESSES"] for e in envs} == {"3"}
    coordinators = {e["LEVANTER_MULTIHOST_COORDINATOR"] for e in envs}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")


def test_a_signal_the_launcher_was_started_ignoring_stays_ignored(launch):
    # as under nohup (SIGHUP) or as a shell script's background job (SIGINT)
    run = launch("wait", ignored=(signal.SIGINT, signal.SIGHUP))
    run.ready()
    run.signal(signal.SIGINT)
    run.signal(signal.SIGHUP)
    time.sleep(1)  # were they passed on, the hosts would record them meanwhile
    assert run.proc.poll() is None and all(run.signals_of(h) == set() for h in range(HOSTS))
    run.signal(signal.SIGTERM)
    assert run.finish() == 143, run.output
    assert all(run.signals_of(h) == {signal.SIGTERM} for h in range(HOSTS)), run.output


def test_a_host_that_ignores_sigterm_is_killed_after_the_grace_period(launch):
    run = launch("stubborn:1", "--grace_s", "1")
    run.ready()
    run.signal(signal.SIGTERM)
    status = run.finish(timeout=30)
    assert status == 143, run.output
    assert "[launch] host(s) 1 still running after 1 s; sending SIGKILL" in run.output
    assert all(run.signals_of(h) == {signal.SIGTERM} for h in range(HOSTS)), run.output
    assert run.survivors() == [], run.output


def test_a_second_signal_cuts_the_grace_period_short(launch):
    run = launch("stubborn:1", "--grace_s", "600")
    pids = [r["pid"] for r in run.ready()]
    run.signal(signal.SIGTERM)
    deadline = time.monotonic() + 30  # host 1 has the first signal, the others are gone (slow on a loaded machine)
    while time.monotonic() < deadline and (
        signal.SIGTERM not in run.signals_of(1) or alive(pids[0]) or alive(pids[2])
    ):
        time.sleep(0.02)
    run.signal(signal.SIGTERM)
    status = run.finish(timeout=60)  # far below --grace_s: only the second signal can end the wait in time
    assert status == 143, run.output
    assert "[launch] host(s) 1 still running after a second signal; sending SIGKILL" in run.output
    assert run.survivors() == [], run.output


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="without waitid the launcher reaps hosts as they exit")
def test_no_child_of_a_host_outlives_the_launcher(launch):
    run = launch("child", "--grace_s", "5")
    records = run.ready()
    assert all(r["child"] and alive(r["child"]) for r in records)
    run.signal(signal.SIGTERM)
    status = run.finish()
    assert status == 143, run.output
    assert run.survivors() == [], run.output


def test_no_host_outlives_a_launcher_killed_with_its_whole_group(launch):
    run = launch("child")
    records = run.ready()
    # as a supervisor's timeout does; the hosts lead groups of their own, so only the guardian can reach them
    os.killpg(run.proc.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL, run.output
    assert all(r["child"] for r in records)
    assert run.survivors(wait_s=30) == [], run.output


def test_a_failed_host_stops_the_others_with_its_status(launch):
    run = launch("fail:1", "--grace_s", "1")  # the fake hosts never stop on their own: signalled after 1 s
    status = run.finish()
    assert status == 3, run.output
    assert "[launch] host 1 exited with status 3; stopping the others" in run.output
    assert run.signals_of(0) == run.signals_of(2) == {signal.SIGTERM}, run.output
    assert run.signals_of(1) == set(), run.output
    assert run.survivors() == [], run.output


def test_hosts_that_fail_after_the_first_within_the_grace_period_are_named_too(launch):
    run = launch("follow:1", "--grace_s", "20")
    status = run.finish()
    assert status == 3, run.output
    assert "[launch] host 1 exited with status 3; stopping the others" in run.output
    assert (
        "[launch] host 0 exited with status 1\n" in run.output
        and "[launch] host 2 exited with status 1\n" in run.output
    )
    assert run.signals_of(0) == run.signals_of(2) == set(), run.output


def test_keep_going_lets_the_other_hosts_finish(launch):
    run = launch("keep_going:1", "--keep_going")
    status = run.finish()
    assert status == 3, run.output
    assert "[launch] host 1 exited with status 3\n" in run.output and "stopping the others" not in run.output
    for host in (0, 2):
        assert (run.dir / f"finished_{host}").exists() and run.signals_of(host) == set(), run.output
    assert run.survivors() == [], run.output


@pytest.mark.parametrize(
    "flags, command, status, message",
    [
        (["--grace_s", "-1"], ["true"], 2, "--grace_s (-1) must be >= 0 seconds"),
        (["--local_hosts", "0"], ["true"], 2, "--local_hosts (0) must be >= 1"),
        (["--tpu_name", "my-v5p"], ["true"], 2, "--tpu_name my-v5p ask for two backends; pass only one"),
        ([], ["/nonexistent/host-command"], 127, "cannot start '/nonexistent/host-command' for host 0"),
        (["--devices_per_host", "0"], ["true"], 2, "--devices_per_host (0) must be >= 1 (CPU devices per emulated"),
        (["--devices_per_host", "-3"], ["true"], 2, "--devices_per_host (-3) must be >= 1"),
    ],
    ids=["negative-grace", "no-hosts", "two-backends", "missing-command", "no-devices", "negative-devices"],
)
def test_a_bad_local_run_names_the_value_and_the_fix(flags, command, status, message):
    argv = [sys.executable, str(LAUNCH), "--local_hosts", "2", *flags, "--", *command]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == status and message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    if status == 2:
        assert len((proc.stdout + proc.stderr).strip().splitlines()) == 1, proc.stdout + proc.stderr


STALE = {
    "LEVANTER_MULTIHOST_COORDINATOR": "127.0.0.1:1",
    "LEVANTER_MULTIHOST_NUM_PROCESSES": "2",
    "LEVANTER_MULTIHOST_PROCESS_ID": "1",
}
"""What a shell keeps after someone pasted one host's environment of an earlier job."""


@pytest.mark.parametrize("launcher", [None, "1:1", f"{os.getpid()}:1"], ids=["unnamed", "not-an-ancestor", "reused"])
def test_launcher_variables_not_from_a_running_launcher_are_refused(monkeypatch, launcher):
    from levanter.trainer import TrainerConfig

    from levanter_multihost import runtime
    from levanter_multihost.errors import UserError

    for name, value in {**STALE, **({"LEVANTER_MULTIHOST_LAUNCHER": launcher} if launcher else {})}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(
        UserError,
        match=r"LEVANTER_MULTIHOST_COORDINATOR, .* are set, but no running infra/launch.py "
        r"started this process .* they are stale.* Run `unset LEVANTER_MULTIHOST_",
    ):
        runtime.distributed_from_env(TrainerConfig())
    from levanter_multihost.processes import start_ticks

    monkeypatch.setenv("LEVANTER_MULTIHOST_LAUNCHER", f"{os.getppid()}:{start_ticks(os.getppid())}")
    assert runtime.distributed_from_env(TrainerConfig()).distributed.coordinator_address == "127.0.0.1:1"


@pytest.mark.slow
def test_a_plain_process_with_stale_launcher_variables_says_so_within_seconds(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **STALE, "JAX_PLATFORMS": "cpu"}
    argv = [
        sys.executable,
        "-m",
        "levanter_multihost.sample_lm_multihost",
        "--config_path",
        str(ROOT / "config" / "sampler" / "tiny_local.yaml"),
        f"--output_dir={tmp_path}",
    ]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "are set, but no running infra/launch.py started this process" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
