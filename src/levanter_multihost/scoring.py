"""Scoring given completions: lm-eval-harness ``loglikelihood`` rows from one forward pass, no engine.

A row with a ``completion`` column is a scoring row: its output holds the log-probability of every completion
token given the prompt and the tokens before it (``completion_logprobs``), their sum (``completion_logprob``),
whether each one is the model's argmax (``is_greedy``) and, with ``prompt_logprobs: true``, the log-probability of
every prompt token after the first. Scoring rows go through the same shares, batches, parts, resume and merge as
generated rows (one row per prompt, generation 0). A batch is prompt + completion, right-padded to one of a few
bucketed lengths and a row count fixed per length, so the forward pass compiles once per bucket; log-softmax and
argmax are gathered on device, in float32.
"""

import dataclasses
import time
from collections.abc import Callable, Sequence

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
from levanter.layers.attention import AttentionMask

from levanter_multihost.errors import ConfigError
from levanter_multihost.generation import BatchStats, WorkItem
from levanter_multihost.prompts import PromptError
from levanter_multihost.runplan import EngineSettings, PromptSet, TokenTable

MIN_BUCKET = 16
"""The shortest padded length; longer batches pad to the next power of two, so a run compiles a handful of times."""

Rows = list[tuple[dict, bytes | None]]


def with_completions(
    prompts: PromptSet, completions: Sequence[str | None] | None, tokenizer, prompt_logprobs: bool, task: str | None
) -> PromptSet:
    """``prompts`` with their completions' token ids when rows have a ``completion`` column (every row must then
    have one), planned as prompt + completion tokens with no new tokens; unchanged when none has one."""
    if completions is None:
        if prompt_logprobs:
            raise ConfigError(
                "prompt_logprobs is true, but no row has a `completion` column to score. Add one (a "
                "string per row) or set prompt_logprobs: false."
            )
        return prompts
    missing = next((i for i, c in enumerate(completions) if c is None), None)
    if missing is not None:
        raise PromptError(
            f"Row {missing} has no `completion`, but other rows do: a run scores every row or none. "
            "Give every row a completion, or split the input."
        )
    if task is not None:
        raise ConfigError(
            f"task ({task!r}) checks generated text, but rows with a `completion` are scored, not "
            "generated. Set --task null and compare completion_logprob instead."
        )
    several = np.flatnonzero(prompts.n_generations != 1)
    if len(several):
        raise PromptError(
            f"Row {several[0]} asks for {prompts.n_generations[several[0]]} generations, but a scoring "
            "row (with a `completion`) has exactly one. Set n_generations to 1."
        )
    ids = [list(t) for t in tokenizer(list(completions), add_special_tokens=False)["input_ids"]]
    empty = next((i for i, t in enumerate(ids) if not t), None)
    if empty is not None:
        raise PromptError(f"Row {empty}: its `completion` tokenizes to nothing. Remove the row or give it text.")
    return dataclasses.replace(
        prompts, completions=TokenTable.of(ids), max_new_tokens=np.zeros(len(prompts), dtype=np.int32)
    )


