"""Turning prompts into the token ids the engine is given, and stop strings and EOS into stop sequences.

Covers chat rendering (the tokenizer's chat template, or one from the config), the BOS convention, tokenizing
with the prompt's index in every error, and the stop condition: stop strings tokenized without special tokens,
EOS ids from the tokenizer and the checkpoint's ``generation_config.json``. No JAX import.
"""

import json
import os

import numpy as np

from levanter_multihost.errors import ConfigError, first_line
from levanter_multihost.prompts import PromptError, PromptRecords
from levanter_multihost.runplan import PromptSet, StopCondition, TokenTable

TOKENIZE_CHUNK = 4096
"""Prompts tokenized per call: one call for all of them would hold every prompt's Python token lists at once."""


def load_checked(load, location: str):
    """``load(location)``, Levanter's tokenizer loader, with a directory that holds no tokenizer (or a broken
    one) said in one line."""
    try:
        return load(location)
    except Exception as e:  # noqa: BLE001 - transformers raises many types (AttributeError for a bare directory)
        raise ConfigError(
            f"tokenizer ({location}) does not load as a tokenizer ({type(e).__name__}: "
            f"{first_line(e)}). Point `tokenizer` (or hf_checkpoint) at a directory with tokenizer.json "
            "or tokenizer_config.json."
        ) from None


def bos_wanted(tokenizer, add_bos: bool | None) -> bool:
    """Whether text prompts start with BOS: ``add_bos`` if set, else what the tokenizer itself does."""
    if add_bos is not None:
        if add_bos and tokenizer.bos_token_id is None:
            raise ConfigError(
                "add_bos is true but the tokenizer has no BOS token. Set add_bos: false or leave it unset."
            )
        return add_bos
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def encode_prompts(
    records: PromptRecords,
    tokenizer,
    *,
    chat_template: str | None,
    add_bos: bool | None,
    max_new_tokens: int,
    temperature: float,
    n_generations: int,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int = 0,
    first: int = 0,
) -> PromptSet:
    """Render chats, tokenize every prompt and apply the per-row overrides on the config's defaults; ``records``
    are the prompts from global index ``first`` on (errors name that index)."""
    bos = bos_wanted(tokenizer, add_bos)
    texts = [
        t if t is not None else _render(m, tokenizer, chat_template, i)
        for i, (t, m) in enumerate(zip(records.texts, records.messages), start=first)
    ]
    tables = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):  # a chunk's Python lists at a time, not every prompt's
        ids = _tokenize(texts[start : start + TOKENIZE_CHUNK], tokenizer, first + start)
        for i, prompt_ids in enumerate(ids):
            # a chat template usually writes BOS itself; add it only where the prompt does not start with it
            if bos and (not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id):
                ids[i] = [tokenizer.bos_token_id, *prompt_ids]
            if not ids[i]:
                raise PromptError(f"Prompt {first + start + i} tokenizes to nothing. Remove it or give it text.")
        tables.append(TokenTable.of(ids))

    return PromptSet(
        texts=texts,
        tokens=TokenTable.concatenate(tables),
        max_new_tokens=per_prompt(records, "max_new_tokens", max_new_tokens),
        temperature=per_prompt(records, "temperature", temperature, np.float32),
        n_generations=per_prompt(records, "n_generations", n_generations),
        top_k=per_prompt(records, "top_k", top_k),
        top_p=per_prompt(records, "top_p", top_p, np.float32),
        min_p=per_prompt(records, "min_p", min_p, np.float32),
        seed=per_prompt(records, "seed", seed, np.int64),
        extra_json=records.extra_json,
        first=first,
    )


def per_prompt(records: PromptRecords, column: str, default, dtype=np.int32) -> np.ndarray:
    """Each prompt's value of an override ``column``: the row's own where it sets one, else ``default``."""
    values = records.overrides.get(column)
    if values is None:
        return np.full(len(records), default, dtype=dtype)
    return np.array([default if v is None else v for v in values], dtype=dtype)


