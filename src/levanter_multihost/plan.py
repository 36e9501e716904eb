"""Preflight capacity check of a sampler config: the adapter to :mod:`levanter_multihost.capacity` and its CLI.

Covers turning a :class:`SampleLmMultihostConfig` (its ``engine``, ``max_new_tokens``, ``n_generations``,
``shard_strategy``, ``tpu_type`` and ``trainer`` sharding), the prompts' token counts and the number of hosts into a
capacity plan; :func:`check_capacity`, which the sampler calls on every host before the model loads and which raises
:class:`CapacityError` with the planner's messages; :func:`predict_pages_peak`, what the sampler's
``GenerationStats.pages_peak`` will read on each host; and the ``levanter-multihost-plan`` CLI.

Model shape (for the HBM check and the roofline): the ``config.json`` of ``hf_checkpoint`` when it is a local
directory or already in the Hugging Face cache, else a table of known Llama names, else the HBM check is skipped
with a note. Token counts (CLI only; the sampler passes its own): the tokenizer when it loads offline, counting
as the sampler does (no special tokens added, :func:`levanter_multihost.preflight.tokenize_prompts`); else a
conservative estimate of UTF-8 bytes + 1 per prompt (byte-level BPE and byte-fallback SentencePiece tokens cover at
least one byte each; SentencePiece may add a prefix-space token); or ``--prompt_tokens N`` for every prompt.

Leaves out the math (:mod:`levanter_multihost.capacity`) and everything that needs an accelerator or the network.
"""

import argparse
import json
import logging
import os
import re
from dataclasses import fields, replace

import draccus
import numpy as np
import yaml
from levanter.inference.engine import InferenceEngineConfig

from levanter_multihost.capacity import (
    CapacityPlan,
    EngineLimits,
    ModelShape,
    RunSpec,
    Topology,
    parse_tpu_type,
    plan_capacity,
)
from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.prompts import load_prompts

logger = logging.getLogger(__name__)

