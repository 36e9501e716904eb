"""Cloud TPU slices: chips per host, HBM capacity and bandwidth per chip, parsed from names like ``v5p-32``.

Pure Python. Used by the planner for the HBM check and the roofline; the sampler itself never needs it.
"""

import re
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation's per-chip memory and how its slice names count devices."""

    name: str
    """Generation name as in slice names: v4, v5e, v5p, v6e."""
    hbm_bytes_per_chip: int
    """HBM capacity of one chip, in bytes."""
    hbm_bandwidth_per_chip: float
    """HBM bandwidth of one chip, in bytes per second."""
    cores_per_chip_in_name: int
    """What the number in a slice name counts per chip: 2 for v4/v5p (TensorCores), 1 for v5e/v6e (chips)."""


TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration("v4", 32 * GIB, 1200e9, 2),
    "v5e": TpuGeneration("v5e", 16 * GIB, 819e9, 1),
    "v5p": TpuGeneration("v5p", 95 * GIB, 2765e9, 2),
    "v6e": TpuGeneration("v6e", 32 * GIB, 1638e9, 1),
}
"""Cloud TPU chip specs (HBM capacity, HBM bandwidth) by generation; ``v5litepod`` names are v5e."""

HOST_CHIPS = 4
"""Chips per host of a multi-host slice, every generation here (v5e/v6e single-host slices go up to 8 chips)."""


@dataclass(frozen=True)
class Topology:
    """The slice: how many hosts, how many chips each, and which TPU generation (None when unknown)."""

    num_hosts: int = 1
    """Hosts (JAX processes); each replica of ``hosts_per_replica`` of them runs one engine on their chips."""
    chips_per_host: int = 1
    """Accelerator chips (or emulated CPU devices) on each host."""
    generation: TpuGeneration | None = None
    """TPU generation, for HBM capacity and bandwidth; None skips the HBM check and the roofline."""
    name: str | None = None
    """Slice name this topology was parsed from (e.g. v5p-32), for reports."""
    hosts_per_replica: int = 1
    """Hosts whose chips hold one copy of the model and run one engine together (a divisor of ``num_hosts``)."""

    @property
    def replicas(self) -> int:
        """Copies of the model, each one engine: the planner's unit of work."""
        return self.num_hosts // self.hosts_per_replica

    @property
    def chips_per_replica(self) -> int:
        return self.hosts_per_replica * self.chips_per_host

    @property
    def unit(self) -> str:
        """What one engine runs on, as reports name it: a host, or a replica of several."""
        return "host" if self.hosts_per_replica == 1 else "replica"

    def describe(self) -> str:
        where = f"{self.name}: " if self.name else ""
        if self.hosts_per_replica == 1:
            return f"{where}{self.num_hosts} host(s) x {self.chips_per_host} chip(s)"
        return (
            f"{where}{self.replicas} replica(s) x {self.hosts_per_replica} hosts x {self.chips_per_host} chip(s) "
            f"({self.chips_per_replica} chips per replica)"
        )


def parse_tpu_type(tpu_type: str) -> Topology:
    """Hosts, chips per host and generation of a slice name such as ``v5p-32``, ``v4-8``, ``v5litepod-16``.

    v4 and v5p names count TensorCores, two per chip: v5p-32 is 16 chips, 4 hosts of 4. v5e (``v5e-N`` or
    ``v5litepod-N``) and v6e names count chips: up to 8 chips are one host (v5e-8: 1 host of 8), larger slices
    have 4 chips per host (v5e-16: 4 hosts of 4).
    """
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", tpu_type.strip().lower())
    if match is None:
        raise ValueError(
            f"tpu_type {tpu_type!r} is not a slice name like v5p-32, v4-8, v5e-16, v5litepod-16 or v6e-8."
        )
    gen = TPU_GENERATIONS["v5e" if match.group(1) == "v5litepod" else match.group(1)]
    count = int(match.group(2))
    if count == 0 or count % gen.cores_per_chip_in_name != 0:
        raise ValueError(
            f"tpu_type {tpu_type!r}: {gen.name} names count TensorCores ({gen.cores_per_chip_in_name} per chip), "
            f"so the number must be a positive multiple of {gen.cores_per_chip_in_name}."
        )
    chips = count // gen.cores_per_chip_in_name
    single_host_max = HOST_CHIPS if gen.cores_per_chip_in_name == 2 else 2 * HOST_CHIPS
    if chips <= single_host_max:
        return Topology(1, chips, gen, tpu_type)
    if chips % HOST_CHIPS != 0:
        raise ValueError(f"tpu_type {tpu_type!r}: {chips} chips do not split into hosts of {HOST_CHIPS}.")
    return Topology(chips // HOST_CHIPS, HOST_CHIPS, gen, tpu_type)
