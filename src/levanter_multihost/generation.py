"""One batch through Levanter's paged-attention ``InferenceEngine``: requests in, rows out, the engine checked.

Covers building the host's engine once, one request per sequence of a batch (the engine's clones are avoided,
see :func:`build_requests`), sampling keys that depend only on the seed, the
global prompt index and the generation, turning the engine's tokens into rows (stop strings, EOS, finish
reasons), and checking the engine's state after every call: its own checks run as NaN poisoning
(:func:`levanter_multihost.seams.checks_as_nan`), so a violated one shows only in the state it leaves. Everything
here is local to the host: no cross-host communication and no tracker call.
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
from levanter.inference.engine import InferenceEngine, InferenceEngineConfig, Request
from levanter.inference.jit_scheduler import SeqDecodingParams
from levanter.inference.utils import INVALID

from levanter_multihost.runplan import Sampling, StopCondition
from levanter_multihost.seams import decode_step, engine_state
from levanter_multihost.seams import sampler as sampler_seam

logger = logging.getLogger(__name__)


class EngineStateError(RuntimeError):
    """The engine's state after a batch shows a violated engine check; the message names host, batch and fix."""


@dataclass(frozen=True)
class WorkItem:
    """One prompt of a batch and which of its generations to sample."""

    global_index: int
    prompt: str
    token_ids: list[int]
    generations: tuple[int, ...]
    n_generations: int
    """All generations of the prompt (``generations`` is a subset when resuming)."""
    max_new_tokens: int
    temperature: float
    extra_json: bytes | None = None
    top_k: int = 0
    """Sample from the k most likely tokens only; 0 keeps every token."""
    top_p: float = 1.0
    """Sample from the fewest most likely tokens whose probability reaches p; 1 keeps every token."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 keeps every token."""
    seed: int | None = None
    """The row's own seed of its sampling keys; None takes the run's (``Sampling.seed``)."""
    completion_ids: tuple[int, ...] | None = None
    """The token ids a scoring row is scored on (:mod:`levanter_multihost.scoring`); None to generate."""


@dataclass
class BatchStats:
    """What one batch took; the sampler sums them and reports each in the summary."""

    sequences: int = 0
    tokens: int = 0
    prefill_s: float = 0.0
    """From the call until decoding starts (admission and prefill), compiling excluded."""
    decode_s: float = 0.0
    """From the first decode round until the call returns, compiling excluded."""
    compile_prefill_s: float = 0.0
    """Compiling (or fetching from the persistent cache) before decoding started: the first batch's prefill."""
    compile_decode_s: float = 0.0
    """Compiling during decoding: the first batch's first decode round."""
    outer_rounds: int = 0
    """Decode rounds (``_run_generation_loop`` calls) the engine ran."""
    waves: int = 1
    """Prefill admissions: 1 unless prompts were still queued when decoding started."""
    pages_after_prefill: int = 0
    """Pages in use when decoding started."""


@jax.jit
def sequence_keys(seeds: jax.Array, prompts: jax.Array, generations: jax.Array) -> jax.Array:
    """The sampling key of each (seed, prompt, generation): generation 0 uses the prompt's key, generation g > 0
    folds in g, exactly as the engine derives the keys of a request's clones. ``seeds`` holds each 64-bit seed as
    (low, high) uint32 halves. One call per batch: a key per sequence derived eagerly costs two dispatches each,
    which at tens of thousands of sequences outweighs the decoding."""

    def key(seed, prompt, generation):
        seed_key = jax.random.PRNGKey(seed[0])  # PRNGKey keeps only a seed's low 32 bits
        # the high half folded in, so seeds s and s + 2**32 differ; seeds below 2**32 keep the keys they always had
        seed_key = jnp.where(seed[1] == 0, seed_key, jax.random.fold_in(seed_key, seed[1]))
        prompt_key = jax.random.fold_in(seed_key, prompt)
        return jnp.where(generation == 0, prompt_key, jax.random.fold_in(prompt_key, generation))

    return jax.vmap(key)(seeds, prompts, generations)


def build_engine(model, tokenizer, config: InferenceEngineConfig, logprobs: bool) -> InferenceEngine:
    """The host's engine, with its KV cache allocated and the decode step without serial loops
    (:mod:`levanter_multihost.seams.decode_step`); built once and reused for every batch."""
    decode_step.install()  # before the engine exists: it builds the seam's DecodeState
    config = dataclasses.replace(config, enable_logprobs=logprobs)
    engine = InferenceEngine.from_model_with_config(model=model, tokenizer=tokenizer, config=config)
    engine_state.check(engine)  # what the progress lines and the after-batch check read of it
    engine_state.wait_allocated(engine)
    return engine


