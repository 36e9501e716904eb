"""TPU backend of infra/launch.py: run one command on every worker of a Cloud TPU VM through ``gcloud``.

    # the seed's v5p-32 run (docs/tpu.md); add --dry_run to print every command instead of running it
    uv run python infra/launch.py --foreground --zone us-central1-a --tpu_name simpo-worker-3 \
        --tpu_type v5p-32 --capacity_type on-demand -- \
        uv run python -m levanter_multihost.sample_lm_multihost \
        --config_path config/sampler/llama8b_v5p32_256x2048.yaml

Steps: describe the VM; create it when missing (``tpu-vm create`` for on-demand, a queued resource for spot,
preemptible and reserved capacity) or recreate it when preempted; wait until READY; ship ``git archive HEAD`` plus a
generated ``.launch/run.sh`` and a mode-600 ``.launch/env.sh`` as one tarball (``tpu-vm scp --worker=all``); run
it on all workers at once (``tpu-vm ssh --worker=all``), where run.sh installs uv if missing, syncs the ``tpu``
extra and execs the command. Secrets travel only inside env.sh, never in a command line, and every line this
backend prints or relays has their values replaced by ``***``. Retries follow a preemption (state PREEMPTED or
TERMINATED) or a dropped ssh (exit 255); ``--autodelete`` deletes the VM at the end.

Reuses levanter.infra.cli_helpers for the config file (``.levanter.yaml``: ``zone``, ``tpu``, ``env``,
``accel_env``), flag defaults and the capacity-type flags. Leaves out docker (docs/tpu.md says why), multislice
and Ray.
"""

import importlib.metadata
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REMOTE_DIR = "levanter-multihost"
"""The code's directory under each worker's home; replaced on every launch."""
BUNDLE = "levanter-multihost.tar.gz"
JOB_LOG = "levanter-multihost.log"
FORWARDED_ENV = ("WANDB_API_KEY", "HF_TOKEN")
SECRET_KEY = re.compile(r"PASS|TOKEN|KEY|AUTH|SECRET|CRED|PRIVATE|SIGNATURE", re.IGNORECASE)
"""Keys whose values are shown as ``***``; wide on purpose: masking AUTHOR's value costs less than a leak."""
QUEUED_FLAGS = {"spot": "--spot", "preemptible": "--spot", "best-effort": "--spot", "reserved": "--reserved"}
"""Capacity types asked for as a queued resource; GCP replaced preemptible TPUs by Spot, so those ask for Spot."""
RUNTIME_VERSIONS = {"v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
DEFAULT_RUNTIME_VERSION = "tpu-ubuntu2204-base"
WAITING_STATES = {"CREATING", "STARTING", "RESTARTING", "REPAIRING"}
LOST_STATES = {"PREEMPTED", "TERMINATED"}
SSH_DROPPED = 255
TPU_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
WORKER_NUMBER_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"


def _import_on_first_use(name: str) -> None:
    """Register module ``name`` so that it loads when first used (the standard library's LazyLoader)."""
    if name in sys.modules or (spec := importlib.util.find_spec(name)) is None:
        return
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)
    spec.loader.exec_module(module)


