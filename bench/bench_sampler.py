"""The sampler as the benchmarks run it: unchanged, plus a CPU-time log line and, optionally, one cache change.

    python infra/launch.py --local_hosts 2 --devices_per_host 1 -- \
        python bench/bench_sampler.py --config_path ... [sampler flags]

* Always: logs ``BENCH host=<i> generate_cpu_s=<s> generate_wall_s=<s>`` after sampling: the process CPU time
  (all threads) and the wall time of this host's ``InferenceEngine.generate`` call, i.e. of its round (prefill +
  decode in summary.json). CPU time hardly depends on what else runs on the machine, so it shows each host's work
  even when other users' load slows the wall clock.
* ``BENCH_EVERY_HOST_WRITES=1``: every host writes its own persistent compilation-cache entries. JAX 0.10.2 writes
  them from process 0 only (``jax._src.compiler._cache_write``), which suits SPMD programs that every process
  compiles alike; in host-data-parallel sampling every program is host-local and its cache key holds the host's
  device ids, so the other hosts never find an entry and compile every run. The keys differ per host, so no two
  hosts write the same file. This is the change proposed for ``runtime.start`` in docs/benchmarks.md.
"""

import logging
import os
import time

from jax._src import compiler, distributed
from levanter.inference.engine import InferenceEngine

from levanter_multihost import sample_lm_multihost

logger = logging.getLogger("bench")


def _every_host_writes(write):
    def cache_write(*args, **kwargs):
        saved = distributed.global_state.process_id
        distributed.global_state.process_id = 0  # the only check on the writer's identity in _cache_write
        try:
            return write(*args, **kwargs)
        finally:
            distributed.global_state.process_id = saved

    return cache_write


def _cpu_timed(generate):
    def timed(*args, **kwargs):
        cpu, wall = time.process_time(), time.perf_counter()
        result = generate(*args, **kwargs)
        logger.warning(
            "BENCH host=%d generate_cpu_s=%.3f generate_wall_s=%.3f",
            distributed.global_state.process_id,
            time.process_time() - cpu,
            time.perf_counter() - wall,
        )
        return result

    return timed


if os.environ.get("BENCH_EVERY_HOST_WRITES") == "1":
    compiler._cache_write = _every_host_writes(compiler._cache_write)
InferenceEngine.generate = _cpu_timed(InferenceEngine.generate)

if __name__ == "__main__":
    sample_lm_multihost.cli()
