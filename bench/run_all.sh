#!/usr/bin/env bash
# Every benchmark in docs/benchmarks.md, one after the other (they must not overlap: they measure CPU time).
# ~35 min on the 2-core machine; results as JSON under bench/results/, logs under $BENCH_SCRATCH
# (default /tmp/levanter_multihost_bench). torch (the `bench` extra) is needed by engine_vs_hf.py only;
# TORCH_PATH=/dir puts a torch installed elsewhere (pip install --target) on that script's path.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "== $*"; uv run python "$@"; }
run bench/roofline.py
run bench/phases.py
run bench/phases.py --cache --out bench/results/phases_warm.json
run bench/gather_cost.py
run bench/compile_cache.py --multihost
run bench/engine_vs_hf.py ${TORCH_PATH:+--torch_path "$TORCH_PATH"}
run bench/sharding.py
run bench/scaling.py