_KNOWN_MODELS: list[tuple[str, dict]] = [
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


class CapacityError(ValueError):
    """The config cannot sample these prompts on this slice; the message lists every problem and its fix."""

    def __init__(self, plan: CapacityPlan):
        self.plan = plan
        lines = [f"- {p.message}" for p in plan.problems]
        super().__init__(
            "The config does not fit the run (levanter-multihost-plan shows the full table):\n" + "\n".join(lines)
        )


def check_capacity(
    config: SampleLmMultihostConfig, prompt_token_counts: list[int], num_hosts: int, stop_token_count: int
) -> CapacityPlan:
    """Plan the run on ``num_hosts`` hosts and raise :class:`CapacityError` if it cannot fit or would truncate.

    ``prompt_token_counts`` are the token counts the engine will be given, one per prompt in global order;
    ``stop_token_count`` is the stop sequence's length in tokens (0 for none). Pure host-side work: call it on
    every host before the model loads, so that a config that cannot fit fails in seconds everywhere.
    """
    plan = plan_config(config, prompt_token_counts, num_hosts=num_hosts, stop_token_count=stop_token_count)
    for note in plan.notes:
        logger.info("capacity: %s", note)
    if not plan.ok:
        raise CapacityError(plan)
    logger.info(
        "capacity: ok; %s prompts per host, up to %d of %s pages, %d new tokens for every prompt",
        plan.prompts_per_host,
        plan.pages_required,
        plan.max_pages,
        plan.run.max_new_tokens,
    )
    return plan


def plan_config(
    config: SampleLmMultihostConfig,
    prompt_token_counts: list[int],
    *,
    num_hosts: int | None = None,
    tpu_type: str | None = None,
    stop_token_count: int = 0,
) -> CapacityPlan:
    """The capacity plan of ``config`` for these prompts.

    The topology is ``tpu_type`` (default: ``config.tpu_type``) with ``num_hosts`` hosts when given (a note says
    so when they disagree); without a TPU type it is ``num_hosts`` hosts (default 1) of unknown chips.
    """
    topology, notes = _topology(tpu_type if tpu_type is not None else config.tpu_type, num_hosts)
    model, model_note = _model_shape(config)
    run = RunSpec(
        prompt_tokens=tuple(prompt_token_counts),
        max_new_tokens=config.max_new_tokens,
        n_generations=config.n_generations,
        stop_tokens=stop_token_count,
        shard_strategy=config.shard_strategy,
    )
    plan = plan_capacity(_engine_limits(config.engine), run, topology, model)
    return replace(plan, notes=(*notes, *([model_note] if model_note else []), *plan.notes))


def predict_pages_peak(config: SampleLmMultihostConfig, prompt_token_counts: list[int], num_hosts: int) -> list[int]:
    """Per host, what ``GenerationStats.pages_peak`` will read after sampling this config.

    The sampler's progress callback counts pages in use at the start of every outer decode round and once after
    ``generate`` returns (0 unless the decode budget cut sequences off: the engine frees a sequence's pages when it
    finishes). Exact for ``n_generations == 1``.
    """
    plan = plan_config(config, prompt_token_counts, num_hosts=num_hosts)
    return [h.observed_pages_peak for h in plan.hosts]


def main(argv: list[str] | None = None) -> int:
    """``levanter-multihost-plan``: print the plan of a config; exit 0 when it fits, 1 when not, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="levanter-multihost-plan",
        description="Check a sampler config's engine capacity against its prompts and slice, before launch.",
    )
    parser.add_argument("--config_path", required=True, help="Sampler YAML config.")
    parser.add_argument("--num_hosts", type=int, help="Hosts to plan for (default: from tpu_type, else 1).")
    parser.add_argument("--tpu_type", help="Slice to plan for, e.g. v5p-32 (default: the config's tpu_type).")
    parser.add_argument("--prompt_tokens", type=int, help="Count every prompt as this many tokens.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    args = parser.parse_args(argv)
    try:
        config = draccus.parse(SampleLmMultihostConfig, config_path=args.config_path, args=[])
    except draccus.utils.ParsingError as e:
        return _report_unparsable(args.config_path, e, args.json)
    except OSError as e:
        print(f"levanter-multihost-plan: cannot read {args.config_path}: {e}")
        return 2
    try:
        prompts = load_prompts(config.prompts, config.prompts_file)
        counts, stop_count, notes = _count_tokens(config, prompts, args.prompt_tokens)
        plan = plan_config(
            config, counts, num_hosts=args.num_hosts, tpu_type=args.tpu_type, stop_token_count=stop_count
        )
    except ValueError as e:
        print(f"levanter-multihost-plan: {e}")
        return 2
    plan = replace(plan, notes=(*notes, *plan.notes))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.report())
    return 0 if plan.ok else 1


def cli() -> None:
    raise SystemExit(main())


# ----------------------------------------------------------------------------------------------------------------


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


def _topology(tpu_type: str | None, num_hosts: int | None) -> tuple[Topology, list[str]]:
    if tpu_type is None:
        return Topology(num_hosts=num_hosts or 1), []
    topology = parse_tpu_type(tpu_type)
    if num_hosts is None or num_hosts == topology.num_hosts:
        return topology, []
    note = f"tpu_type {tpu_type} has {topology.num_hosts} host(s); planned for the {num_hosts} given."
    logger.warning("capacity: %s", note)
    return replace(topology, num_hosts=num_hosts), [note]


def _model_shape(config: SampleLmMultihostConfig) -> tuple[ModelShape | None, str | None]:
    """The model's shape and how the trainer spreads it over a host's chips, or None and why not."""
    trainer = config.trainer
    model_axes = {
        axis
        for axis, resource in trainer.compute_axis_mapping.items()
        if "model" in ((resource,) if isinstance(resource, str) else tuple(resource))
    }
    weight_shards = trainer.model_axis_size if model_axes else 1
    kv_shards = trainer.model_axis_size if "kv_head" in model_axes else 1
    dtype_bytes = np.dtype(trainer.mp.compute_dtype).itemsize
    if config.hf_checkpoint is None:
        return None, "Model shape unknown: the shape of a Levanter checkpoint (checkpoint_path) is not read."
    name = config.hf_checkpoint.model_name_or_path
    hf_config, source = _read_hf_config(name, config.hf_checkpoint.revision), f"config.json of {name}"
    if hf_config is None:
        match = next((shape for pattern, shape in _KNOWN_MODELS if re.search(pattern, name.lower())), None)
        if match is None:
            return None, f"Model shape unknown: no config.json of {name} offline, and not a known Llama name."
        hf_config, source = match, f"known shape for {name}"
    try:
        layers = hf_config["num_hidden_layers"]
        heads = hf_config["num_attention_heads"]
        kv_heads = hf_config.get("num_key_value_heads") or heads
        hidden = hf_config["hidden_size"]
        head_dim = hf_config.get("head_dim") or hidden // heads
        inter = hf_config["intermediate_size"]
        vocab = hf_config["vocab_size"]
    except KeyError as e:
        return None, f"Model shape unknown: the {source} has no {e.args[0]}."
    embeddings = vocab * hidden * (1 if hf_config.get("tie_word_embeddings", False) else 2)
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden
    params = embeddings + layers * per_layer + hidden
    shape = ModelShape(layers, kv_heads, head_dim, params * dtype_bytes, weight_shards, kv_shards)
    return shape, f"Model shape from the {source}: {params / 1e9:.2f}B parameters x {dtype_bytes} bytes."


def _read_hf_config(name: str, revision: str | None) -> dict | None:
    """config.json of a local checkpoint directory or of a hub id already in the Hugging Face cache; no network."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        path = path if os.path.isfile(path) else None
    elif "://" in name:
        path = None
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # not a valid repo id
            cached = None
        path = cached if isinstance(cached, str) else None
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def _count_tokens(
    config: SampleLmMultihostConfig, prompts: list[str], prompt_tokens: int | None
) -> tuple[list[int], int, list[str]]:
    """Token counts of the prompts and of the stop sequence, and a note on how they were counted."""
    stop = config.stop_sequence or ""
    tokenizer = None if prompt_tokens is not None and not stop else _offline_tokenizer(config)
    if prompt_tokens is not None:
        counts, how = (
            [prompt_tokens] * len(prompts),
            f"--prompt_tokens: every prompt counted as {prompt_tokens} tokens.",
        )
    elif tokenizer is not None:
        counts = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        how = "Prompt token counts from the tokenizer, as the sampler counts them (no special tokens)."
    else:
        counts = [len(p.encode("utf-8")) + 1 for p in prompts]
        how = (
            "The tokenizer does not load offline: each prompt counted as its UTF-8 bytes + 1, an upper bound. "
            "Pass --prompt_tokens N for a closer count."
        )
    if not stop:
        stop_count = 0
    elif tokenizer is not None:
        stop_count = len(tokenizer.encode(stop, add_special_tokens=False))
    else:
        stop_count = len(stop.encode("utf-8"))
    return counts, stop_count, [how]


def _offline_tokenizer(config: SampleLmMultihostConfig):
    """The config's tokenizer from a local directory or the Hugging Face cache, or None; never the network."""
    if config.tokenizer is not None:
        name, revision = config.tokenizer, None
    elif config.hf_checkpoint is not None:
        name, revision = config.hf_checkpoint.model_name_or_path, config.hf_checkpoint.revision
    else:
        return None
    if "://" in name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True)
    except (OSError, ValueError) as e:
        logger.info("tokenizer %s does not load offline: %s", name, e)
        return None


def _report_unparsable(config_path: str, error: Exception, as_json: bool) -> int:
    """A config the engine refuses to construct: the planner's engine rules on the raw YAML, if they explain it."""
    with open(config_path) as f:
        raw = (yaml.safe_load(f) or {}).get("engine") or {}
    known = {f.name for f in fields(EngineLimits)} & set(raw)
    problems = []
    if "max_seq_len" in raw:
        engine = EngineLimits(**{k: raw[k] for k in known})
        problems = list(plan_capacity(engine, RunSpec((), 1), Topology()).problems)
    cause = f"{error}: {error.__cause__}" if error.__cause__ else str(error)
    if as_json:
        print(json.dumps({"ok": False, "error": cause, "problems": [vars(p) for p in problems]}, indent=2))
    else:
        print(f"levanter-multihost-plan: {config_path} cannot be parsed: {cause}")
        for p in problems:
            print(f"- {p.field}: {p.suggested}\n  {p.message}")
    return 1 if problems else 2


if __name__ == "__main__":
    cli()
