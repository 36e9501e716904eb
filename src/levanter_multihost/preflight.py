"""Checks that run on every host before the model loads, so a bad config fails in seconds, not after a model load.

Covers the config's own values, the prompts against the tokenizer and ``max_seq_len``, the stop sequence, the
tokenizer against the model's vocabulary, the output directory (writable; no earlier outputs unless ``resume``
or ``overwrite``), and the capacity planner (:mod:`levanter_multihost.plan`). Every error names the field, prompt
index or file and the fix. Leaves out reading prompt files (:mod:`levanter_multihost.prompts`).
"""

import json
import logging
import uuid
from dataclasses import dataclass

import fsspec

from levanter_multihost import outputs, resume
from levanter_multihost.model_loading import load_tokenizer_from, tokenizer_path
from levanter_multihost.plan import check_capacity
from levanter_multihost.prompts import load_prompts
from levanter_multihost.sharding import STRATEGIES

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class TokenizedPrompts:
    texts: list[str]
    """The prompts, in global order."""
    token_ids: list[list[int]]
    """Each prompt's tokens (no special tokens added)."""
    stop_ids: list[int] | None
    """The stop sequence's tokens, or None."""


def check_config(config) -> None:
    """Checks on the config's own values."""
    if config.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens ({config.max_new_tokens}) must be > 0.")
    if config.temperature < 0:
        raise ConfigError(f"temperature ({config.temperature}) must be >= 0 (0 is greedy).")
    if config.n_generations < 1:
        raise ConfigError(f"n_generations ({config.n_generations}) must be >= 1.")
    if (config.hf_checkpoint is None) == (config.checkpoint_path is None):
        raise ConfigError("Set exactly one of `hf_checkpoint` and `checkpoint_path`.")
    if config.inference_mode != "host_data_parallel":
        raise ConfigError(f"inference_mode ({config.inference_mode!r}) must be 'host_data_parallel'.")
    if not config.defer_tracker_logs_until_end:
        raise ConfigError(
            "defer_tracker_logs_until_end is false, but host-data-parallel mode logs to the tracker only once, on "
            "the leader, after the gather: tracker calls during generation or on some hosts only have crashed TPU "
            "slices. Set defer_tracker_logs_until_end: true."
        )
    if config.shard_strategy not in STRATEGIES:
        raise ConfigError(f"shard_strategy ({config.shard_strategy!r}) must be one of {STRATEGIES}.")
    if config.resume and config.overwrite:
        raise ConfigError("`resume` and `overwrite` are both true. Choose one.")
    if config.task not in (None, "addition"):
        raise ConfigError(f"task ({config.task!r}) is not a known task. Use 'addition' or leave it unset.")
    if config.gather_timeout_s <= 0:
        raise ConfigError(f"gather_timeout_s ({config.gather_timeout_s}) must be > 0.")


def tokenize_prompts(config, prompts: list[str], tokenizer) -> TokenizedPrompts:
    """Tokenize prompts and stop sequence; check lengths against the engine and vocabulary against the model."""
    token_ids = [list(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    limit = config.engine.max_seq_len - config.max_new_tokens
    for i, ids in enumerate(token_ids):
        if len(ids) == 0:
            raise ConfigError(f"Prompt {i} tokenizes to nothing. Remove it or give it text.")
        if len(ids) > limit:
            raise ConfigError(
                f"Prompt {i} has {len(ids)} tokens, more than max_seq_len - max_new_tokens "
                f"({config.engine.max_seq_len} - {config.max_new_tokens} = {limit}). Shorten it, lower "
                f"max_new_tokens, or raise engine.max_seq_len to {len(ids) + config.max_new_tokens}."
            )
    stop_ids = None
    if config.stop_sequence is not None:
        stop_ids = list(tokenizer(config.stop_sequence, add_special_tokens=False)["input_ids"])
        if not stop_ids:
            raise ConfigError(
                f"stop_sequence ({config.stop_sequence!r}) tokenizes to nothing. Remove it or change it."
            )
    return TokenizedPrompts(texts=list(prompts), token_ids=token_ids, stop_ids=stop_ids)


def check_vocab(tokenizer, model_vocab_size: int | None) -> None:
    """The tokenizer's ids must all index the model's embedding."""
    if model_vocab_size is not None and len(tokenizer) > model_vocab_size:
        raise ConfigError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {model_vocab_size}: token ids "
            "past the embedding would be garbage. Use the tokenizer the model was trained with."
        )


def model_vocab_size(config) -> int | None:
    """The model's vocabulary size from the HF checkpoint's config.json, without loading weights."""
    if config.hf_checkpoint is None:
        return None
    path = outputs.join(config.hf_checkpoint.model_name_or_path, "config.json")
    try:
        with fsspec.open(path, "r") as f:
            return int(json.load(f)["vocab_size"])
    except (FileNotFoundError, KeyError, ValueError, OSError):
        logger.info("No readable %s; the vocabulary check runs after the model loads.", path)
        return None


def check_output_dir(config, host: int) -> None:
    """``output_dir`` must be writable and hold no earlier outputs unless ``resume`` or ``overwrite`` is set."""
    try:
        fs, path = fsspec.core.url_to_fs(config.output_dir)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.write_probe_{host}_{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except OSError as e:
        raise ConfigError(
            f"output_dir ({config.output_dir}) is not writable: {e}. Choose another output_dir."
        ) from None
    merged = outputs.join(config.output_dir, outputs.MERGED_NAME)
    if outputs.exists(merged) and not (config.resume or config.overwrite):
        raise ConfigError(
            f"{merged} exists from an earlier run. Set resume: true to keep its rows, overwrite: true to replace "
            "them, or choose another output_dir."
        )


@dataclass(frozen=True)
class Job:
    """Everything every host knows before loading the model: the checked prompts and the run's identity."""

    prompts: TokenizedPrompts
    """Prompts, their tokens and the stop sequence's tokens."""
    tokenizer: object
    """The loaded Hugging Face tokenizer."""
    fingerprint_fields: dict
    """What identifies the run's outputs (see :mod:`levanter_multihost.resume`)."""


def prepare(config, host: int, num_hosts: int) -> Job:
    """Run every check that needs no model: config, prompts, tokenizer, capacity, output_dir.

    Earlier outputs in ``output_dir`` are checked by the leader alone (:func:`resume.prepare_output_dir`), since
    it is also the one that writes this run's ``run.json`` there.
    """
    check_config(config)
    texts = load_prompts(config.prompts, config.prompts_file)
    tok_name = tokenizer_path(config.tokenizer, config.hf_checkpoint, config.checkpoint_path)
    tokenizer = load_tokenizer_from(tok_name)
    check_vocab(tokenizer, model_vocab_size(config))
    prompts = tokenize_prompts(config, texts, tokenizer)
    counts = [len(ids) for ids in prompts.token_ids]
    check_capacity(config, counts, num_hosts, len(prompts.stop_ids or []))
    check_output_dir(config, host)
    fields = resume.fingerprint_fields(config, texts, tok_name)
    return Job(prompts=prompts, tokenizer=tokenizer, fingerprint_fields=fields)