def stop_array(stop: StopCondition):
    """Every stop sequence, left-padded with INVALID to one length, as the engine takes them; None for none."""
    sequences = stop.sequences
    if not sequences:
        return None
    width = max(len(s) for s in sequences)
    rows = [[INVALID] * (width - len(s)) + list(s) for s in sequences]
    return hax.named(jnp.asarray(rows, dtype=jnp.int32), ("stop_seq", "position"))


def build_requests(
    items: Sequence[WorkItem], sampling: Sampling
) -> tuple[list[Request], list[tuple[int, int]], np.ndarray | None]:
    """Engine requests for ``items``, in output order the (prompt, generation) of each sequence, and the table of
    sampling controls the engine's sampler needs (None when no sequence uses top-k, top-p or min-p)."""
    stop = stop_array(sampling.stop)
    # One request per generation, never the engine's clones: the pinned engine sets a clone up before its
    # parent's prompt pages exist, so for prompts of page_size tokens or more a clone samples from the wrong
    # context or leaks pages (tests/test_batch_engine.py pins it). The keys are the ones it would give clones.
    each = [(item, g) for item in items for g in item.generations]
    order = [(item.global_index, g) for item, g in each]
    seeds = np.array([sampling.seed if item.seed is None else item.seed for item, _ in each], dtype=np.uint64)
    halves = np.stack([seeds & 0xFFFFFFFF, seeds >> 32], axis=1).astype(np.uint32)
    keys = np.asarray(sequence_keys(halves, np.array([p for p, _ in order]), np.array([g for _, g in order])))
    asked = [(item.temperature, item.top_k, item.top_p, item.min_p) for item, _ in each]
    temperatures, controls = sampler_seam.controlled_temperatures(np.array(asked, np.float32).reshape(-1, 4))
    requests = []
    for item, _ in each:
        # the engine reads these with np.asarray: host scalars, not device arrays made one at a time
        max_num_tokens = np.int32(len(item.token_ids) + item.max_new_tokens)
        params = SeqDecodingParams(max_num_tokens, stop, temperatures[len(requests)], keys[len(requests)])
        requests.append(Request(list(item.token_ids), len(requests), params, 1, sampling.logprobs))
    return requests, order, controls


def generate_batch(
    engine: InferenceEngine,
    tokenizer,
    items: Sequence[WorkItem],
    sampling: Sampling,
    host: int,
    on_round: Callable[[int], None],
    compile_clock: Callable[[], float],
) -> tuple[list[tuple[dict, bytes | None]], BatchStats]:
    """Sample every listed generation of ``items`` in one ``generate`` call; return (row, carried columns) pairs
    in (prompt, generation) order, and the batch's timings.

    ``on_round(tokens_so_far)`` is called at the start of every decode round (for progress lines);
    ``compile_clock()`` reads the process's compile seconds, so compiling is split off prefill and decode.
    """
    requests, order, controls = build_requests(items, sampling)
    sampler_seam.use(engine, controls)
    stats = BatchStats(sequences=len(order))
    marks: list[tuple[float, float]] = []

    def step(iteration: int) -> None:
        if iteration == 0:
            marks.append((time.perf_counter(), compile_clock()))
            stats.waves = 1 + bool(engine_state.requests_waiting(engine))
            stats.pages_after_prefill = engine_state.pages_in_use(engine)
        stats.outer_rounds += 1
        on_round(engine_state.tokens_so_far(engine))

    start, compiled = time.perf_counter(), compile_clock()
    result = engine.generate(requests, step_callback=step)
    end, compiled_end = time.perf_counter(), compile_clock()
    decode_start, compiled_mid = marks[0] if marks else (end, compiled_end)
    stats.compile_prefill_s = compiled_mid - compiled
    stats.compile_decode_s = compiled_end - compiled_mid
    stats.prefill_s = max(decode_start - start - stats.compile_prefill_s, 0.0)
    stats.decode_s = max(end - decode_start - stats.compile_decode_s, 0.0)

    by_index = {item.global_index: item for item in items}
    logprobs = result.logprobs if sampling.logprobs else [None] * len(order)
    rows = []
    for (index, generation), tokens, lps in zip(order, result.tokens, logprobs, strict=True):
        item = by_index[index]
        ids = [int(t) for t in tokens if t != INVALID]
        row = {
            "global_prompt_index": index,
            "generation_index": generation,
            "process_index": host,
            "prompt": item.prompt,
            "prompt_token_count": len(item.token_ids),
            **row_ending(ids, tokenizer, sampling.stop, item.max_new_tokens),
        }
        if sampling.logprobs:
            row["generated_logprobs"] = [float(x) for x in lps[: row["generated_token_count"]]]
        rows.append((row, item.extra_json))
        stats.tokens += len(ids)  # what the engine decoded, cut or not
    rows.sort(key=lambda r: (r[0]["global_prompt_index"], r[0]["generation_index"]))
    return rows, stats


