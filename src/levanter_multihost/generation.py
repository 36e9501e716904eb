"""Sampling this host's shard with Levanter's paged-attention ``InferenceEngine``.

Covers engine construction, one request per prompt (``n_generations`` as engine clones, or one request per
missing generation when resuming), per-prompt keys that depend only on ``seed`` and the global prompt index,
local progress logging, and turning engine output into rows and per-host timings. Everything here is local to
the host: no cross-host communication and no tracker call happens while generating.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
from levanter.inference.engine import InferenceEngine, InferenceEngineConfig, Request
from levanter.inference.jit_scheduler import SeqDecodingParams
from levanter.inference.utils import INVALID

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """One prompt of this host's shard and which of its generations still need sampling."""

    global_index: int
    prompt: str
    token_ids: list[int]
    generations: tuple[int, ...]


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens_generated: int = 0
    sequences: int = 0
    pages_in_use_after_decode: int = 0
    pages_free_after_decode: int = 0
    pages_peak: int = 0
    max_pages: int = 0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.tokens_generated / self.decode_s if self.decode_s > 0 else 0.0


def prompt_key(seed: int, global_index: int, generation: int = 0) -> jax.Array:
    """The sampling key of (prompt, generation): generation 0 uses the prompt's key, generation g>0 folds in g,
    exactly as the engine derives the keys of a request's clones."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), global_index)
    return key if generation == 0 else jax.random.fold_in(key, generation)


def stop_token_array(stop_ids: Sequence[int] | None):
    if not stop_ids:
        return None
    return hax.named(jnp.asarray(list(stop_ids), dtype=jnp.int32), axis="position").broadcast_axis({"stop_seq": 1})


def build_requests(
    items: Sequence[WorkItem], n_generations: int, max_new_tokens: int, temperature: float, seed: int, stop_ids
) -> tuple[list[Request], list[tuple[int, int]]]:
    """Engine requests for ``items`` and, in output order, the (global prompt, generation) of each sequence."""
    stop = stop_token_array(stop_ids)
    requests, order = [], []
    for item in items:
        full = item.generations == tuple(range(n_generations))
        groups = [(0, n_generations)] if full else [(g, 1) for g in item.generations]
        for first_gen, count in groups:
            params = SeqDecodingParams(
                max_num_tokens=jnp.array(len(item.token_ids) + max_new_tokens, dtype=jnp.int32),
                stop_tokens=stop,
                temperature=jnp.array(temperature, dtype=jnp.float32),
                key=prompt_key(seed, item.global_index, first_gen),
            )
            requests.append(
                Request(
                    prompt_tokens=list(item.token_ids),
                    request_id=len(requests),
                    decode_params=params,
                    n_generations=count,
                )
            )
            order.extend((item.global_index, first_gen + k) for k in range(count))
    return requests, order


class ProgressLogger:
    """Logs tokens done / expected, tokens/s and ETA at most every ``interval_s`` seconds. Host-local."""

    def __init__(self, engine: InferenceEngine, expected_tokens: int, interval_s: float, host: int):
        self.engine = engine
        self.expected = expected_tokens
        self.interval_s = interval_s
        self.host = host
        self.start = time.perf_counter()
        self.last = self.start
        self.first_step_at: float | None = None
        self.pages_peak = 0

    def __call__(self, iteration: int) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = now
        self.pages_peak = max(self.pages_peak, pages_in_use(self.engine))
        if self.interval_s <= 0 or (iteration > 0 and now - self.last < self.interval_s):
            return
        self.last = now
        done = sum(len(r.token_list) for kids in self.engine.results.values() for r in kids.values())
        rate = done / max(now - self.start, 1e-9)
        eta = (self.expected - done) / rate if rate > 0 else float("inf")
        logger.info(
            "host %d: %d/%d tokens (%.0f%%), %.1f tok/s, ETA %.0fs",
            self.host,
            done,
            self.expected,
            100.0 * done / max(self.expected, 1),
            rate,
            eta,
        )


def pages_in_use(engine: InferenceEngine) -> int:
    counts = jax.device_get(engine.gen_state.decode_state.page_table.page_ref_counts.array)
    return int((np.asarray(counts) > 0).sum())


def build_engine(model, tokenizer, engine_config: InferenceEngineConfig) -> InferenceEngine:
    """The host's engine, with its KV cache allocated."""
    engine = InferenceEngine.from_model_with_config(model=model, tokenizer=tokenizer, config=engine_config)
    jax.block_until_ready(engine.gen_state)
    return engine


def generate_rows(
    engine: InferenceEngine,
    tokenizer,
    items: Sequence[WorkItem],
    *,
    n_generations: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    stop_ids: Sequence[int] | None,
    host: int,
    progress_interval_s: float,
) -> tuple[list[dict], GenerationStats]:
    """Sample every missing generation of ``items`` and return rows (unordered) and timings."""
    stats = GenerationStats(max_pages=int(engine.config.max_pages or 0))
    if not items:
        return [], stats
    requests, order = build_requests(items, n_generations, max_new_tokens, temperature, seed, stop_ids)
    progress = ProgressLogger(engine, len(order) * max_new_tokens, progress_interval_s, host)
    start = time.perf_counter()
    result = engine.generate(requests, step_callback=progress)
    end = time.perf_counter()
    first_step = progress.first_step_at or end
    stats.prefill_s = first_step - start
    stats.decode_s = end - first_step
    stats.pages_in_use_after_decode = pages_in_use(engine)
    stats.pages_free_after_decode = stats.max_pages - stats.pages_in_use_after_decode
    stats.pages_peak = max(progress.pages_peak, stats.pages_in_use_after_decode)

    by_index = {item.global_index: item for item in items}
    rows = []
    for (global_index, generation), tokens in zip(order, result.tokens, strict=True):
        item = by_index[global_index]
        ids = [int(t) for t in tokens if t != INVALID]
        rows.append(
            {
                "global_prompt_index": global_index,
                "generation_index": generation,
                "process_index": host,
                "prompt": item.prompt,
                "prompt_token_count": len(item.token_ids),
                "generated_token_ids": ids,
                "generated_text": tokenizer.decode(ids, skip_special_tokens=True),
                "generated_token_count": len(ids),
                "finish_reason": finish_reason(ids, stop_ids, max_new_tokens),
            }
        )
    stats.tokens_generated = sum(r["generated_token_count"] for r in rows)
    stats.sequences = len(rows)
    truncated = sum(r["finish_reason"] == "truncated" for r in rows)
    if truncated:
        logger.warning(
            "host %d: %d sequences ended before max_new_tokens without a stop sequence: the engine's decode budget "
            "ran out. Run levanter-multihost-plan on this config.",
            host,
            truncated,
        )
    return rows, stats


def finish_reason(ids: Sequence[int], stop_ids: Sequence[int] | None, max_new_tokens: int) -> str:
    """``stop`` if the sequence ends with the stop sequence, ``length`` at max_new_tokens, else ``truncated``."""
    if stop_ids and len(ids) >= len(stop_ids) and list(ids[-len(stop_ids) :]) == list(stop_ids):
        return "stop"
    if len(ids) >= max_new_tokens:
        return "length"
    return "truncated"
