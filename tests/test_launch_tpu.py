"""The TPU backend of infra/launch.py against a fake ``gcloud`` that records every call.

    uv run pytest tests/test_launch_tpu.py

The fake keeps the VM's state in files and emulates its 4 workers as directories: ``tpu-vm scp`` copies into
each, ``tpu-vm ssh --worker=all`` runs the command in each with a clean environment (HOME = the worker's
directory), so the job sees only what the launcher shipped. Fake ``curl`` (the metadata server's worker number)
and ``uv`` (records its arguments) stand in on the workers. The launcher runs as a subprocess from the repo root;
every run also checks that no secret reaches its output or any gcloud command line.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 4
SECRETS = {"WANDB_API_KEY": "supersecret-wandb-0123456789", "HF_TOKEN": "hf_supersecret_abcdef"}
SEED_COMMAND = [
    "uv",
    "run",
    "python",
    "-m",
    "levanter_multihost.sample_lm_multihost",
    "--config_path",
    "config/sampler/llama8b_v5p32_256x2048.yaml",
]
SEED_FLAGS = [
    "--foreground",
    "--zone",
    "us-central1-a",
    "--tpu_name",
    "simpo_worker_3",
    "--tpu_type",
    "v5p-32",
    "--capacity_type",
    "on-demand",
]
JOB = [
    "sh",
    "-c",
    'echo "FOO=$FOO"; echo "key=$WANDB_API_KEY"; echo "$WANDB_API_KEY" > seen_key; exit "${JOB_STATUS:-0}"',
]

FAKE_GCLOUD = '''\
"""Fake gcloud: appends each call to calls.jsonl and emulates one TPU VM under $FAKE_GCLOUD_STATE."""
import json, os, shutil, subprocess, sys, threading
from pathlib import Path

state = Path(os.environ["FAKE_GCLOUD_STATE"])
argv = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
    forwarded = sorted(k for k in ("WANDB_API_KEY", "HF_TOKEN") if k in os.environ)
    f.write(json.dumps({"argv": argv, "env": forwarded}) + "\\n")
flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
workers = [state / "workers" / str(i) for i in range(int(os.environ["FAKE_WORKERS"]))]


def pop(name):
    """The first line of a state file; the last line stays for every later read. None when absent."""
    path = state / name
    if not path.exists():
        return None
    lines = path.read_text().split()
    if len(lines) > 1:
        path.write_text("\\n".join(lines[1:]))
    return lines[0]


def fail(message, status):
    print(message, file=sys.stderr)
    sys.exit(status)


def relay(proc):
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()


match argv[:4]:
    case ["compute", "tpus", "tpu-vm", "describe"]:
        vm = pop("vm_state")
        if vm in (None, "MISSING"):
            fail("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: not found", 1)
        print(vm)
    case ["compute", "tpus", "queued-resources", "describe"]:
        print(pop("qr_state"))
    case ["compute", "tpus", "tpu-vm", "create"]:
        (state / "vm_state").write_text("CREATING\\nREADY")
    case ["compute", "tpus", "queued-resources", "create"]:
        (state / "vm_state").write_text("MISSING\\nREADY")
        (state / "qr_state").write_text("PROVISIONING\\nACTIVE")
    case ["compute", "tpus", _, "delete"]:
        for name in ("vm_state", "qr_state"):
            (state / name).unlink(missing_ok=True)
    case ["compute", "tpus", "tpu-vm", "scp"]:
        for home in workers:
            home.mkdir(parents=True, exist_ok=True)
            shutil.copy(argv[4], home / argv[5].split(":", 1)[1])
    case ["compute", "tpus", "tpu-vm", "ssh"]:
        fault = pop("ssh_faults")
        if fault == "preempt":
            (state / "vm_state").write_text("PREEMPTED")
        if fault in ("preempt", "drop"):
            fail("Connection to 10.0.0.2 closed by remote host.", 255)
        procs = []
        for i, home in enumerate(workers):
            env = {"HOME": str(home), "PATH": os.environ["FAKE_WORKER_PATH"], "FAKE_WORKER_ID": str(i)}
            procs.append(subprocess.Popen(["bash", "-c", flags["command"]], cwd=home, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        relays = [threading.Thread(target=relay, args=(p,)) for p in procs]
        for t in relays:
            t.start()
        codes = [p.wait() for p in procs]
        for t in relays:
            t.join()
        sys.exit(next((c for c in codes if c), 0))
    case _:
        fail(f"fake gcloud: unexpected call {argv}", 2)
'''


class Fake:
    """The fake's state directory and what it recorded."""

    def __init__(self, root: Path):
        self.root = root
        self.state = root / "state"
        self.bin = root / "bin"
        self.state.mkdir()
        self.bin.mkdir()
        gcloud = self.bin / "gcloud"
        gcloud.write_text(f"#!{sys.executable}\n" + FAKE_GCLOUD)
        (self.bin / "curl").write_text('#!/bin/bash\necho "$FAKE_WORKER_ID"\n')
        (self.bin / "uv").write_text('#!/bin/bash\necho "$*" >> "$HOME/uv_calls"\n')
        for tool in ("gcloud", "curl", "uv"):
            (self.bin / tool).chmod(0o755)

    def set(self, name: str, text: str) -> None:
        (self.state / name).write_text(text)

    def calls(self) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        return [json.loads(line)["argv"] for line in log.read_text().splitlines()] if log.exists() else []

    def verbs(self) -> list[str]:
        """Each call as 'group verb', e.g. 'tpu-vm create'."""
        return [" ".join(argv[2:4]) for argv in self.calls()]

    def worker(self, i: int) -> Path:
        return self.state / "workers" / str(i)

    def launch(self, *flags: str, command=JOB) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("ZONE", "TPU_NAME", "TPU_TYPE", "CAPACITY_TYPE")}
        worker_path = f"{self.bin}:/usr/local/bin:/usr/bin:/bin"
        full_env = {
            **base,
            **SECRETS,
            "PATH": f"{self.bin}:{base['PATH']}",
            "FAKE_GCLOUD_STATE": str(self.state),
            "FAKE_WORKER_PATH": worker_path,
            "FAKE_WORKERS": str(WORKERS),
        }
        proc = subprocess.run(
            [sys.executable, "infra/launch.py", *flags, "--poll_s", "0", "--", *command],
            cwd=ROOT,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        command_lines = json.dumps(self.calls())
        for secret in SECRETS.values():
            assert secret not in proc.stdout + proc.stderr, "a secret was echoed"
            assert secret not in command_lines, "a secret was put in a gcloud command line"
        return proc


@pytest.fixture
def fake(tmp_path) -> Fake:
    return Fake(tmp_path)


def test_dry_run_prints_the_seed_sequence_and_runs_nothing(fake):
    proc = fake.launch("--dry_run", *SEED_FLAGS, command=SEED_COMMAND)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake.calls() == [] and not (fake.state / "calls.jsonl").exists()
    commands = [line for line in proc.stdout.splitlines() if line.startswith(("gcloud", "git"))]
    zone = "--zone=us-central1-a"
    describe = f"gcloud compute tpus tpu-vm describe simpo_worker_3 {zone} '--format=value(state)'"
    assert commands[:4] == [
        describe,
        f"gcloud compute tpus tpu-vm delete simpo_worker_3 {zone} --quiet",
        f"gcloud compute tpus tpu-vm create simpo_worker_3 {zone} --accelerator-type=v5p-32 "
        "--version=v2-alpha-tpuv5 --quiet",
        describe,
    ]
    assert commands[4].startswith("git archive --format=tar ")
    assert commands[5] == (
        "gcloud compute tpus tpu-vm scp levanter-multihost.tar.gz "
        f"simpo_worker_3:levanter-multihost.tar.gz {zone} --worker=all --quiet"
    )
    assert commands[6].startswith(f"gcloud compute tpus tpu-vm ssh simpo_worker_3 {zone} --worker=all --quiet ")
    assert len(commands) == 7
    assert "#   exec " + " ".join(SEED_COMMAND) in proc.stdout
    assert "#   export WANDB_API_KEY=***" in proc.stdout and "#   export HF_TOKEN=***" in proc.stdout


def test_missing_vm_is_created_then_the_job_runs_on_all_workers_with_the_environment(fake):
    proc = fake.launch(*SEED_FLAGS, "-e", "FOO", "bar baz")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake.verbs() == [
        "tpu-vm describe",
        "tpu-vm create",
        "tpu-vm describe",
        "tpu-vm describe",
        "tpu-vm scp",
        "tpu-vm ssh",
    ]
    create, ssh = fake.calls()[1], fake.calls()[-1]
    assert "--accelerator-type=v5p-32" in create and "--worker=all" in ssh
    for i in range(WORKERS):
        assert f"[worker {i}] FOO=bar baz" in proc.stdout
        assert f"[worker {i}] key=***" in proc.stdout
        code = fake.worker(i) / "levanter-multihost"
        assert (code / "seen_key").read_text().strip() == SECRETS["WANDB_API_KEY"]
        assert (code / "pyproject.toml").exists() and not (code / ".launch" / "env.sh").exists()
        assert (fake.worker(i) / "uv_calls").read_text() == "sync --extra tpu\n"
    assert "WANDB_API_KEY=*** HF_TOKEN=*** FOO=bar baz" in proc.stdout


def test_present_vm_is_not_created(fake):
    fake.set("vm_state", "READY")
    proc = fake.launch(*SEED_FLAGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake.verbs() == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh"]


def test_preemption_on_the_first_try_recreates_the_vm_and_retries(fake):
    fake.set("vm_state", "READY")
    fake.set("ssh_faults", "preempt ok")
    proc = fake.launch(*SEED_FLAGS, "--retries", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake.verbs() == [
        "tpu-vm describe",
        "tpu-vm scp",
        "tpu-vm ssh",
        "tpu-vm describe",
        "tpu-vm describe",
        "tpu-vm delete",
        "tpu-vm create",
        "tpu-vm describe",
        "tpu-vm describe",
        "tpu-vm scp",
        "tpu-vm ssh",
    ]
    assert "is PREEMPTED; trying again (2 of 2)" in proc.stdout
    assert "[worker 3] FOO=" in proc.stdout


def test_dropped_ssh_retries_without_recreating_and_gives_up_after_retries(fake):
    fake.set("vm_state", "READY")
    fake.set("ssh_faults", "drop drop")
    proc = fake.launch(*SEED_FLAGS, "--retries", "1")
    assert proc.returncode == 255
    assert fake.verbs().count("tpu-vm ssh") == 2 and "tpu-vm create" not in fake.verbs()
    assert "giving up (raise --retries)" in proc.stdout


def test_exit_status_follows_the_job_without_retry_and_autodelete_deletes(fake):
    fake.set("vm_state", "READY")
    proc = fake.launch(*SEED_FLAGS, "--autodelete", "-e", "JOB_STATUS", "3")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert fake.verbs() == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh", "tpu-vm describe", "tpu-vm delete"]
    assert "job failed with exit status 3" in proc.stdout
    assert not (fake.state / "vm_state").exists()


def test_spot_capacity_uses_a_queued_resource_and_deletes_it(fake):
    flags = [f if f != "on-demand" else "spot" for f in SEED_FLAGS]
    proc = fake.launch(*flags, "--autodelete")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fake.verbs() == [
        "tpu-vm describe",
        "queued-resources create",
        "tpu-vm describe",
        "queued-resources describe",
        "tpu-vm describe",
        "tpu-vm scp",
        "tpu-vm ssh",
        "queued-resources delete",
    ]
    assert {"--spot", "--node-id=simpo_worker_3"} <= set(fake.calls()[1])


def test_without_foreground_the_job_starts_detached(fake):
    fake.set("vm_state", "READY")
    proc = fake.launch(*[f for f in SEED_FLAGS if f != "--foreground"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started; log: ~/levanter-multihost.log" in proc.stdout
    assert "job started on all workers" in proc.stdout


def test_defaults_come_from_the_levanter_config_file(tmp_path, monkeypatch):
    import argparse

    sys.path.insert(0, str(ROOT / "infra"))
    try:
        import tpu
    finally:
        sys.path.remove(str(ROOT / "infra"))
    (tmp_path / ".levanter.yaml").write_text(
        textwrap.dedent("""\
        zone: europe-west4-b
        tpu: my-v5p
        env: {WANDB_ENTITY: team}
        accel_env: {v5p: {LIBTPU_INIT_ARGS: --xla_tpu_flag}}
    """)
    )
    monkeypatch.chdir(tmp_path)
    for name in ("ZONE", "TPU_NAME", "CAPACITY_TYPE"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    tpu.add_arguments(parser)
    args = parser.parse_args(["--tpu_type", "v5p-32", "-e", "FOO", "1"])
    assert (args.zone, args.tpu_name, args.capacity_type) == ("europe-west4-b", "my-v5p", None)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    env = tpu.job_env(args, tpu.cli_helpers.load_config())
    assert env == {"WANDB_ENTITY": "team", "LIBTPU_INIT_ARGS": "--xla_tpu_flag", "HF_TOKEN": "hf_x", "FOO": "1"}


MORE_SECRETS = {
    "DB_PASSWD": "x1234567",
    "MY_AUTH_HEADER": "abcd1234",
    "github_token": "ghp_lower1234",
    "GCS_CREDS": "gcs-creds-5678",
}
"""Secret by name alone: the old KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL missed the first two and the last (CREDS);
one is lower case."""


def test_values_of_secret_looking_keys_are_masked_in_the_dry_run(fake):
    pairs = [a for k, v in MORE_SECRETS.items() for a in ("-e", k, v)]
    proc = fake.launch("--dry_run", *SEED_FLAGS, *pairs, "-e", "PLAIN_SETTING", "visible1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for key, value in MORE_SECRETS.items():
        assert value not in proc.stdout + proc.stderr, f"{key}'s value was printed"
        assert f"{key}=***" in proc.stdout and f"#   export {key}=***" in proc.stdout
    assert "PLAIN_SETTING=visible1" in proc.stdout, "a value that is no secret was masked"


def test_values_of_secret_looking_keys_are_masked_in_relayed_lines(fake):
    fake.set("vm_state", "READY")
    pairs = [a for k, v in MORE_SECRETS.items() for a in ("-e", k, v)]
    echo = ["sh", "-c", 'echo "pw=$DB_PASSWD auth=$MY_AUTH_HEADER gh=$github_token gcs=$GCS_CREDS"']
    proc = fake.launch(*SEED_FLAGS, *pairs, command=echo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for i in range(WORKERS):
        assert f"[worker {i}] pw=*** auth=*** gh=*** gcs=***" in proc.stdout
    calls = json.dumps(fake.calls())
    for value in MORE_SECRETS.values():
        assert value not in proc.stdout + proc.stderr and value not in calls


def test_documented_tpu_names_are_valid_and_raise_no_warning(fake):
    sys.path.insert(0, str(ROOT / "infra"))
    try:
        import tpu
    finally:
        sys.path.remove(str(ROOT / "infra"))
    # the name after --tpu_name, a config's tpu: or tpu-vm ssh; a flag (--worker) or placeholder (NAME) is none
    pattern = re.compile(r"(?:--tpu_name|\btpu:|tpu-vm ssh)\s+(?!-)([\w-]+)")
    names = {
        (path, name)
        for path in ("README.md", "docs/tpu.md", "infra/tpu.py")
        for name in pattern.findall((ROOT / path).read_text())
        if name != name.upper()
    }
    assert {path for path, _ in names} == {"README.md", "docs/tpu.md", "infra/tpu.py"}, names
    assert [(path, name) for path, name in names if not tpu.TPU_NAME.fullmatch(name)] == []
    warning = "GCP TPU names take lowercase letters, digits and hyphens"
    flags = [f if f != "simpo_worker_3" else "simpo-worker-3" for f in SEED_FLAGS]
    valid, invalid = fake.launch("--dry_run", *flags), fake.launch("--dry_run", *SEED_FLAGS)
    assert valid.returncode == invalid.returncode == 0, valid.stderr + invalid.stderr
    assert warning not in valid.stderr and warning in invalid.stderr, valid.stderr + invalid.stderr
