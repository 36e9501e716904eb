"""Shared helpers of the bench scripts: configs, launching emulated hosts, reading results, the closing report.

Not a benchmark itself. Every run goes through the real launcher (``infra/launch.py --local_hosts N``) and the
real sampler (through ``bench/bench_sampler.py``, which changes nothing but adds log lines), with each host pinned
to a core by ``bench/pin.py``; results are read from the run's ``summary.json`` (per-host metrics, batch stats and
phases, ``levanter_multihost.summary``) and the log. Every script ends with :func:`report`: its tables printed,
then one JSON file (``bench``, ``when``, ``machine`` with the load average before and after, ``args``, the data).
``BENCH_MARKDOWN=1`` also prints each table as Markdown, for ``docs/benchmarks.md``.
"""

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from levanter_multihost.launch_env import local_launch_command, offline_env
from levanter_multihost.tables import format_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/levanter_multihost_bench"))
TINY_CONFIG = REPO / "config" / "sampler" / "tiny_local.yaml"
SAMPLER_CONFIGS = REPO / "config" / "sampler"
PY = sys.executable
SEED_GENERATION_S = 107.0
"""Generation time per host of the seed's measured run: v5p-16, 2 hosts x 64 prompts x 2048 new tokens, one
round (prefill + decode + compile). The seed's v5p-32 figure (256 prompts, 64 per host) was a prediction from it
(``shared/seed/000_b045e4698a64ea8d.txt``)."""
SEED_CONFIG = "llama8b_v5p16_128x2048.yaml"
"""The config of the seed's measured run."""

Columns = Sequence[tuple[str, str, str]]


def default_checkpoint() -> str:
    """The tiny model: ``assets/tiny-addition``, or ``BENCH_HF_CHECKPOINT``."""
    return os.environ.get("BENCH_HF_CHECKPOINT", str(REPO / "assets" / "tiny-addition"))


def cores() -> list[int]:
    """Cores this process may run on (all of them unless the caller is pinned)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def pinning_note(hosts: int, core_list: list[int]) -> str:
    if hosts <= len(core_list):
        return f"each host pinned to its own core ({core_list[:hosts]})"
    return f"{hosts} hosts on {len(core_list)} cores: host i on core {core_list}[i % {len(core_list)}]"


def loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def wait_for_quiet(limit: float = 2.5, patience_s: float = 1200, step_s: float = 60) -> float | None:
    """Wait (up to ``patience_s``) until the 1-minute load average is at most ``limit``: the machine is shared, and a
    run on a loaded machine measures the other users. Returns the load average it started at."""
    deadline = time.time() + patience_s
    load = loadavg()
    while load is not None and load > limit and time.time() < deadline:
        print(f"load average {load:.2f} > {limit}: waiting {step_s:.0f} s", flush=True)
        time.sleep(step_s)
        load = loadavg()
    return load


def addition_prompts(n: int, path: Path, seed: int = 0) -> Path:
    """``n`` held-out addition prompts (``levanter_multihost.addition.make_prompts``), one per line, at ``path``.
    A larger ``n`` extends a smaller one: the first 256 are ``config/prompts/addition_256.txt``."""
    from levanter_multihost.addition import make_prompts

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(make_prompts(n, seed)) + "\n")
    return path


def write_config(path: Path, base: Path = TINY_CONFIG, **overrides: Any) -> Path:
    """``base`` YAML with ``overrides`` merged in (nested dicts merge key by key), written to ``path``."""
    config = yaml.safe_load(base.read_text())

    def merge(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = value

    merge(config, {"hf_checkpoint": default_checkpoint(), "trainer": {"model_axis_size": 1}, **overrides})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def host_env(**extra: str) -> dict[str, str]:
    return offline_env(os.environ, **extra)


def pinned_launch_command(hosts: int, host_command: Sequence[str], launcher_flags: Sequence[str] = ()) -> list[str]:
    """The launcher's command: ``host_command`` on ``hosts`` hosts of 1 CPU device, each pinned by ``pin.py``."""
    return local_launch_command(REPO, hosts, 1, [PY, str(REPO / "bench" / "pin.py"), *host_command], launcher_flags)


def cache_flag(cache_dir: Path) -> str:
    """The sampler flag that turns on JAX's persistent compilation cache (every host writes its own entries)."""
    return f"--trainer.jax_compilation_cache_dir={cache_dir}"