def bucket(length: int) -> int:
    """The padded length of a batch whose longest row has ``length`` tokens."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def rows_per_batch(length: int, engine: EngineSettings) -> int:
    """Rows of a batch padded to ``length`` (a bucket): as many as the engine's prefill budget holds in tokens,
    within ``max_seqs``, ``max_seqs_in_prefill`` and ``batch_size`` (the planner's bounds)."""
    limits = engine.limits
    cap = min(limits.max_seqs, limits.max_seqs_in_prefill, engine.batch_size or limits.max_seqs)
    return max(1, min(cap, limits.prefill_size // length))


def batches(items: list[WorkItem], engine: EngineSettings) -> list[list[WorkItem]]:
    """``items`` in order, a batch cut where the next row would not fit its padded shape."""
    out: list[list[WorkItem]] = []
    longest = 0
    for item in items:
        length = len(item.token_ids) + len(item.completion_ids)
        grown = max(longest, length)
        if out and len(out[-1]) < rows_per_batch(bucket(grown), engine):
            out[-1].append(item)
            longest = grown
        else:
            out.append([item])
            longest = length
    return out


@eqx.filter_jit
def _token_scores(model, tokens: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per position: the log-softmax (float32) of the next token ``targets`` names, and whether it is the argmax."""
    Batch = hax.Axis("batch", tokens.shape[0])
    Pos = model.Pos.resize(tokens.shape[1])
    ids = hax.shard(hax.named(tokens, (Batch, Pos)))
    logits = model(ids, attn_mask=AttentionMask.causal()).rearrange((Batch, Pos, model.Vocab)).array
    logits = logits.astype(jnp.float32)
    # the log-softmax at the target alone: a second [batch, position, vocab] array would double the peak memory
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return chosen, jnp.argmax(logits, axis=-1) == targets


def score_batch(
    model,
    items: Sequence[WorkItem],
    engine: EngineSettings,
    prompt_logprobs: bool,
    host: int,
    compile_clock: Callable[[], float],
) -> tuple[Rows, BatchStats]:
    """Score every item's completion in one forward pass; (row, carried columns) pairs in prompt order, and the
    batch's timings (the pass counts as prefill; compiling is split off)."""
    longest = max(len(i.token_ids) + len(i.completion_ids) for i in items)
    length = bucket(longest)
    devices = jax.local_device_count()  # the batch is sharded over them: its padded rows are a multiple
    shape = (-(-rows_per_batch(length, engine) // devices) * devices, length)
    tokens, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for r, item in enumerate(items):
        sequence = list(item.token_ids) + list(item.completion_ids)
        tokens[r, : len(sequence)] = sequence
        targets[r, : len(sequence) - 1] = sequence[1:]  # position t's logits predict token t + 1
    start, compiled = time.perf_counter(), compile_clock()
    chosen, greedy = jax.device_get(_token_scores(model, jnp.asarray(tokens), jnp.asarray(targets)))
    seconds, compile_s = time.perf_counter() - start, compile_clock() - compiled
    rows = []
    for r, item in enumerate(items):
        first, end = len(item.token_ids) - 1, len(item.token_ids) - 1 + len(item.completion_ids)
        logprobs = [float(x) for x in chosen[r, first:end]]
        row = {
            "global_prompt_index": item.global_index,
            "generation_index": 0,
            "process_index": host,
            "prompt": item.prompt,
            "prompt_token_count": len(item.token_ids),
            "completion_token_ids": list(item.completion_ids),
            "completion_token_count": len(item.completion_ids),
            "completion_logprobs": logprobs,
            "completion_logprob": sum(logprobs),
            "is_greedy": bool(greedy[r, first:end].all()),
        }
        if prompt_logprobs:
            row["prompt_logprobs"] = [float(x) for x in chosen[r, :first]]
        rows.append((row, item.extra_json))
    stats = BatchStats(sequences=len(items), prefill_s=max(seconds - compile_s, 0.0), compile_prefill_s=compile_s)
    return rows, stats


def verify(row: dict, prompt: int, prompts: PromptSet) -> str | None:
    """What is wrong with a scoring row read back for ``prompt`` (None if nothing): its completion's ids must be the
    input's, and its counts, sum and flags must follow from them."""
    ids, logprobs = row.get("completion_token_ids"), row.get("completion_logprobs")
    if ids != prompts.completions[prompt]:
        return f"its completion_token_ids differ from the completion of prompt {prompt}"
    numbers = isinstance(logprobs, list) and all(isinstance(x, (int, float)) for x in logprobs)
    if not numbers or len(logprobs) != len(ids) or row.get("completion_token_count") != len(ids):
        return "its completion_logprobs or completion_token_count do not match its completion's tokens"
    if row.get("completion_logprob") != sum(logprobs) or not isinstance(row.get("is_greedy"), bool):
        return "its completion_logprob is not the sum of its completion_logprobs, or is_greedy is not a boolean"
    if "prompt_logprobs" in row and len(row["prompt_logprobs"]) != prompts.tokens.length(prompt) - 1:
        return "its prompt_logprobs do not match its prompt's tokens"
    return None
