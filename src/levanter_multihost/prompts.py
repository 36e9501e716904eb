"""Reading prompts: an inline list, a ``.txt`` file (one prompt per line) or a ``.jsonl`` file (a ``prompt`` field).

Covers reading and the checks that need only the text (empty prompts, bad files, malformed JSONL lines). Checks
that need the tokenizer (prompt length against ``max_seq_len``) live in :mod:`levanter_multihost.preflight`.
No JAX import.
"""

import json
from collections.abc import Sequence

import fsspec


class PromptError(ValueError):
    """A prompt or prompt file that cannot be used; the message names the field, file line or prompt index."""


def load_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Return the run's prompts in order, from exactly one of ``prompts`` or ``prompts_file``."""
    if prompts is not None and prompts_file is not None:
        raise PromptError("Both `prompts` and `prompts_file` are set. Set exactly one of them.")
    if prompts_file is not None:
        loaded = read_prompts_file(prompts_file)
    elif prompts is not None:
        if isinstance(prompts, str):
            raise PromptError("`prompts` must be a list of strings, not a single string. Wrap it in a list.")
        loaded = list(prompts)
        for i, p in enumerate(loaded):
            if not isinstance(p, str):
                raise PromptError(f"`prompts[{i}]` is a {type(p).__name__}, not a string.")
    else:
        raise PromptError("No prompts: set `prompts` (a list) or `prompts_file` (.txt or .jsonl).")
    if not loaded:
        source = f"`prompts_file` ({prompts_file})" if prompts_file is not None else "`prompts`"
        raise PromptError(f"No prompts: {source} is empty.")
    for i, p in enumerate(loaded):
        if p == "":
            raise PromptError(f"Prompt {i} is an empty string. Remove it or give it text.")
    return loaded


def read_prompts_file(path: str) -> list[str]:
    """Read a ``.txt`` (one prompt per line, trailing newline stripped) or ``.jsonl`` prompts file."""
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PromptError(f"`prompts_file` not found: {path}") from None
    except (PermissionError, IsADirectoryError, OSError) as e:
        raise PromptError(f"`prompts_file` cannot be read: {path} ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PromptError(f"`prompts_file` {path} is not UTF-8 (line {line}, byte {e.start}).") from None
    lines = text.splitlines()
    if path.endswith(".jsonl"):
        return _parse_jsonl(path, lines)
    if path.endswith(".txt"):
        return [line for line in lines if line.strip() != ""]
    raise PromptError(f"`prompts_file` {path} must end in .txt (one prompt per line) or .jsonl (a `prompt` field).")


def _parse_jsonl(path: str, lines: list[str]) -> list[str]:
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"`prompts_file` {path} line {lineno}: malformed JSON ({e.msg}).") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise PromptError(f"`prompts_file` {path} line {lineno}: no `prompt` field.")
        if not isinstance(record["prompt"], str):
            raise PromptError(f"`prompts_file` {path} line {lineno}: `prompt` is not a string.")
        out.append(record["prompt"])
    return out