def launch(
    config: Path,
    output_dir: Path,
    hosts: int,
    *overrides: str,
    env_extra: dict[str, str] | None = None,
    core_list: list[int] | None = None,
    timeout: float = 3600,
    launcher_flags: Sequence[str] = (),
    watch: Callable[[subprocess.Popen, float], None] | None = None,
    check: bool = True,
    log_name: str | None = None,
) -> dict[str, Any]:
    """Run the sampler on ``hosts`` emulated hosts (1 CPU device each, pinned) through ``bench/bench_sampler.py``;
    return the launcher's status, timings, the summary (if written) and what the log says.

    ``watch(proc, elapsed_s)`` is called every 0.2 s while the launcher runs (e.g. to kill a host);
    ``check``: raise if the launcher fails. The log goes to ``<output_dir>.log`` (or ``log_name`` beside it).
    """
    core_list = core_list if core_list is not None else cores()
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir.parent / (log_name or f"{output_dir.name}.log")
    sampler = [
        PY,
        str(REPO / "bench" / "bench_sampler.py"),
        "--config_path",
        str(config),
        f"--output_dir={output_dir}",
        "--trainer.model_axis_size=1",
        "--engine_log=true",
        *overrides,
    ]
    command = pinned_launch_command(hosts, sampler, launcher_flags)
    env = host_env(BENCH_CORES=",".join(map(str, core_list)), **(env_extra or {}))
    load_before = loadavg()
    with open(log_path, "wb") as log:
        launched_at = time.time()
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while proc.poll() is None:
                elapsed = time.time() - launched_at
                if elapsed > timeout:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(60)
                    raise TimeoutError(f"run took over {timeout:.0f} s; log {log_path}")
                if watch is not None:
                    watch(proc, elapsed)
                time.sleep(0.2)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
            raise
        ended_at = time.time()
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0 and check:
        raise RuntimeError(f"run failed ({proc.returncode}); log {log_path}:\n{text[-6000:]}")
    summary_path = output_dir / "summary.json"
    data = json.loads(summary_path.read_text()) if summary_path.exists() and proc.returncode == 0 else {}
    return {
        "hosts": hosts,
        "returncode": proc.returncode,
        "launched_at": launched_at,
        "ended_at": ended_at,
        "wall_outside_s": ended_at - launched_at,
        "loadavg_1m": [load_before, loadavg()],
        "summary": data.get("summary"),
        "host_metrics": sorted(data.get("hosts", []), key=lambda m: m["host"]),
        "leader": data.get("leader"),
        "log": str(log_path),
        "engine_rounds": parse_engine_rounds(text),
        "cpu": parse_cpu(text),
        "cache_hits": parse_cache_hits(text),
    }


_HOST_RE = re.compile(r"^\[host (\d+)\] ")
_ROUND_RE = re.compile(r"Decode iter: total ([0-9.]+)s \(device ([0-9.]+)s, host ([0-9.]+)s.*?, ([0-9]+) new")
_BATCH_RE = re.compile(r"Batch generated in ([0-9.]+)s, ([0-9]+) tokens")
_HIT_RE = re.compile(r"Persistent compilation cache hit for 'jit_(\w+)'")
_CPU_RE = re.compile(r"BENCH host=(\d+) generate_cpu_s=([0-9.]+) generate_wall_s=([0-9.]+)")


def _by_host(log: str, regex: re.Pattern) -> dict[int, list[re.Match]]:
    out: dict[int, list[re.Match]] = {}
    for line in log.splitlines():
        host = _HOST_RE.match(line)
        if host is not None and (m := regex.search(line)):
            out.setdefault(int(host.group(1)), []).append(m)
    return out


def parse_engine_rounds(log: str) -> dict[int, list[list]]:
    """Per host, the engine's own line for every decode round (``Decode iter: total Xs (device Ys, host Zs ...),
    N new``) in order, each ``[total_s, device_s, host_s, new_tokens, batch]``; ``batch`` counts the engine's
    ``Batch generated`` lines before it. Logged only with ``--engine_log true`` (which :func:`launch`
    passes): the sampler otherwise keeps ``levanter.inference`` at WARNING."""
    out: dict[int, list[list]] = {}
    batches: dict[int, int] = {}
    for line in log.splitlines():
        host = _HOST_RE.match(line)
        if host is None:
            continue
        h = int(host.group(1))
        if m := _ROUND_RE.search(line):
            out.setdefault(h, []).append(
                [float(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4)), batches.get(h, 0)]
            )
        elif _BATCH_RE.search(line):
            batches[h] = batches.get(h, 0) + 1
    return out


