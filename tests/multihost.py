"""Run the sampler as N emulated hosts through the real launcher (JAX distributed on loopback) and read results."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "config" / "sampler" / "tiny_local.yaml"


@dataclass
class Run:
    returncode: int
    output: str
    output_dir: Path
    wandb_dir: Path | None = None

    def rows(self, name: str = "merged.jsonl") -> list[dict]:
        path = self.output_dir / name
        assert path.exists(), f"{path} missing; launcher output:\n{self.tail()}"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def summary(self) -> dict:
        return json.loads((self.output_dir / "summary.json").read_text())

    def tail(self, n: int = 15000) -> str:
        return self.output[-n:]


def compile_cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment for a shared persistent compilation cache, which ``launch`` passes to every run through
    ``--trainer.jax_compilation_cache_dir``."""
    return {"LEVANTER_MULTIHOST_TEST_CACHE": str(cache_dir)}


def cache_flags() -> list[str]:
    cache = os.environ.get("LEVANTER_MULTIHOST_TEST_CACHE")
    return [f"--trainer.jax_compilation_cache_dir={cache}"] if cache else []


def host_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def launch(
    output_dir: Path,
    *overrides: str,
    hosts: int = 4,
    devices_per_host: int = 4,
    config: Path = TINY_CONFIG,
    timeout: float = 600,
    env_extra: dict[str, str] | None = None,
    check: bool = True,
) -> Run:
    """Run the sampler on ``hosts`` emulated hosts; ``overrides`` are draccus flags (``--max_new_tokens=4``)."""
    command = [
        sys.executable, str(REPO / "infra" / "launch.py"),
        "--local_hosts", str(hosts), "--devices_per_host", str(devices_per_host), "--",
        sys.executable, "-m", "levanter_multihost.sample_lm_multihost",
        "--config_path", str(config), f"--output_dir={output_dir}", *cache_flags(), *overrides,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=REPO, env=host_env(**(env_extra or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"launcher timed out after {timeout}s:\n{out.decode(errors='replace')[-15000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    run = Run(proc.returncode, out.decode(errors="replace"), Path(output_dir))
    if check:
        assert run.returncode == 0, f"launcher exited {run.returncode}:\n{run.tail()}"
    return run


def launch_and_kill(
    output_dir: Path, victim: int, *overrides: str, hosts: int = 4, devices_per_host: int = 1, timeout: float = 600
) -> tuple[Run, float]:
    """Run with ``--keep_going`` and SIGKILL host ``victim`` as soon as it reports decoding progress.

    Returns the run and the seconds from the kill to the launcher's exit.
    """
    command = [
        sys.executable, str(REPO / "infra" / "launch.py"), "--keep_going",
        "--local_hosts", str(hosts), "--devices_per_host", str(devices_per_host), "--",
        sys.executable, "-m", "levanter_multihost.sample_lm_multihost",
        "--config_path", str(TINY_CONFIG), f"--output_dir={output_dir}", *cache_flags(), *overrides,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=REPO, env=host_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    lines: list[str] = []
    pid = None
    killed_at = None
    deadline = time.monotonic() + timeout
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if pid is None and f"host {victim} of {hosts} (pid " in line:
                pid = int(line.split("(pid ", 1)[1].split(")", 1)[0])
            if killed_at is None and pid is not None and f"host {victim}: " in line and "tokens (" in line:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                lines.append(f"[test] killed host {victim} (pid {pid})\n")
            if time.monotonic() > deadline:
                raise AssertionError("timed out:\n" + "".join(lines)[-15000:])
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    assert killed_at is not None, f"host {victim} never reported progress:\n{output[-15000:]}"
    return Run(proc.returncode, output, Path(output_dir)), time.monotonic() - killed_at
