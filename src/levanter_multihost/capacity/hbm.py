"""HBM per chip: what the weights and the KV cache take, whether they fit, and the decode roofline.

Pure Python over per-chip byte counts. Where the counts come from (the model's partition specs on a host's mesh,
or an estimate from ``config.json``) is the adapter's business (:mod:`levanter_multihost.capacity_inputs`).
"""

from dataclasses import dataclass

from levanter_multihost.capacity.engine import EngineLimits, Problem
from levanter_multihost.capacity.tpu import GIB, Topology


@dataclass(frozen=True)
class ModelShape:
    """The model's bytes in HBM, whole and on the busiest chip of a host."""

    weight_bytes: int
    """All weights, in the compute dtype."""
    weight_bytes_per_chip: int
    """Weights on the chip that holds the most of them."""
    kv_bytes_per_token: int
    """KV cache of one token over all layers (K and V), whole."""
    kv_bytes_per_token_per_chip: int
    """KV cache of one token on the chip that holds the most of it."""
    source: str = ""
    """Where the numbers come from, for the report."""


def page_bytes_per_chip(engine: EngineLimits, model: ModelShape) -> int:
    return model.kv_bytes_per_token_per_chip * engine.page_size


def effective_max_pages(
    engine: EngineLimits, topology: Topology, model: ModelShape | None
) -> tuple[int | None, list[Problem], list[str]]:
    """``max_pages`` as the engine will have it (its own HBM sizing estimated when unset), HBM problems, notes."""
    gen = topology.generation
    if model is None or gen is None:
        why = "the model shape is unknown" if model is None else "the TPU generation is unknown (set tpu_type)"
        if engine.max_pages is None:
            return None, [], [f"max_pages is unset (sized from free HBM at start) and {why}: page checks skipped."]
        return engine.max_pages, [], [f"HBM check skipped: {why}."]
    per_page = page_bytes_per_chip(engine, model)
    hbm = gen.hbm_bytes_per_chip
    free = hbm - model.weight_bytes_per_chip
    if free <= 0:
        problem = Problem(
            "trainer.model_axis_size",
            f"The weights need {gib(model.weight_bytes_per_chip)} on a chip, above the {gib(hbm)} of a {gen.name} "
            f"chip. Shard them over the {topology.unit}'s {topology.chips_per_replica} chips: set "
            f"trainer.model_axis_size to {topology.chips_per_replica} and trainer.tensor_parallel_axes to "
            "[heads, mlp, kv_head, vocab] (or put more hosts in a replica: hosts_per_replica).",
            topology.chips_per_replica,
        )
        return engine.max_pages, [problem], []
    fits = int(free // per_page)
    if engine.max_pages is None:
        estimate = int(free * engine.hbm_utilization // per_page)
        note = (
            f"max_pages is unset: the engine sizes it from free HBM at start; planned with an estimate of {estimate} "
            f"pages ({engine.hbm_utilization:g} x ({gib(hbm)} - {gib(model.weight_bytes_per_chip)} of weights) / "
            f"{gib(per_page)} per page per chip)."
        )
        return estimate, [], [note]
    if engine.max_pages <= fits:
        return engine.max_pages, [], []
    need = model.weight_bytes_per_chip + engine.max_pages * per_page
    problem = Problem(
        "engine.max_pages",
        f"max_pages ({engine.max_pages}) needs {gib(need)} of HBM per chip ({gib(model.weight_bytes_per_chip)} of "
        f"weights + {engine.max_pages} pages x {gib(per_page)}), above the {gib(hbm)} of a {gen.name} chip. Lower "
        f"max_pages to {fits} (or shard the KV cache: add kv_head to trainer.tensor_parallel_axes).",
        fits,
    )
    return engine.max_pages, [problem], []


def hbm_bytes_per_chip(engine: EngineLimits, model: ModelShape, max_pages: int) -> int:
    """Weights plus the whole KV cache, on the busiest chip."""
    return model.weight_bytes_per_chip + max_pages * page_bytes_per_chip(engine, model)


def decode_seconds_bound(model: ModelShape, topology: Topology, iterations: int, kv_tokens_read: int) -> float | None:
    """HBM-bound decode time: every iteration reads the chip's weights, plus the KV of every context token read.

    (iterations x weights per chip + context tokens read x KV per token per chip) / chip bandwidth. Prefill and
    compilation are left out, so compare it with decode time only.
    """
    gen = topology.generation
    if gen is None:
        return None
    moved = iterations * model.weight_bytes_per_chip + kv_tokens_read * model.kv_bytes_per_token_per_chip
    return moved / gen.hbm_bandwidth_per_chip


def step_seconds_bound(model: ModelShape, topology: Topology, sequences: int, context_tokens: int) -> float | None:
    """HBM-bound time of one decode iteration of ``sequences`` sequences of ``context_tokens`` each."""
    return decode_seconds_bound(model, topology, 1, sequences * context_tokens)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