def steady_rounds(run: dict[str, Any], host: int) -> list[list]:
    """The host's decode rounds from the second on (the first carries the compile and first-call costs)."""
    return run["engine_rounds"].get(host, [])[1:]


def parse_cpu(log: str) -> dict[int, dict[str, float]]:
    """Per host, from ``bench/bench_sampler.py``: CPU and wall seconds of all its ``InferenceEngine.generate`` calls."""
    out: dict[int, dict[str, float]] = {}
    for h, matches in _by_host(log, _CPU_RE).items():
        out[h] = {"cpu_s": sum(float(m.group(2)) for m in matches), "wall_s": sum(float(m.group(3)) for m in matches)}
    return out


def parse_cache_hits(log: str) -> dict[int, list[str]]:
    """Per host, the programs loaded from the persistent compilation cache (``JAX_LOG_COMPILES`` lines)."""
    return {h: [m.group(1) for m in ms] for h, ms in _by_host(log, _HIT_RE).items()}


def phase_s(metrics: dict[str, Any], name: str) -> float:
    """Seconds a host spent in phase ``name`` (phases are lists of [start, end] spans)."""
    return sum(end - start for start, end in metrics["phases"].get(name, []))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cores": os.cpu_count(), "usable_cores": cores(), "cpu": cpu, "python": sys.version.split()[0]}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Columns) -> str:
    """The rows as a Markdown table (text left-aligned, numbers right-aligned)."""

    def cell(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "–"

    numeric = [
        any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
        for k, _, _ in columns
    ]
    lines = [
        "| " + " | ".join(t for _, t, _ in columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    """What a script prints and writes at the end: started at the script's start, so the machine's load average
    is read before and after the runs."""

    def __init__(self, bench: str, args: Any):
        self.bench, self.args = bench, args
        self.started = time.time()
        self.load_before = loadavg()
        self.tables: list[tuple[str, Sequence[dict], Columns]] = []

    def table(self, title: str, rows: Sequence[dict[str, Any]], columns: Columns) -> None:
        """Print ``rows`` now and keep them for the end."""
        print(f"\n{title}\n{format_table(rows, columns)}", flush=True)
        if os.environ.get("BENCH_MARKDOWN"):
            print(markdown_table(rows, columns), flush=True)
        self.tables.append((title, list(rows), columns))

    def write(self, out: Path | str, **data: Any) -> None:
        """Every table again, then one JSON file: bench, when, seconds, machine (load before/after), args, data."""
        path = Path(out)
        info = dict(machine(), loadavg_1m_before=self.load_before, loadavg_1m_after=loadavg())
        args = vars(self.args) if hasattr(self.args, "__dict__") else self.args
        record = {
            "bench": self.bench,
            "when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
            "seconds": time.time() - self.started,
            "machine": info,
            "args": args,
            "tables": {title: rows for title, rows, _ in self.tables},
            **data,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str))
        load = f"{self.load_before:.2f} -> {info['loadavg_1m_after']:.2f}" if self.load_before is not None else "?"
        print(
            f"\n{self.bench}: {info['cores']} cores, 1-min load average {load}, {record['seconds']:.0f} s; "
            f"wrote {path}",
            flush=True,
        )


_CONTROL = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
import numpy as np
a = np.random.default_rng(0).random((384, 384), dtype=np.float32)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < float(sys.argv[2]):
    a @ a
    n += 1
print(n / (time.perf_counter() - start))
"""


def machine_parallel_speedup(core_list: list[int], seconds: float = 3.0) -> dict[str, float]:
    """Control: a single-threaded numpy matmul loop on 1 core, then one copy per core at once.

    The ratio (sum of the concurrent rates / the lone rate) is what this machine gives independent processes
    right now (other users' load included): the ceiling for the multi-host speedup measured here.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def start(core: int) -> subprocess.Popen:
        return subprocess.Popen(
            [PY, "-c", _CONTROL, str(core), str(seconds)], env=env, stdout=subprocess.PIPE, text=True
        )

    alone = float(start(core_list[0]).communicate()[0])
    procs = [start(c) for c in core_list]
    together = [float(p.communicate()[0]) for p in procs]
    return {"alone_per_s": alone, "together_per_s": together, "speedup": sum(together) / alone}
