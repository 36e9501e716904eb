#!/usr/bin/env bash
# Every benchmark in docs/benchmarks.md, one after the other (they must not overlap: they measure CPU time), each
# waiting for the machine's 1-minute load average to fall to 2.5 before every run (bench/_common.wait_for_quiet).
# ~80 min on the 2-core machine; results as JSON under bench/results/, logs under $BENCH_SCRATCH
# (default /tmp/levanter_multihost_bench). BENCH_MARKDOWN=1 also prints every table as Markdown.
# torch (the `bench` extra) is needed by engine_vs_hf.py only, which runs when it imports:
# TORCH_PATH=/dir puts a torch installed elsewhere (pip install --target) on that script's path.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "== $*"; uv run python "$@"; }
run bench/roofline.py
run bench/phases.py
run bench/phases.py --cache --out bench/results/phases_warm.json
run bench/compile_cache.py
run bench/batch_size.py
run bench/resume.py
run bench/scale.py prompts
run bench/gather_cost.py
run bench/sharding.py
run bench/scale.py hosts
run bench/host_input.py
run bench/host_input.py --format parquet
run bench/decode_program.py --shape llama8b --batch 1,64,256,1024 --seams off,on \
    --out bench/results/decode_program.json
if uv run python -c "import sys; sys.path.insert(0, '${TORCH_PATH:-}'); import torch" 2>/dev/null; then
    run bench/engine_vs_hf.py ${TORCH_PATH:+--torch_path "$TORCH_PATH"}
else
    echo "== bench/engine_vs_hf.py skipped: no torch (uv sync --extra bench, or TORCH_PATH=/dir)"
fi
