"""The sampler as the benchmarks run it: unchanged, plus one log line of each host's CPU seconds in generation.

    python infra/launch.py --local_hosts 2 --devices_per_host 1 -- \
        python bench/bench_sampler.py --config_path ... [sampler flags]

Logs ``BENCH host=<i> generate_cpu_s=<s> generate_wall_s=<s>`` after sampling: the process CPU time (all threads)
and the wall time of this host's ``InferenceEngine.generate`` call, i.e. of its round (prefill + decode in
summary.json). CPU time hardly depends on what else runs on the machine, so it shows each host's work even when
other users' load slows the wall clock.
"""

import logging
import time

from levanter_multihost import sample_lm_multihost

logger = logging.getLogger("bench")


def log_generate_cpu_seconds() -> None:
    """Wrap ``InferenceEngine.generate`` to log its CPU and wall seconds. Imports Levanter only here, after
    ``sample_lm_multihost`` has set ``EQX_ON_ERROR`` for Equinox."""
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
