"""Shared helpers of the bench scripts: configs, launching emulated hosts, reading results, tables, JSON.

Not a benchmark itself. Every run goes through the real launcher (``infra/launch.py --local_hosts N``) and the
real sampler, with each host pinned to a core by ``bench/pin.py``; results are read from the run's
``summary.json`` (per-host metrics and phases), the files' modification times and the log.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SCRATCH = Path(os.environ.get("BENCH_SCRATCH", "/tmp/levanter_multihost_bench"))
TINY_CONFIG = REPO / "config" / "sampler" / "tiny_local.yaml"
PY = sys.executable
SEED_GENERATION_S = 107.0
"""Generation time per host of the seed's v5p-32 run (256 prompts x 2048 new tokens)."""


def default_checkpoint() -> str:
    """The tiny model: ``assets/tiny-addition`` once it exists, else ``BENCH_HF_CHECKPOINT`` or ``/tmp/exp1``."""
    if "BENCH_HF_CHECKPOINT" in os.environ:
        return os.environ["BENCH_HF_CHECKPOINT"]
    asset = REPO / "assets" / "tiny-addition"
    if (asset / "config.json").exists():
        return str(asset)
    return "/tmp/exp1"


def cores() -> list[int]:
    """Cores this process may run on (all of them unless the caller is pinned)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def pinning_note(hosts: int, core_list: list[int]) -> str:
    if hosts <= len(core_list):
        return f"each host pinned to its own core ({core_list[:hosts]})"
    return f"{hosts} hosts on {len(core_list)} cores: hosts share cores (host i on core {core_list}[i % {len(core_list)}])"


def addition_prompts(n: int, path: Path, seed: int = 0) -> Path:
    """``n`` held-out addition prompts (``levanter_multihost.addition.make_prompts``), one per line, at ``path``."""
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

    merge(config, overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def host_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "PYTHONUNBUFFERED": "1",
            "JAX_LOG_COMPILES": "1",  # per-program compile / cache-load times in the log (parsed below)
        }
    )
    env.update(extra)
    return env


def cache_flag(cache_dir: Path) -> str:
    """The sampler flag that turns on JAX's persistent compilation cache (``runtime.start`` sets min time 0)."""
    return f"--trainer.jax_compilation_cache_dir={cache_dir}"


def launch(
    config: Path,
    output_dir: Path,
    hosts: int,
    *overrides: str,
    env_extra: dict[str, str] | None = None,
    core_list: list[int] | None = None,
    timeout: float = 900,
    bench_sampler: bool = False,
) -> dict[str, Any]:
    """Run the sampler on ``hosts`` emulated hosts (1 CPU device each, pinned); return timings and the summary.

    ``bench_sampler``: through ``bench/bench_sampler.py`` (CPU time of each host's generation in ``run["cpu"]``).
    """
    entry = ["-m", "levanter_multihost.sample_lm_multihost"]
    if bench_sampler:
        entry = [str(REPO / "bench" / "bench_sampler.py")]
    env_extra = dict(env_extra or {})
    core_list = core_list if core_list is not None else cores()
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "launch.log"
    command = [
        PY, str(REPO / "infra" / "launch.py"), "--local_hosts", str(hosts), "--devices_per_host", "1", "--",
        PY, str(REPO / "bench" / "pin.py"), PY, *entry,
        "--config_path", str(config), f"--output_dir={output_dir}", "--trainer.model_axis_size=1", *overrides,
    ]  # fmt: skip
    env = host_env(BENCH_CORES=",".join(map(str, core_list)), **env_extra)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with open(log_path, "wb") as log:
        launched_at = time.time()
        proc = subprocess.run(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
        ended_at = time.time()
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}); log {log_path}:\n{text[-6000:]}")
    summary = json.loads((output_dir / "summary.json").read_text())
    return {
        "hosts": hosts,
        "launched_at": launched_at,
        "ended_at": ended_at,
        "wall_outside_s": ended_at - launched_at,
        "loadavg_1m": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
        "summary": summary["summary"],
        "host_metrics": summary["hosts"],
        "leader": summary.get("leader"),
        "log": str(log_path),
        "compiles": parse_compiles(text),
        "cpu": parse_cpu(text),
        "files": {
            name: os.stat(output_dir / name).st_mtime
            for name in ("merged.jsonl", "summary.json", "timeline.png")
            if (output_dir / name).exists()
        },
    }


