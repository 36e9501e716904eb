"""Compilation cache: engine build + first prefill/decode compile of a warm rerun against a cold one.

    uv run python bench/compile_cache.py                 # ~3 min on 2 cores; JSON to bench/results/compile_cache.json
    uv run python bench/compile_cache.py --multihost     # + 2 hosts cold and warm, ~5 min

Workload: ``config/sampler/tiny_local.yaml`` (256 prompts x 6 new tokens) on 1 host (1 CPU device, pinned to one
core), with ``--trainer.jax_compilation_cache_dir`` pointing at a fresh directory: a cold run fills it, a warm run
reuses it. Done twice:

* as the sampler runs by default (``EQX_ON_ERROR=nan``, set by ``sample_lm_multihost``): Equinox's runtime checks
  (``eqx.error_if`` in Levanter's engine) are NaN poisoning, so the engine's two big programs (``_run_prefill``,
  ``_run_generation_loop``) can be cached;
* with ``EQX_ON_ERROR=raise`` in the environment (Equinox's own default): the checks compile to host callbacks, and
  JAX never writes a program with host callbacks to the persistent cache, so those two compile on every run.

With ``--multihost``, 2 runs of 2 hosts on one fresh cache, cold then warm. JAX 0.10.2 writes cache entries from
process 0 only, and the cache key holds the device assignment, so host 1 would never find an entry;
``runtime.start`` lets every host write its own (``let_every_host_write_compilation_cache``), and the warm run shows
both hosts loading their programs from the cache.

"compile" = XLA compilation, or loading the executable on a cache hit ("Finished XLA compilation" lines of
``JAX_LOG_COMPILES``); "trace+lower" is paid on every run, cache or not. "engine build + first compile" =
the ``engine_build`` phase + trace, lower and compile of the two programs. The ``engine_build + prefill +
decode`` phase sum (which also includes running them) is shown too.
"""

import argparse
import shutil
import time
from pathlib import Path

from _common import (
    ENGINE_PROGRAMS,
    RESULTS,
    SCRATCH,
    TINY_CONFIG,
    cache_flag,
    cores,
    default_checkpoint,
    engine_compile_s,
    format_table,
    launch,
    machine,
    write_config,
    write_json,
)


def cache_contents(path: Path) -> tuple[int, int, list[str]]:
    files = [p for p in path.glob("*") if p.is_file()] if path.exists() else []
    programs = sorted({p.name.split("-")[0] for p in files})
    return len(files), sum(p.stat().st_size for p in files), programs


def host_rows(run: dict, label: str, attempt: str, cache: Path) -> list[dict]:
    files, size, programs = cache_contents(cache)
    rows = []
    for m in sorted(run["host_metrics"], key=lambda m: m["host"]):
        h = m["host"]
        info = run["compiles"].get(h, {})
        build = m["engine_build_s"]
        rows.append(
            {
                "variant": label,
                "run": attempt,
                "host": h,
                "engine_build_s": build,
                "prefill_compile_s": info.get("compile", {}).get("_run_prefill", 0.0),
                "decode_compile_s": info.get("compile", {}).get("_run_generation_loop", 0.0),
                "trace_lower_s": engine_compile_s(run, h, ("trace", "lower")),
                "build_plus_compile_s": build + engine_compile_s(run, h, ("trace", "lower", "compile")),
                "build_prefill_decode_s": build + m["prefill_s"] + m["decode_s"],
                "engine_hits": ",".join(p for p in ENGINE_PROGRAMS if p in info.get("hits", [])) or "none",
                "cache_files": files,
                "cache_MB": size / 1e6,
                "cache_has_engine": all(f"jit_{p}" in programs for p in ENGINE_PROGRAMS),
                "wall_s": run["wall_outside_s"],
            }
        )
    print(format_table(rows, COLUMNS), flush=True)
    return rows


def speedups(rows: list[dict], cold_run: str, warm_run: str) -> None:
    for h in {r["host"] for r in rows}:
        cold = next(r for r in rows if r["run"] == cold_run and r["host"] == h)
        warm = next(r for r in rows if r["run"] == warm_run and r["host"] == h)
        warm["speedup_compile"] = cold["build_plus_compile_s"] / warm["build_plus_compile_s"]
        warm["speedup_phases"] = cold["build_prefill_decode_s"] / warm["build_prefill_decode_s"]


def measure(config, work: Path, label: str, env: dict[str, str], core_list) -> list[dict]:
    """1 host: a cold run fills a fresh cache, a warm run reuses it."""
    cache = work / "jax_cache"
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for attempt in ("cold", "warm"):
        run = launch(config, work / attempt, 1, cache_flag(cache), env_extra=env, core_list=core_list)
        rows += host_rows(run, label, attempt, cache)
    speedups(rows, "cold", "warm")
    return rows


def measure_multihost(config, work: Path, core_list) -> list[dict]:
    """2 hosts, one fresh cache: cold, then warm."""
    cache = work / "jax_cache"
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for attempt in ("cold", "warm"):
        run = launch(config, work / attempt, 2, cache_flag(cache), core_list=core_list)
        rows += host_rows(run, "2 hosts", attempt, cache)
    speedups(rows, "cold", "warm")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multihost", action="store_true", help="Also 2 hosts, cold then warm (+2 runs, ~2 min).")
    parser.add_argument("--hf_checkpoint", default=default_checkpoint())
    parser.add_argument("--out", default=str(RESULTS / "compile_cache.json"))
    args = parser.parse_args()
    core_list = cores()
    work = SCRATCH / "compile_cache"
    config = write_config(work / "config.yaml", TINY_CONFIG, hf_checkpoint=args.hf_checkpoint)
    rows = []
    rows += measure(config, work / "nan", "1 host (EQX_ON_ERROR=nan, the default)", {}, core_list)
    rows += measure(config, work / "raise", "1 host, EQX_ON_ERROR=raise", {"EQX_ON_ERROR": "raise"}, core_list)
    if args.multihost:
        rows += measure_multihost(config, work / "two_hosts", core_list)
    print()
    print(format_table(rows, COLUMNS + [("speedup_compile", "cold/warm compile", "{:.1f}x"),
                                        ("speedup_phases", "cold/warm phases", "{:.1f}x")]))  # fmt: skip
    write_json(
        args.out,
        {
            "bench": "compile_cache",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(),
            "args": vars(args),
            "rows": rows,
        },
    )


COLUMNS = [
    ("variant", "variant", "{}"),
    ("run", "run", "{}"),
    ("host", "host", "{:d}"),
    ("engine_build_s", "engine build s", "{:.2f}"),
    ("prefill_compile_s", "compile prefill s", "{:.2f}"),
    ("decode_compile_s", "compile decode s", "{:.2f}"),
    ("trace_lower_s", "trace+lower s", "{:.2f}"),
    ("build_plus_compile_s", "build+compile s", "{:.2f}"),
    ("build_prefill_decode_s", "build+prefill+decode s", "{:.2f}"),
    ("engine_hits", "cache hits", "{}"),
    ("cache_files", "cache files", "{:d}"),
    ("wall_s", "wall s", "{:.1f}"),
]

if __name__ == "__main__":
    main()