def _levanter_infra(name: str):
    """Load ``levanter/infra/<name>.py`` by path: ``import levanter`` would pull in JAX and the trainer (~15 s).

    cli_helpers imports google.cloud.storage (~1.3 s) for ``gcloud_config()`` alone, which this launcher does not
    call, so that import is deferred to first use.
    """
    _import_on_first_use("google.cloud.storage")
    spec = importlib.util.find_spec("levanter")
    path = Path(spec.submodule_search_locations[0]) / "infra" / f"{name}.py" if spec else None
    if path is None or not path.is_file():
        version = importlib.metadata.version("levanter") if spec else "not installed"
        raise ImportError(f"levanter {version} has no levanter/infra/{name}.py; pin levanter in pyproject.toml")
    module_spec = importlib.util.spec_from_file_location(f"_levanter_infra_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


cli_helpers = _levanter_infra("cli_helpers")


class LaunchError(RuntimeError):
    """The launch cannot go on; the message names the value, the limit or state, and the fix."""


def add_arguments(parser) -> None:
    """Add the TPU flags; defaults come from ``.levanter.yaml`` (or ``.config``) and upper-case env vars."""
    config = cli_helpers.load_config()
    group = parser.add_argument_group("TPU VM (gcloud)")
    add = cli_helpers.add_arg
    add(group, config, ["--tpu_name"], default=config.tpu, help="TPU VM to use; created when missing.")
    add(group, config, ["--tpu_type"], help="Accelerator type, e.g. v5p-32 (required with --tpu_name).")
    add(group, config, ["--zone"], help="Zone of the VM, e.g. us-central1-a (default: gcloud's compute/zone).")
    cli_helpers.add_capacity_type_args(group, config)
    group.add_argument("--runtime_version", help="TPU software version to create with (default: by generation).")
    group.add_argument("--foreground", action="store_true", help="Wait for the job and stream worker output.")
    group.add_argument("--retries", type=int, default=2, help="Reruns after a preemption or dropped ssh.")
    group.add_argument("--autodelete", action="store_true", help="Delete the VM when the job ends (--foreground).")
    group.add_argument(
        "-e",
        "--env",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="Environment variable for the job (repeatable).",
    )
    group.add_argument("--dry_run", action="store_true", help="Print every command in order; run none.")
    group.add_argument("--poll_s", type=float, default=30.0, help="Seconds between state checks while waiting.")
    group.add_argument("--ready_timeout_s", type=float, default=4 * 3600.0, help="Longest wait for READY.")


@dataclass(frozen=True)
class Job:
    name: str
    zone: str
    tpu_type: str
    capacity_type: str
    runtime_version: str
    command: list[str]
    env: dict[str, str]
    commit: str
    foreground: bool
    retries: int
    autodelete: bool
    poll_s: float
    ready_timeout_s: float

    @property
    def queued(self) -> bool:
        return self.capacity_type in QUEUED_FLAGS


def is_secret(key: str) -> bool:
    return key in FORWARDED_ENV or bool(SECRET_KEY.search(key))


def shown_env(env: dict[str, str]) -> str:
    return " ".join(f"{k}={'***' if is_secret(k) else v}" for k, v in env.items()) or "(none)"


class Masker:
    """Replaces every secret value in a line of text with ``***``."""

    def __init__(self, env: dict[str, str]):
        self.secrets = sorted({v for k, v in env.items() if is_secret(k) and len(v) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def job_env(args, config) -> dict[str, str]:
    """Config ``env``/``accel_env``, then WANDB_API_KEY and HF_TOKEN from here, then ``-e`` pairs."""
    env = dict(config.env_for_accel(args.tpu_type))
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    env.update(dict(args.env))
    bad = [k for k in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    if bad:
        raise LaunchError(f"environment variable name(s) {bad} are not valid shell names; fix the -e KEY")
    return env


def make_job(args, command: list[str]) -> Job:
    if not args.tpu_type:
        raise LaunchError("--tpu_type is required with --tpu_name (e.g. --tpu_type v5p-32)")
    if args.retries < 0:
        raise LaunchError(f"--retries is {args.retries}; it must be >= 0")
    if args.autodelete and not args.foreground:
        raise LaunchError("--autodelete needs --foreground: the launcher must wait for the job to delete the VM")
    zone = args.zone
    if not zone and not args.dry_run:
        zone = cli_helpers.get_default_zone()
    if not zone:
        raise LaunchError("no zone: pass --zone, set zone in .levanter.yaml, or run gcloud config set compute/zone")
    return Job(
        name=args.tpu_name,
        zone=zone,
        tpu_type=args.tpu_type,
        capacity_type=args.capacity_type or "on-demand",
        runtime_version=args.runtime_version
        or RUNTIME_VERSIONS.get(args.tpu_type.split("-")[0], DEFAULT_RUNTIME_VERSION),
        command=command,
        env=job_env(args, cli_helpers.load_config()),
        commit=_git("rev-parse", "HEAD").strip(),
        foreground=args.foreground,
        retries=args.retries,
        autodelete=args.autodelete,
        poll_s=args.poll_s,
        ready_timeout_s=args.ready_timeout_s,
    )


def _git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"git {' '.join(argv)} failed ({e}); run the launcher from the project's git checkout")


# ---- the commands -------------------------------------------------------------------------------------------


def _tpus(job: Job, group: str, verb: str, *flags: str) -> list[str]:
    return ["gcloud", "compute", "tpus", group, verb, job.name, f"--zone={job.zone}", *flags]


def describe_argv(job: Job) -> list[str]:
    return _tpus(job, "tpu-vm", "describe", "--format=value(state)")


def queued_describe_argv(job: Job) -> list[str]:
    return _tpus(job, "queued-resources", "describe", "--format=value(state.state)")


def create_argv(job: Job) -> list[str]:
    if job.queued:
        return _tpus(
            job,
            "queued-resources",
            "create",
            f"--node-id={job.name}",
            f"--accelerator-type={job.tpu_type}",
            f"--runtime-version={job.runtime_version}",
            QUEUED_FLAGS[job.capacity_type],
            "--quiet",
        )
    return _tpus(
        job, "tpu-vm", "create", f"--accelerator-type={job.tpu_type}", f"--version={job.runtime_version}", "--quiet"
    )


def delete_argv(job: Job) -> list[str]:
    if job.queued:
        return _tpus(job, "queued-resources", "delete", "--force", "--quiet")
    return _tpus(job, "tpu-vm", "delete", "--quiet")


def archive_argv(job: Job) -> list[str]:
    return ["git", "archive", "--format=tar", job.commit]


def scp_argv(job: Job, bundle: str) -> list[str]:
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        bundle,
        f"{job.name}:{BUNDLE}",
        f"--zone={job.zone}",
        "--worker=all",
        "--quiet",
    ]


def remote_command(job: Job) -> str:
    """What ssh runs on each worker: unpack the bundle in place of the last one, then run run.sh."""
    unpack = f"cd && rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && tar -xzf {BUNDLE} -C {REMOTE_DIR} && rm {BUNDLE}"
    run_sh = f"{REMOTE_DIR}/.launch/run.sh"
    if job.foreground:
        worker = f"w=$(curl -sf --max-time 5 -H Metadata-Flavor:Google {WORKER_NUMBER_URL} || hostname)"
        return f'set -o pipefail; {unpack} && {worker} && bash {run_sh} 2>&1 | sed -u "s/^/[worker $w] /"'
    return (
        f"{unpack} && (nohup bash {run_sh} > {JOB_LOG} 2>&1 < /dev/null &) && "
        f'echo "[worker $(hostname)] started; log: ~/{JOB_LOG}"'
    )


def ssh_argv(job: Job, command: str) -> list[str]:
    return _tpus(job, "tpu-vm", "ssh", "--worker=all", "--quiet", f"--command={command}")


def run_script(job: Job) -> str:
    """``.launch/run.sh``: one worker's part of the job. Holds no secret (those are in env.sh)."""
    return f"""#!/usr/bin/env bash
# Written by infra/launch.py for commit {job.commit}: one worker's part of the job.
set -euo pipefail
cd "$HOME/{REMOTE_DIR}"
pidfile="$HOME/{REMOTE_DIR}.pid"
if [ -s "$pidfile" ]; then
  old=$(cat "$pidfile")
  case "$(readlink "/proc/$old/cwd" 2>/dev/null)" in
    "$HOME/{REMOTE_DIR}"*) echo "stopping the previous job (pid $old)"; kill "$old" || true; sleep 5 ;;
  esac
fi
echo $$ > "$pidfile"
set -a; . .launch/env.sh; set +a; rm -f .launch/env.sh
export PATH="$HOME/.local/bin:$PATH" UV_PROJECT_ENVIRONMENT="$HOME/.venv-{REMOTE_DIR}"
command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
uv sync --extra tpu
exec {shlex.join(job.command)}
"""


def env_script(env: dict[str, str], masked: bool = False) -> str:
    return "".join(f"export {k}={'***' if masked and is_secret(k) else shlex.quote(v)}\n" for k, v in env.items())


def build_bundle(job: Job, path: Path) -> None:
    """``git archive`` of the commit plus ``.launch/run.sh`` and ``.launch/env.sh`` (mode 600), gzipped."""
    code = subprocess.run(archive_argv(job), check=True, capture_output=True).stdout
    with tarfile.open(path, "w:gz") as out, tarfile.open(fileobj=io.BytesIO(code)) as src:
        for member in src:
            out.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name, text, mode in (
            (".launch/run.sh", run_script(job), 0o755),
            (".launch/env.sh", env_script(job.env), 0o600),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            out.addfile(info, io.BytesIO(data))


# ---- running them -------------------------------------------------------------------------------------------


def say(text: str, err: bool = False) -> None:
    print(f"[launch] {text}", file=sys.stderr if err else sys.stdout, flush=True)


class Shell:
    """Runs commands; their output (stdout and stderr) passes through the secret mask."""

    def __init__(self, mask: Masker):
        self.mask = mask

    def run(self, argv: list[str], quiet: bool = False) -> tuple[int, str]:
        """Run ``argv``; relay its lines unless ``quiet``; return its status and output."""
        if not quiet:
            say("running: " + self.mask(shlex.join(argv)))
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except FileNotFoundError as e:
            raise LaunchError(f"{argv[0]} is not on PATH; install the Google Cloud SDK (gcloud)") from e
        lines = []
        relay = threading.Thread(target=self._relay, args=(proc.stdout, lines, quiet), daemon=True)
        relay.start()
        status = proc.wait()
        relay.join()
        return status, "".join(lines)

    def _relay(self, stream, lines: list[str], quiet: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = self.mask(raw.decode("utf-8", errors="replace"))
            lines.append(line)
            if not quiet:
                sys.stdout.write(line)
                sys.stdout.flush()


def vm_state(shell: Shell, job: Job) -> str | None:
    """The VM's state, or None when it does not exist."""
    status, out = shell.run(describe_argv(job), quiet=True)
    if status == 0:
        return out.strip().splitlines()[-1] if out.strip() else "UNKNOWN"
    if "NOT_FOUND" in out or "not found" in out.lower():
        return None
    raise LaunchError(f"describing TPU {job.name} failed (exit {status}): {out.strip()}")


def ensure_ready(shell: Shell, job: Job) -> None:
    """Create (or recreate, when preempted) the VM as needed and wait until it is READY."""
    state = vm_state(shell, job)
    if state in LOST_STATES:
        say(f"TPU {job.name} is {state}; deleting it to create it again")
        delete_vm(shell, job)
        state = None
    if state is None:
        say(f"creating TPU {job.name} ({job.tpu_type}, {job.capacity_type}, {job.zone})")
        status, _ = shell.run(create_argv(job))
        if status != 0:
            raise LaunchError(f"creating TPU {job.name} failed (exit {status}); see gcloud's message above")
        state = vm_state(shell, job)
    wait_ready(shell, job, state)


def wait_ready(shell: Shell, job: Job, state: str | None) -> None:
    deadline = time.monotonic() + job.ready_timeout_s
    while state != "READY":
        if state is None and job.queued:
            status, out = shell.run(queued_describe_argv(job), quiet=True)
            queued_state = out.strip() if status == 0 else "MISSING"
            if queued_state in ("FAILED", "SUSPENDED", "MISSING"):
                raise LaunchError(
                    f"queued resource {job.name} is {queued_state}; see `{shlex.join(queued_describe_argv(job))}`"
                )
        elif state is None:
            raise LaunchError(
                f"TPU {job.name} is missing after its creation; check `{shlex.join(describe_argv(job))}`"
            )
        elif state not in WAITING_STATES:
            raise LaunchError(f"TPU {job.name} is {state}, which the launcher does not wait for; fix or delete it")
        if time.monotonic() > deadline:
            raise LaunchError(
                f"TPU {job.name} not READY after {job.ready_timeout_s:.0f} s (state {state}); "
                "raise --ready_timeout_s or check the capacity in the zone"
            )
        say(f"waiting for TPU {job.name} (state {state or 'queued'}); next check in {job.poll_s:.0f} s")
        time.sleep(job.poll_s)
        state = vm_state(shell, job)
    say(f"TPU {job.name} is READY")


def delete_vm(shell: Shell, job: Job) -> int:
    status, _ = shell.run(delete_argv(job))
    if status != 0:
        say(
            f"deleting TPU {job.name} failed (exit {status}); delete it by hand: {shlex.join(delete_argv(job))}",
            err=True,
        )
    return status


def attempt(shell: Shell, job: Job, bundle: Path) -> int:
    """One try: VM ready, code shipped, job run on all workers. Returns the status of the step that ended it."""
    ensure_ready(shell, job)
    status, _ = shell.run(scp_argv(job, str(bundle)))
    if status != 0:
        return status
    say(f"running on all workers of {job.name}: {shlex.join(job.command)}")
    status, _ = shell.run(ssh_argv(job, remote_command(job)))
    return status


def retry_reason(shell: Shell, job: Job, status: int) -> str | None:
    """Why a failed try is worth another (preempted VM or dropped ssh), or None when the job itself failed."""
    state = vm_state(shell, job)
    if state in LOST_STATES:
        return f"TPU {job.name} is {state}"
    if status == SSH_DROPPED:
        return "ssh dropped (exit 255)"
    return None


def print_plan(job: Job) -> None:
    """The dry run: every command in the order a launch runs it, with the conditions as comments."""
    lines = [
        f"# dry run: nothing is run. Commit {job.commit}; environment: {shown_env(job.env)}",
        shlex.join(describe_argv(job)),
        f"# if the state is {' or '.join(sorted(LOST_STATES))}:",
        shlex.join(delete_argv(job)),
        "# if missing (or just deleted):",
        shlex.join(create_argv(job)),
        f"# until the state is READY, every {job.poll_s:.0f} s:",
        shlex.join(describe_argv(job)),
        f"{shlex.join(archive_argv(job))}  # + .launch/run.sh, .launch/env.sh -> {BUNDLE}",
        shlex.join(scp_argv(job, BUNDLE)),
        shlex.join(ssh_argv(job, remote_command(job))),
        "# .launch/run.sh:",
        *("#   " + line for line in run_script(job).splitlines()),
        "# .launch/env.sh (mode 600, removed once read):",
        *("#   " + line for line in env_script(job.env, masked=True).splitlines()),
    ]
    if job.foreground:
        lines.append(
            f"# on state PREEMPTED/TERMINATED or ssh exit {SSH_DROPPED}: again from describe, "
            f"up to {job.retries} more time(s)"
        )
    if job.autodelete:
        lines += ["# at the end:", shlex.join(delete_argv(job))]
    print("\n".join(lines), flush=True)


def run(args, command: list[str]) -> int:
    """Launch ``command`` on every worker of ``args.tpu_name``; return the job's exit status."""
    try:
        job = make_job(args, command)
        if not TPU_NAME.fullmatch(job.name):
            say(
                f"warning: GCP TPU names take lowercase letters, digits and hyphens; gcloud may reject {job.name!r}",
                err=True,
            )
        if args.dry_run:
            print_plan(job)
            return 0
        if _git("status", "--porcelain", "--untracked-files=no").strip():
            say(f"warning: uncommitted changes are not shipped; the workers run commit {job.commit}", err=True)
        say(f"environment for the job: {shown_env(job.env)}")
        return _launch(Shell(Masker(job.env)), job)
    except LaunchError as e:
        say(f"error: {e}", err=True)
        return 1


def _launch(shell: Shell, job: Job) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="launch-"))
    try:
        bundle = workdir / BUNDLE
        say(f"packing commit {job.commit[:12]} with .launch/run.sh and .launch/env.sh into {BUNDLE}")
        build_bundle(job, bundle)
        tries = 1
        while (status := attempt(shell, job, bundle)) != 0:
            reason = retry_reason(shell, job, status)
            if reason is None:
                say(f"job failed with exit status {status}")
                return status
            if tries > job.retries:
                say(f"{reason} on try {tries} of {job.retries + 1}; giving up (raise --retries)")
                return status
            tries += 1
            say(f"{reason}; trying again ({tries} of {job.retries + 1})")
        say("job finished on all workers" if job.foreground else "job started on all workers")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if job.autodelete:
            say(f"--autodelete: deleting TPU {job.name}")
            delete_vm(shell, job)
