"""Replica groups: which hosts run one copy of the model together (``hosts_per_replica``).

Covers the arithmetic only: the job's hosts form groups of ``k`` consecutive hosts; host ``h`` is in replica
``h // k``, and the replica's first host leads it (it writes the replica's parts and hands them to the job's
leader). Each replica builds one mesh over its hosts' chips and runs one engine (``model_loading``); prompts are
shared out per replica (``host_work``). ``k = 1`` is host-data-parallel, one replica of every host the global mesh.
No JAX import.
"""

from dataclasses import dataclass

from levanter_multihost.errors import ConfigError

ALL_HOSTS = 0
"""``hosts_per_replica: 0``: one replica of every host of the job (a global mesh)."""


@dataclass(frozen=True)
class Replicas:
    """The job's hosts in groups of ``hosts_per_replica``; :meth:`of` checks the numbers."""

    hosts_per_replica: int
    num_hosts: int

    @classmethod
    def of(cls, hosts_per_replica: int, num_hosts: int) -> "Replicas":
        """The groups for a config's ``hosts_per_replica`` (0: all hosts) on ``num_hosts`` hosts; a value that
        does not split the hosts into whole groups is a :class:`ConfigError` of one line."""
        k = num_hosts if hosts_per_replica == ALL_HOSTS else hosts_per_replica
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or num_hosts % k != 0:
            divisors = [d for d in range(1, num_hosts + 1) if num_hosts % d == 0]
            raise ConfigError(
                f"hosts_per_replica ({hosts_per_replica}) does not split the job's {num_hosts} host(s) into whole "
                f"groups. Set it to a divisor of {num_hosts} ({', '.join(map(str, divisors))}), or 0 for one "
                "replica over every host."
            )
        return cls(k, num_hosts)

    @property
    def num_replicas(self) -> int:
        return self.num_hosts // self.hosts_per_replica

    def replica_of(self, host: int) -> int:
        return host // self.hosts_per_replica

    def hosts_of(self, replica: int) -> range:
        """The hosts of ``replica``, its leader first."""
        return range(replica * self.hosts_per_replica, (replica + 1) * self.hosts_per_replica)

    def leads_replica(self, host: int) -> bool:
        """Whether ``host`` writes its replica's parts (the replica's other hosts sample the same batches with it,
        their share of the collectives, and write nothing)."""
        return host % self.hosts_per_replica == 0

    @property
    def mode(self) -> str:
        """How the job runs, as the summary names it."""
        if self.hosts_per_replica == 1:
            return "host_data_parallel"
        return "global_mesh" if self.num_replicas == 1 else "replica_groups"