def check_spelled(prompts: PromptSet, tokenizer) -> None:
    """Refuse the first prompt with characters the tokenizer cannot spell: they become its unknown token, silently
    (a BOM, a NUL, a letter a tiny vocabulary lacks). A prompt that writes the unknown token itself is left be."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    tokens = prompts.tokens
    hits = np.searchsorted(tokens.offsets, np.flatnonzero(tokens.flat == unk), side="right") - 1
    for index in dict.fromkeys(hits.tolist()):
        text = prompts.texts[index]
        if not (tokenizer.unk_token and tokenizer.unk_token in text):
            ids = tokens.flat[tokens.offsets[index] : tokens.offsets[index + 1]].tolist()
            _refuse_unspelled(text, ids, tokenizer, prompts.first + index)


def _refuse_unspelled(text: str, ids: list[int], tokenizer, index: int) -> None:
    unk = tokenizer.unk_token_id
    unspelled = sorted({c for c in text if unk in tokenizer(c, add_special_tokens=False)["input_ids"]})
    what = "only" if all(t in (unk, tokenizer.bos_token_id) for t in ids) else "partly"
    raise PromptError(
        f"Prompt {index} becomes {what} the unknown token {tokenizer.unk_token!r}: the tokenizer cannot "
        f"spell {', '.join(repr(c) for c in unspelled[:5]) or 'it'}. Fix the prompt, or set "
        "allow_unknown_tokens: true."
    )


def _render(messages, tokenizer, chat_template: str | None, index: int) -> str:
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise PromptError(
            f"Prompt {index} is a chat (messages), but the tokenizer has no chat template. Set chat_template in the "
            "config (a Jinja template), or give text prompts."
        )
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # Jinja errors come in many types
        raise PromptError(
            f"Prompt {index}: the chat template fails on its messages ({type(e).__name__}: {e})."
        ) from None


def _tokenize(texts: list[str], tokenizer, first: int) -> list[list[int]]:
    """Token ids of ``texts`` (prompts ``first``, ``first + 1``, ...), naming the prompt a tokenizer error is in."""
    try:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    except Exception:  # the batch call does not say which prompt failed: find it
        for i, text in enumerate(texts, start=first):
            try:
                tokenizer(text, add_special_tokens=False)
            except Exception as e:
                raise PromptError(f"Prompt {i} cannot be tokenized ({type(e).__name__}: {e}).") from None
        raise


def stop_condition(
    tokenizer, stop_sequences: list[str], stop_at_eos: bool, include_stop_in_text: bool, checkpoint: str | None
) -> StopCondition:
    """The stop strings' tokens and the EOS ids, each checked: nothing empty, nothing unknown to the tokenizer."""
    token_ids = []
    for s in stop_sequences:
        if not isinstance(s, str):
            raise ConfigError(f"stop_sequences holds {s!r}, not a string.")
        ids = tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ConfigError(f"stop_sequences entry {s!r} tokenizes to nothing. Remove it or change it.")
        unk = tokenizer.unk_token_id
        if unk is not None and unk in ids and s != tokenizer.unk_token:
            raise ConfigError(
                f"stop_sequences entry {s!r} tokenizes to the unknown token {tokenizer.unk_token!r}: the tokenizer "
                "cannot spell it, so it would stop at any unknown character instead. Remove it or change it."
            )
        token_ids.append(ids)
    eos = eos_ids(tokenizer, checkpoint) if stop_at_eos else ()
    return StopCondition(tuple(stop_sequences), tuple(token_ids), eos, include_stop_in_text)


def eos_ids(tokenizer, checkpoint: str | None) -> tuple[int, ...]:
    """EOS ids of the tokenizer, then of the checkpoint's ``generation_config.json`` (local directory only)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    path = None if checkpoint is None else os.path.join(checkpoint, "generation_config.json")
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            value = json.load(f).get("eos_token_id")
        for e in value if isinstance(value, list) else [] if value is None else [value]:
            if int(e) not in ids:
                ids.append(int(e))
    return tuple(ids)
