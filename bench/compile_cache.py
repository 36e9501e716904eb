"""Compilation cache, cold vs warm: each host's compile, prefill, decode and generate seconds and compile's share.

    uv run python bench/compile_cache.py                 # ~2 min on 2 cores; JSON to bench/results/compile_cache.json
    uv run python bench/compile_cache.py --eqx_raise     # + 1 host cold and warm with EQX_ON_ERROR=raise, ~1.5 min

Workload: ``config/sampler/tiny_local.yaml`` (256 prompts x 6 new tokens, one batch per host) on ``--hosts``
(default 2) emulated hosts, 1 CPU device each, each pinned to its own core, with
``--trainer.jax_compilation_cache_dir`` on a fresh directory: a cold run fills it, a warm run reuses it.

Per host, from summary.json ``hosts``: ``compile_s`` (JAX's own trace, lower and compile durations during the
host's generate calls, from ``jax.monitoring``; on a cache hit "compile" is loading the executable), ``prefill_s``
and ``decode_s`` (compile excluded), ``generate_s`` (their sum) and compile's share of it and of the launcher's
wall clock, plus ``engine_build_s``; the CPU seconds of the host's ``generate`` call (``bench/bench_sampler.py``:
unlike the wall clock, hardly moved by other users' load); which of the engine's two programs (``_run_prefill``,
``_run_generation_loop``) were cache hits (``JAX_LOG_COMPILES`` lines); the files in the cache; the launcher's wall
clock. Ratios are cold / warm.

Two things make the warm run warm on every host, both in ``levanter_multihost.seams``: JAX writes cache entries
from process 0 only, and host-data-parallel programs carry the host's device ids in their key, so
``every_host_writes_compilation_cache`` lets every host write its own; and Equinox's checks compile to host
callbacks, which JAX never caches, unless ``EQX_ON_ERROR=nan`` (``checks_as_nan``, the sampler's default; the
environment wins). ``--eqx_raise`` shows the second: with ``EQX_ON_ERROR=raise`` the engine compiles every run.
"""

import argparse
import shutil
from pathlib import Path

from _common import RESULTS, SCRATCH, TINY_CONFIG, Report, cache_flag, cores, launch, wait_for_quiet, write_config

ENGINE_PROGRAMS = ("_run_prefill", "_run_generation_loop")


def cache_files(path: Path) -> int:
    return sum(1 for p in path.glob("*") if p.is_file()) if path.exists() else 0


def host_rows(run: dict, variant: str, attempt: str, cache: Path) -> list[dict]:
    rows = []
    for m in run["host_metrics"]:
        hits = run["cache_hits"].get(m["host"], [])
        rows.append(
            {
                "variant": variant,
                "run": attempt,
                "host": m["host"],
                "engine_build_s": m["engine_build_s"],
                "compile_s": m["compile_s"],
                "prefill_s": m["prefill_s"],
                "decode_s": m["decode_s"],
                "generate_s": m["generate_s"],
                "compile_share": m["compile_s"] / m["generate_s"] if m["generate_s"] else None,
                "compile_of_wall": m["compile_s"] / run["wall_outside_s"],
                "generate_cpu_s": run["cpu"].get(m["host"], {}).get("cpu_s"),
                "engine_hits": ",".join(p for p in ENGINE_PROGRAMS if p in hits) or "none",
                "cache_files": cache_files(cache),
                "wall_s": run["wall_outside_s"],
                "load_1m": run["loadavg_1m"][0],
            }
        )
    return rows


def cold_and_warm(config: Path, work: Path, variant: str, hosts: int, env: dict[str, str], core_list) -> list[dict]:
    cache = work / "jax_cache"
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for attempt in ("cold", "warm"):
        wait_for_quiet()
        run = launch(
            config,
            work / attempt,
            hosts,
            cache_flag(cache),
            env_extra={"JAX_LOG_COMPILES": "1", **env},
            core_list=core_list,
        )
        rows += host_rows(run, variant, attempt, cache)
    for warm in (r for r in rows if r["run"] == "warm"):
        cold = next(r for r in rows if r["run"] == "cold" and r["host"] == warm["host"])
        warm["compile_ratio"] = cold["compile_s"] / warm["compile_s"]
        warm["generate_ratio"] = cold["generate_s"] / warm["generate_s"]
        warm["wall_ratio"] = cold["wall_s"] / warm["wall_s"]
        warm["cpu_ratio"] = cold["generate_cpu_s"] / warm["generate_cpu_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--eqx_raise", action="store_true", help="Also 1 host with EQX_ON_ERROR=raise.")
    parser.add_argument("--out", default=str(RESULTS / "compile_cache.json"))
    args = parser.parse_args()
    report = Report("compile_cache", args)
    core_list = cores()
    work = SCRATCH / "compile_cache"
    config = write_config(work / "config.yaml", TINY_CONFIG, samples_table_rows=0)
    rows = cold_and_warm(config, work / "default", f"{args.hosts} hosts", args.hosts, {}, core_list)
    if args.eqx_raise:
        rows += cold_and_warm(
            config, work / "raise", "1 host, EQX_ON_ERROR=raise", 1, {"EQX_ON_ERROR": "raise"}, core_list
        )
    report.table("Cold vs warm compilation cache, per host", rows, COLUMNS)
    report.write(args.out, rows=rows)


COLUMNS = [
    ("variant", "variant", "{}"),
    ("run", "run", "{}"),
    ("host", "host", "{:d}"),
    ("engine_build_s", "engine build s", "{:.2f}"),
    ("compile_s", "compile s", "{:.2f}"),
    ("prefill_s", "prefill s", "{:.2f}"),
    ("decode_s", "decode s", "{:.2f}"),
    ("generate_s", "generate s", "{:.2f}"),
    ("compile_share", "compile share", "{:.1%}"),
    ("compile_of_wall", "compile of wall", "{:.1%}"),
    ("generate_cpu_s", "generate CPU s", "{:.2f}"),
    ("engine_hits", "engine cache hits", "{}"),
    ("cache_files", "cache files", "{:d}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("compile_ratio", "cold/warm compile", "{:.1f}x"),
    ("generate_ratio", "cold/warm generate", "{:.1f}x"),
    ("cpu_ratio", "cold/warm CPU", "{:.1f}x"),
    ("wall_ratio", "cold/warm wall", "{:.2f}x"),
]

if __name__ == "__main__":
    main()
