"""Run the sampler as N emulated hosts through the real launcher (JAX distributed on loopback) and read results."""

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from levanter_multihost.launch_env import local_launch_command, offline_env, sampler_command

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
        return read_jsonl(path)

    def parts(self, host: int | None = None) -> list[Path]:
        """Part files in the run directory, sorted by first prompt; only ``host``'s when given."""
        paths = sorted((self.output_dir / "parts").glob("*.jsonl"))
        return [p for p in paths if host is None or f".h{host:04d}b" in p.name]

    def part_rows(self, host: int | None = None) -> list[dict]:
        return [row for part in self.parts(host) for row in read_jsonl(part)]

    def summary(self) -> dict:
        return json.loads((self.output_dir / "summary.json").read_text())

    def tail(self, n: int = 15000) -> str:
        return self.output[-n:]


def parse_jsonl(data: bytes) -> list[dict]:
    """Rows of JSON lines, split at newline bytes only (generated text may hold U+2028, which str.splitlines
    would split at)."""
    return [json.loads(line) for line in data.split(b"\n") if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    return parse_jsonl(path.read_bytes())


def compile_cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment for a shared persistent compilation cache, which ``launch`` passes to every run through
    ``--trainer.jax_compilation_cache_dir``."""
    return {"LEVANTER_MULTIHOST_TEST_CACHE": str(cache_dir)}


def cache_flags() -> list[str]:
    cache = os.environ.get("LEVANTER_MULTIHOST_TEST_CACHE")
    return [f"--trainer.jax_compilation_cache_dir={cache}"] if cache else []


def host_env(**extra: str) -> dict[str, str]:
    return offline_env(os.environ, **extra)


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
    command = local_launch_command(
        REPO, hosts, devices_per_host, sampler_command(config, output_dir, *cache_flags(), *overrides)
    )
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=host_env(**(env_extra or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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


def run_in_process(output_dir: Path, *overrides: str, config: Path = TINY_CONFIG) -> Run:
    """Run the sampler as one host inside this process (the test session's 4 CPU devices): the same stages, without
    a process start, and with this process's compiled programs."""
    import draccus

    from levanter_multihost.sample_lm_multihost import SampleLmMultihostConfig, main

    args = [f"--output_dir={output_dir}", *cache_flags(), *overrides]
    main(draccus.parse(SampleLmMultihostConfig, config_path=str(config), args=args))
    return Run(0, "", Path(output_dir))


def launch_and_kill(
    output_dir: Path,
    victim: int,
    *overrides: str,
    after_parts: int = 0,
    hosts: int = 4,
    devices_per_host: int = 1,
    timeout: float = 600,
    sig: int = signal.SIGKILL,
) -> tuple[Run, float]:
    """Run with ``--keep_going`` and send ``sig`` to host ``victim`` once it has written ``after_parts`` parts and
    reports progress again (so it dies while it still has batches to sample).

    Returns the run and the seconds from the signal to the launcher's exit.
    """
    command = local_launch_command(
        REPO,
        hosts,
        devices_per_host,
        sampler_command(TINY_CONFIG, output_dir, *cache_flags(), *overrides),
        launcher_flags=("--keep_going", "--grace_s", "5"),
    )
    proc = subprocess.Popen(
        command, cwd=REPO, env=host_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    lines: list[str] = []
    pid = None
    killed_at = None
    deadline = time.monotonic() + timeout
    parts = Path(output_dir) / "parts"
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            if pid is None and f"host {victim} of {hosts} (pid " in line:
                pid = int(line.split("(pid ", 1)[1].split(")", 1)[0])
            decoding = f"host {victim}: batch " in line and "tokens (" in line
            written = len(list(parts.glob(f"*.h{victim:04d}b*.jsonl"))) if parts.exists() else 0
            if killed_at is None and pid is not None and decoding and written >= after_parts:
                os.kill(pid, sig)
                killed_at = time.monotonic()
                lines.append(f"[test] sent signal {sig} to host {victim} (pid {pid}) after {written} parts\n")
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


class Background:
    """The launcher running in the background, its output collected by a thread; for faults injected mid-run."""

    def __init__(
        self, output_dir: Path, *overrides: str, hosts: int = 2, grace_s: float = 10, config: Path = TINY_CONFIG
    ):
        sampler = sampler_command(config, output_dir, "--trainer.model_axis_size=1", *cache_flags(), *overrides)
        command = local_launch_command(REPO, hosts, 1, sampler, launcher_flags=("--grace_s", str(grace_s)))
        self.output_dir = Path(output_dir)
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=host_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pid(self, host: int, timeout: float = 120) -> int:
        """The process id host ``host`` logs at start-up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if f"host {host} of " in line and "(pid " in line:
                    return int(line.split("(pid ", 1)[1].split(")", 1)[0])
            time.sleep(0.1)
        raise AssertionError(f"host {host} never started:\n{self.output[-10000:]}")

    def wait_for_parts(self, count: int, host: int | None = None, timeout: float = 300) -> None:
        pattern = "*.jsonl" if host is None else f"*.h{host:04d}b*.jsonl"
        deadline = time.monotonic() + timeout
        while len(list((self.output_dir / "parts").glob(pattern))) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"never saw {count} parts:\n{self.output[-10000:]}")
            time.sleep(0.1)

    def wait(self, timeout: float = 300) -> Run:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"launcher did not end within {timeout}s:\n{self.output[-15000:]}") from None
        self.reader.join(timeout=10)
        return Run(self.proc.returncode, self.output, self.output_dir)
