"""The sampler as the benchmarks run it: unchanged, plus log lines of each host's CPU seconds and the engine's rounds.

    uv run python infra/launch.py --local_hosts 2 --devices_per_host 1 -- \
        uv run python bench/bench_sampler.py --config_path config/sampler/tiny_local.yaml --trainer.model_axis_size=1

Adds, after every ``InferenceEngine.generate`` call (one per batch),
``BENCH host=<i> generate_cpu_s=<s> generate_wall_s=<s>``: the process CPU time (all threads) and the wall time of
the call. CPU time hardly depends on what else runs on the machine, so it shows each host's work even when other
users' load slows the wall clock. ``bench/_common.launch`` also passes ``--engine_log true``, which keeps Levanter's
per-round engine lines (``Decode iter: total Xs (device Ys, host Zs, ...) ... N new``, and ``Batch generated in
Xs, N tokens`` per call): the same lines give a TPU host's steady-state step time (docs/tpu.md, "What to read
from a TPU run").
"""

import logging
import time

from levanter_multihost import sample_lm_multihost

logger = logging.getLogger("bench")


def log_generate_cpu_seconds() -> None:
    """Wrap ``InferenceEngine.generate`` to log its CPU and wall seconds. Imports Levanter only here, after
    ``sample_lm_multihost`` has set up Equinox's checks."""
    from jax._src import distributed
    from levanter.inference.engine import InferenceEngine

    generate = InferenceEngine.generate

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

    InferenceEngine.generate = timed


if __name__ == "__main__":
    log_generate_cpu_seconds()
    sample_lm_multihost.cli()
