"""Names of the environment variables through which the local launcher (``infra/launch.py --local_hosts N``)
tells each emulated host where the JAX distributed job's coordinator is, how many hosts there are and which one
it is. The launcher sets them and ``runtime`` reads them, after checking that the launcher that set them runs
this process (variables left in a shell would otherwise make a plain process wait for a job that is gone).

Imports nothing, so that the launcher can read these names without loading JAX or Levanter.
"""

ENV_COORDINATOR = "LEVANTER_MULTIHOST_COORDINATOR"
"""``host:port`` of the coordinator (host 0's JAX distributed service), e.g. ``127.0.0.1:43121``."""
ENV_NUM_PROCESSES = "LEVANTER_MULTIHOST_NUM_PROCESSES"
"""How many hosts form the job, as a decimal string."""
ENV_PROCESS_ID = "LEVANTER_MULTIHOST_PROCESS_ID"
"""This host's index in the job, ``0`` to ``NUM_PROCESSES - 1``; host 0 is the leader."""
ENV_LAUNCHER = "LEVANTER_MULTIHOST_LAUNCHER"
"""``pid:start`` of the launcher that set these variables (its start in clock ticks since boot)."""
