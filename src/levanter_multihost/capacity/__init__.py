"""Capacity planning for host-data-parallel sampling with Levanter's paged-attention ``InferenceEngine``.

Pure Python, no JAX and no Levanter: :mod:`.engine` mirrors the engine's limits and construction rules,
:mod:`.batch` sizes a batch in closed form and packs prompts into batches, :mod:`.hbm` checks HBM per chip and
bounds decode time by HBM bandwidth, :mod:`.tpu` knows the slices, :mod:`.planner` puts a run together per
host and :mod:`.report` prints it. ``docs/capacity.md`` works the math through on the seed's run.
"""

from levanter_multihost.capacity.batch import BatchLimit, BatchPacker, PromptDemand, batch_limit, forecast
from levanter_multihost.capacity.engine import EngineLimits, Problem
from levanter_multihost.capacity.hbm import ModelShape
from levanter_multihost.capacity.planner import CapacityPlan, HostPlan, RunSpec, plan_capacity
from levanter_multihost.capacity.tpu import Topology, TpuGeneration, parse_tpu_type

__all__ = [
    "BatchLimit",
    "BatchPacker",
    "CapacityPlan",
    "EngineLimits",
    "HostPlan",
    "ModelShape",
    "Problem",
    "PromptDemand",
    "RunSpec",
    "Topology",
    "TpuGeneration",
    "batch_limit",
    "forecast",
    "parse_tpu_type",
    "plan_capacity",
]
