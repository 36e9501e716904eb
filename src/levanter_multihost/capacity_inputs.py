"""The adapter from resolved settings to the capacity planner, shared by the sampler and ``levanter-multihost-plan``.

Turns the engine config, the encoded prompts and stop condition, the slice and the model into the planner's
plain values (:mod:`levanter_multihost.capacity`), and :func:`check_capacity` raises :class:`CapacityError`
with every problem and its fix. :func:`levanter_multihost.resolution.resolve_capacity` puts them together. The
model's bytes per chip come from its real partition specs on a host's mesh (:mod:`levanter_multihost.footprint`,
abstract shapes only); its architecture from the checkpoint's
``config.json`` when it is a local directory or in the Hugging Face cache, else from a table of Llama names.
Never touches the network or an accelerator.
"""

import json
import logging
import os
import re

import numpy as np
from levanter.inference.engine import InferenceEngineConfig
from levanter.trainer import TrainerConfig

from levanter_multihost.capacity import (
    CapacityPlan,
    EngineLimits,
    ModelShape,
    PromptDemand,
    RunSpec,
    Topology,
    parse_tpu_type,
    report,
)
from levanter_multihost.capacity.planner import verified_fixes
from levanter_multihost.errors import ConfigError, UserError
from levanter_multihost.runplan import StopCondition

logger = logging.getLogger(__name__)

KNOWN_MODELS: list[tuple[str, dict]] = [
    (
        r"llama-?3(\.\d)?-8b",
        {
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "vocab_size": 128256,
        },
    ),
    (
        r"llama-?3(\.\d)?-70b",
        {
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "vocab_size": 128256,
        },
    ),
    (
        r"llama-?2-7b",
        {
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "vocab_size": 32000,
        },
    ),
]
"""HF-style shapes of Llama checkpoints matched by name (lower case), used when no config.json is at hand."""


class CapacityError(UserError):
    """The config cannot sample these prompts on this slice; the message lists every problem and its fix."""

    def __init__(self, plan: CapacityPlan):
        self.plan = plan
        lines = [f"- {p.message}" for p in plan.problems]
        super().__init__(
            "The config does not fit the run (levanter-multihost-plan shows the full table):\n"
            + "\n".join(lines)
            + "\n"
            + report.fix_line(verified_fixes(plan))
        )


def engine_limits(engine: InferenceEngineConfig) -> EngineLimits:
    """The planner's view of the engine config; a value no engine can use (e.g. ``max_seqs: 0``) is a
    :class:`ConfigError` naming the field."""
    try:
        return _engine_limits(engine)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _engine_limits(engine: InferenceEngineConfig) -> EngineLimits:
    return EngineLimits(
        max_seq_len=engine.max_seq_len,
        page_size=engine.page_size,
        max_pages=engine.max_pages,
        max_seqs=engine.max_seqs,
        max_seqs_in_prefill=engine.max_seqs_in_prefill,
        max_prefill_size=engine.max_prefill_size,
        max_queued_tokens=engine.max_queued_tokens,
        max_tokens_per_round=engine.max_tokens_per_round,
        max_rounds=engine.max_rounds,
        max_stop_tokens=engine.max_stop_tokens,
        max_stop_seqs=engine.max_stop_seqs,
        kv_dtype_bytes=np.dtype(engine.compute_dtype).itemsize,
        hbm_utilization=engine.hbm_utilization,
    )


def run_spec(
    lengths, max_new_tokens, n_generations, stop: StopCondition, shard_strategy: str, batch_size: int | None
) -> RunSpec:
    """The planner's view of the prompts: per prompt its tokens, new tokens and generations (sequences of ints)."""
    demands = tuple(PromptDemand(int(p), int(m), int(n)) for p, m, n in zip(lengths, max_new_tokens, n_generations))
    longest_stop = max((len(s) for s in stop.sequences), default=0)
    return RunSpec(demands, shard_strategy, batch_size, len(stop.sequences), longest_stop)