_HOST_RE = re.compile(r"^\[host (\d+)\] ")
_STEP_RES = {
    "trace": re.compile(r"Finished tracing (\w+) for jit in ([0-9.]+) sec"),
    "lower": re.compile(r"Finished jaxpr to MLIR module conversion jit\((\w+)\) in ([0-9.]+) sec"),
    "compile": re.compile(r"Finished XLA compilation of jit\((\w+)\) in ([0-9.]+) sec"),
}
_HIT_RE = re.compile(r"Persistent compilation cache hit for 'jit_(\w+)'")
ENGINE_PROGRAMS = ("_run_prefill", "_run_generation_loop")
"""The engine's two big programs, traced, lowered and compiled (or loaded from the cache) in the first generate."""


def parse_compiles(log: str) -> dict[int, dict[str, Any]]:
    """Per host (from JAX_LOG_COMPILES lines): seconds per step (trace, lower, compile) per program, cache hits.

    "compile" is XLA compilation, or loading the executable when the persistent cache hits.
    """
    out: dict[int, dict[str, Any]] = {}
    for line in log.splitlines():
        host_match = _HOST_RE.match(line)
        if host_match is None:
            continue
        host = out.setdefault(int(host_match.group(1)), {"trace": {}, "lower": {}, "compile": {}, "hits": []})
        for step, regex in _STEP_RES.items():
            if m := regex.search(line):
                host[step][m.group(1)] = host[step].get(m.group(1), 0.0) + float(m.group(2))
                break
        else:
            if m := _HIT_RE.search(line):
                host["hits"].append(m.group(1))
    return out


_CPU_RE = re.compile(r"BENCH host=(\d+) generate_cpu_s=([0-9.]+) generate_wall_s=([0-9.]+)")


def parse_cpu(log: str) -> dict[int, dict[str, float]]:
    """Per host, from bench/bench_sampler.py: CPU and wall seconds of generate_rows."""
    out = {}
    for m in _CPU_RE.finditer(log):
        out[int(m.group(1))] = {"cpu_s": float(m.group(2)), "wall_s": float(m.group(3))}
    return out


def engine_compile_s(run: dict[str, Any], host: int, steps=("compile",)) -> float:
    """Seconds ``host`` spent on the engine's two big programs in ``steps`` (trace, lower, compile)."""
    info = run["compiles"].get(host, {})
    return sum(info.get(step, {}).get(name, 0.0) for step in steps for name in ENGINE_PROGRAMS)


def engine_overhead_s(run: dict[str, Any], host: int) -> float:
    """Trace + lower + compile (or cache load) of the engine's programs: the part of a host's round time that is
    not generation (all of it happens inside the first prefill and the first decode call)."""
    return engine_compile_s(run, host, ("trace", "lower", "compile"))


def all_compile_s(run: dict[str, Any], host: int) -> float:
    return sum(run["compiles"].get(host, {}).get("compile", {}).values())


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Aligned text: ``columns`` are (key, title, format)."""
    header = [title for _, title, _ in columns]
    body = [[fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns] for row in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path | str, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {path}")


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cores": os.cpu_count(),
        "usable_cores": cores(),
        "loadavg_at_start": load,
        "python": sys.version.split()[0],
    }


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

    The ratio (sum of the concurrent rates / the lone rate) is what this machine gives two independent
    processes right now (other users' load included): the ceiling for the 2-host speedup measured here.
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