def row_ending(ids: list[int], tokenizer, stop: StopCondition, max_new_tokens: int) -> dict:
    """Token ids, text and finish reason of a sequence's tokens.

    The stop string that appears first in the text wins (the engine matches stop strings as tokens, and a string
    can also be spelled by other tokens): the token ids are cut after the token that completes it, as vLLM cuts
    them, so ids, log-probabilities and text agree. Then EOS as the last token; then ``length`` at
    max_new_tokens; anything shorter is ``truncated`` (the engine's decode budget ran out, which the planner rules
    out). ``stop_reason`` is the stop string, or the EOS token's text.
    """
    eos = bool(ids) and ids[-1] in stop.eos_ids
    text = tokenizer.decode(ids[:-1] if eos else ids, skip_special_tokens=True)
    hits = [(text.find(s), k) for k, s in enumerate(stop.strings) if s in text]
    if hits:
        at, k = min(hits)
        s = stop.strings[k]
        ids = ids[: _tokens_spelling(ids, tokenizer, at + len(s), s)]
        text = text[: at + len(s)] if stop.include_stop_in_text else text[:at]
        reason, stop_reason = "stop", s
    elif eos:  # the EOS token's own text ("</s>", "<|eot_id|>"): stop_reason is always a string or null
        reason, stop_reason = "stop", tokenizer.convert_ids_to_tokens(ids[-1])
    else:
        reason, stop_reason = ("length" if len(ids) >= max_new_tokens else "truncated"), None
    return {
        "generated_token_ids": ids,
        "generated_text": text,
        "generated_token_count": len(ids),
        "finish_reason": reason,
        "stop_reason": stop_reason,
    }


def _tokens_spelling(ids: list[int], tokenizer, end: int, stop: str) -> int:
    """The fewest leading tokens of ``ids`` whose text holds ``stop`` ending at character ``end`` (a binary
    search: once a prefix spells it, every longer prefix does)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenizer.decode(ids[:mid], skip_special_tokens=True)[end - len(stop) : end] == stop:
            hi = mid
        else:
            lo = mid + 1
    return hi


def check_engine_state(
    engine: InferenceEngine, rows: list[tuple[dict, bytes | None]], host: int, batch: int, vocab_size: int
) -> None:
    """Fail if the engine's state or output shows a violated check (the NaN-poisoned kind, or a leak).

    After a batch every sequence is finished and released: no page is referenced, no slot is used, every page
    count is a count, and every token is in the vocabulary.
    """
    held = engine_state.held_after_batch(engine)
    where = f"host {host}, batch {batch}"
    if held.poisoned:
        raise EngineStateError(
            f"{where}: the engine's page table is poisoned (a page count of {held.largest_count}): an engine check "
            "failed during the batch, most likely 'Out of free pages'. No row of it is kept. Lower batch_size or "
            "raise engine.max_pages (levanter-multihost-plan shows what the batches need)."
        )
    if held.pages or held.slots or not held.free_slot_list_complete:
        raise EngineStateError(
            f"{where}: {held.pages} pages and {held.slots} sequence slots are still held after "
            "generate returned: some sequences never finished. Lower batch_size (levanter-multihost-plan shows the "
            "decode budget)."
        )
    bad = [
        (r["global_prompt_index"], t) for r, _ in rows for t in r["generated_token_ids"] if not 0 <= t < vocab_size
    ]
    if bad:
        raise EngineStateError(
            f"{where}: generated token ids outside the vocabulary of {vocab_size}, first "
            f"(prompt, id) {bad[:5]}: the engine's state is poisoned. No row of it is kept."
        )