def topology(tpu_type: str | None, num_hosts: int, chips_per_host: int, hosts_per_replica: int = 1) -> Topology:
    """The slice: ``tpu_type``'s generation with the job's real host count, in replicas of ``hosts_per_replica``
    hosts (already checked to divide it); without a TPU type, unknown chips."""
    if tpu_type is None:
        return Topology(num_hosts, chips_per_host, hosts_per_replica=hosts_per_replica)
    try:
        parsed = parse_tpu_type(tpu_type)
    except ValueError as e:
        raise UserError(str(e)) from None
    if parsed.num_hosts != num_hosts:
        logger.warning(
            "tpu_type %s has %d host(s); planning for the %d of this job.", tpu_type, parsed.num_hosts, num_hosts
        )
    return Topology(num_hosts, parsed.chips_per_host, parsed.generation, parsed.name, hosts_per_replica)


def hf_config(checkpoint: str | None, revision: str | None = None) -> tuple[dict | None, str]:
    """The checkpoint's ``config.json`` (local directory or Hugging Face cache, never the network), else a known
    Llama shape by name; and where it came from."""
    if checkpoint is None:
        return None, "no HF checkpoint"
    path = None
    if os.path.isdir(checkpoint):
        path = os.path.join(checkpoint, "config.json")
    elif "://" not in checkpoint:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(checkpoint, "config.json", revision=revision)
        except ValueError:  # not a valid repo id
            cached = None
        path = cached if isinstance(cached, str) else None
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            return json.load(f), f"config.json of {checkpoint}"
    shape = next((s for pattern, s in KNOWN_MODELS if re.search(pattern, checkpoint.lower())), None)
    return shape, (f"known shape for {checkpoint}" if shape else f"no config.json of {checkpoint} offline")


def model_shape(checkpoint: str | None, trainer: TrainerConfig, limits: EngineLimits) -> ModelShape | None:
    """Bytes of the weights and of one token's KV cache, whole and on the busiest chip of a host, from the model's
    partition specs under the trainer's axis mapping; None when the architecture is unknown."""
    config, source = hf_config(checkpoint)
    if config is None:
        logger.info("Model shape unknown (%s): the HBM check is skipped.", source)
        return None
    from levanter_multihost.footprint import ShardingConfigError

    try:
        footprint = model_footprint(config, trainer, limits)
    except ShardingConfigError as e:  # a sharding the config asks for: the user's to fix (exit 2, one line)
        raise ConfigError(str(e)) from e
    return ModelShape(
        weight_bytes=footprint.weight_bytes,
        weight_bytes_per_chip=footprint.weight_bytes_per_chip,
        kv_bytes_per_token=footprint.kv_bytes_per_page // limits.page_size,
        kv_bytes_per_token_per_chip=footprint.kv_bytes_per_page_per_chip // limits.page_size,
        source=f"{source}, partition specs on {trainer.model_axis_size} chip(s)",
    )


def model_footprint(config: dict, trainer: TrainerConfig, limits: EngineLimits):
    """The footprint of an HF config (its architecture's) under the trainer's sharding, its head tiling checked."""
    from levanter.models.llama import LlamaConfig

    from levanter_multihost import footprint
    from levanter_multihost.model_loading import architecture

    model = architecture(config, LlamaConfig(), "the checkpoint")
    kv_bytes = limits.kv_dtype_bytes
    footprint.check_head_tiling(
        model.num_heads,
        model.num_kv_heads,
        trainer.model_axis_size,
        trainer.tensor_parallel_axes,
        kv_dtype_bytes=kv_bytes,
    )
    dtype = {1: np.int8, 2: "bfloat16", 4: np.float32}[kv_bytes]
    return footprint.model_footprint(
        model,
        config["vocab_size"],
        trainer.compute_axis_mapping,
        trainer.model_axis_size,
        trainer.mp.compute_dtype,
        limits.page_size,
        dtype,
    )


def check_capacity(plan: CapacityPlan, log: bool = True) -> CapacityPlan:
    """``plan`` if the run fits, else :class:`CapacityError`; the same on every host, before the model loads
    (``log``: say how it fits; one host is enough)."""
    if not plan.ok:
        raise CapacityError(plan)
    if not log:
        return plan
    for note in plan.notes:
        logger.info("capacity: %s", note)
    logger.info(
        "capacity: ok; %s sequences per batch (set by %s), batches per %s %s",
        plan.batch.sequences,
        plan.batch.limited_by,
        plan.topology.unit,
        plan.batches_per_host,
    )
    return plan
