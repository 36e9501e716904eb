"""Reading prompts: inline, a ``.txt``/``.jsonl``/``.parquet`` file, or a Hugging Face dataset.

Each input row becomes one prompt; its position in the input is its ``global_prompt_index``. A row holds a text
prompt (``prompt_field``) or a chat (``messages_field``: a list of ``{"role", "content"}``), exactly one of
them. Every other column is carried through, unchanged, into the row's outputs, and ``max_new_tokens``,
``temperature``, ``n_generations``, ``top_k``, ``top_p``, ``min_p`` and ``seed`` columns also override the
config for that row; a ``completion`` column makes the row a scoring row. Covers the checks that
need only the data; tokenizing lives in :mod:`levanter_multihost.encoding`. No JAX import.
"""

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from levanter_multihost.errors import UserError, first_line
from levanter_multihost.outputs import OUTPUT_FIELDS

INT32_MAX = 2**31 - 1
"""Token counts and generation counts travel as int32 in the engine and the prompt tables."""
FLOAT32_MAX = 3.4028234663852886e38
"""Temperatures travel as float32: a larger one becomes inf."""
MAX_SEED = 2**63 - 1
REAL_OVERRIDES = {
    "temperature": (
        lambda v: 0 <= v <= FLOAT32_MAX,
        f"a number in [0, {FLOAT32_MAX:.3g}] (0 is greedy; float32 holds no more)",
    ),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1] (1 keeps every token)"),
    "min_p": (lambda v: 0 <= v <= 1, "a number in [0, 1] (0 keeps every token)"),
}
"""Real-valued overrides: each one's valid range, and how to say it."""
INTEGER_OVERRIDES = {
    "max_new_tokens": (lambda v: 1 <= v <= INT32_MAX, "a positive integer <= 2**31 - 1"),
    "n_generations": (lambda v: 1 <= v <= INT32_MAX, "a positive integer <= 2**31 - 1"),
    "top_k": (lambda v: 0 <= v <= INT32_MAX, "an integer >= 0 (0 keeps every token) and <= 2**31 - 1"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, "an integer in [0, 2**63 - 1]"),
}
"""Integer overrides: each one's valid range, and how to say it."""
OVERRIDES = (*INTEGER_OVERRIDES, *REAL_OVERRIDES)
"""Columns that override the config's value for their row (and are carried through like any other)."""
COMPLETION = "completion"
"""Column holding the text a row is scored on (:mod:`levanter_multihost.scoring`); carried like any other."""
MAX_PROMPTS_FILE_BYTES = 16 * 1024**3
"""Larger prompt files are refused before reading (use a Parquet file or a dataset, which are read in batches)."""


class PromptError(UserError):
    """A prompt or prompt source that cannot be used; the message names the source, line or row and the fix."""


@dataclass
class PromptRecords:
    """The prompts as read, before tokenizing."""

    texts: list[str | None]
    """Each row's text prompt, or None where it has messages."""
    messages: list[list[dict[str, str]] | None]
    """Each row's chat messages, or None where it has a text prompt."""
    extra_json: list[bytes] | None
    """Each row's carried columns as JSON object members (``b', "id": 3'``); None when no row has any."""
    overrides: dict[str, list[Any]]
    """Per override column present, each row's value (None where the row leaves it unset)."""
    completions: list[str | None] | None = None
    """Each row's `completion` to score (None where it has none); None when no row has one."""

    def __len__(self) -> int:
        return len(self.texts)


def read_prompts(
    prompts: Sequence[str | dict] | None = None,
    file: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    prompt_field: str = "prompt",
    messages_field: str = "messages",
) -> PromptRecords:
    """Every prompt, in order, from exactly one source, checked for what can be checked without a tokenizer.

    ``prompts`` (inline strings, or objects shaped like a JSONL row) win over ``file`` (.txt, .jsonl, .parquet,
    local or fsspec) and ``dataset`` (a Hugging Face dataset directory or hub id, its ``split``);
    ``prompt_field`` / ``messages_field`` name the columns of a row's text prompt and chat.
    """
    fields = (prompt_field, messages_field)
    if prompts is None and file is not None and dataset is not None:
        raise PromptError(
            f"Both `prompts_file` ({file}) and `prompts_dataset` ({dataset}) are set. Set one, e.g. "
            "--prompts_file null to read the dataset."
        )
    if prompts is not None:
        if isinstance(prompts, str):
            raise PromptError("`prompts` must be a list of strings, not a single string. Wrap it in a list.")
        rows = ({prompt_field: p} if isinstance(p, str) else p for p in prompts)
        records = _records(rows, fields, "`prompts`", lambda i: f"[{i}]")
    elif file is not None:
        rows, where = _file_rows(file)
        records = _records(rows, fields, f"`prompts_file` {file}", where)
    elif dataset is not None:
        records = _records(
            _dataset_rows(dataset, split), fields, f"`prompts_dataset` {dataset}", lambda i: f" row {i}"
        )
    else:
        raise PromptError(
            "No prompts: set `prompts` (a list), `prompts_file` (.txt, .jsonl, .parquet) or "
            "`prompts_dataset` (a Hugging Face dataset)."
        )
    if not len(records):
        raise PromptError("No prompts: the prompt source is empty.")
    return records


def read_line_range(
    path: str, start: int, end: int, first: int, prompt_field: str = "prompt", messages_field: str = "messages"
) -> PromptRecords:
    """The prompts of the lines in bytes [``start``, ``end``) of a ``.txt``/``.jsonl`` file, the first of them line
    ``first`` (0-based) of the file, checked as :func:`read_prompts` checks them: one host's share of a large file
    (:mod:`levanter_multihost.host_input`)."""
    kind, fs, fs_path = file_kind(path)
    try:
        with fs.open(fs_path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
    except OSError as e:
        raise PromptError(f"`prompts_file` cannot be read: {path} ({e})") from None
    rows, where = line_rows(raw, path, kind, first)
    return _records(rows, (prompt_field, messages_field), f"`prompts_file` {path}", where)


def read_row_range(
    kind: str,
    path: str,
    start: int,
    end: int,
    split: str = "train",
    prompt_field: str = "prompt",
    messages_field: str = "messages",
) -> PromptRecords:
    """The prompts of rows [``start``, ``end``) of a Parquet file (``kind`` ``.parquet``) or of a dataset saved with
    ``save_to_disk`` (``kind`` ``dataset``, its ``split``), named in errors by their row in the whole input and
    checked as :func:`read_prompts` checks them: one host's share (:mod:`levanter_multihost.host_input`)."""
    if kind == ".parquet":
        rows, name = _parquet_rows(path, start, end), f"`prompts_file` {path}"
    else:
        rows, name = saved_dataset(path, split).select(range(start, end)), f"`prompts_dataset` {path}"
    return _records(rows, (prompt_field, messages_field), name, lambda i: f" row {start + i}")


def _records(rows: Iterable[dict[str, Any]], fields: tuple[str, str], name: str, where) -> PromptRecords:
    prompt_field, messages_field = fields
    texts, messages, extras, completions, overrides = [], [], [], [], {k: [] for k in OVERRIDES}
    consumed = set(fields)
    any_extra = False
    for i, row in enumerate(rows):
        at = f"{name}{where(i)}"
        if not isinstance(row, dict):
            raise PromptError(f"{at}: is a {type(row).__name__}, not an object with a `{prompt_field}`.")
        text, chat = row.get(prompt_field), row.get(messages_field)
        if (text is None) == (chat is None):
            raise PromptError(
                f"{at}: has {'both' if text is not None else 'neither'} `{prompt_field}` and "
                f"`{messages_field}`. Give each row exactly one (or set prompt_field / messages_field)."
            )
        if text is not None:
            if not isinstance(text, str):
                raise PromptError(f"{at}: `{prompt_field}` is a {type(text).__name__}, not a string.")
            if text == "":
                raise PromptError(f"{at}: `{prompt_field}` is an empty string. Remove the row or give it text.")
            _check_encodable(text, f"{at}: `{prompt_field}`")
        else:
            _check_messages(chat, f"{at}: `{messages_field}`")
        completion = row.get(COMPLETION)
        if completion is not None and (not isinstance(completion, str) or completion == ""):
            raise PromptError(f"{at}: `{COMPLETION}` is {completion!r:.60}; it must be a non-empty string to score.")
        texts.append(text)
        messages.append(chat)
        completions.append(completion)
        carried = {k: v for k, v in row.items() if k not in consumed}
        for k, v in carried.items():
            if isinstance(v, (bytes, bytearray)):
                raise PromptError(
                    f"{at}: column `{k}` holds bytes, which the outputs would carry as \"b'...'\". "
                    "Decode it to text in the input, or drop the column."
                )
            if k in OUTPUT_FIELDS:
                raise PromptError(
                    f"{at}: column `{k}` clashes with the output field of the same name. Rename it "
                    "in the input (every column but the prompt is carried into the outputs)."
                )
        for k in OVERRIDES:
            overrides[k].append(override_value(k, carried.get(k), at))
        members = "".join(
            f", {json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False, default=str)}"
            for k, v in carried.items()
        )
        any_extra = any_extra or bool(members)
        extras.append(members.encode("utf-8"))
    overrides = {k: v for k, v in overrides.items() if any(x is not None for x in v)}
    scored = completions if any(c is not None for c in completions) else None
    return PromptRecords(texts, messages, extras if any_extra else None, overrides, scored)


def override_value(column: str, value: Any, at: str) -> Any:
    """A row's override, checked against its range and converted (None where the row leaves it unset)."""
    if value is None:
        return None
    rule = broken_rule(column, value)
    if rule is not None:
        raise PromptError(f"{at}: `{column}` is {value!r}; it must be {rule}.")
    return float(value) if column in REAL_OVERRIDES else int(value)


def broken_rule(column: str, value: Any) -> str | None:
    """The rule of ``column`` that ``value`` breaks, or None when it is valid."""
    if column in REAL_OVERRIDES:
        valid, rule = REAL_OVERRIDES[column]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        valid, rule = INTEGER_OVERRIDES[column]
        # Parquet and datasets hand integer columns with gaps over as floats (3.0)
        integral = isinstance(value, float) and math.isfinite(value) and value.is_integer()
        number = (isinstance(value, int) or integral) and not isinstance(value, bool)
    return None if number and valid(value) else rule


def _check_messages(chat: Any, at: str) -> None:
    if not isinstance(chat, list) or not chat:
        raise PromptError(f'{at} must be a non-empty list of {{"role": ..., "content": ...}} objects.')
    for j, m in enumerate(chat):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptError(f"{at}[{j}] must be an object with string `role` and `content`; it is {m!r:.80}.")
        _check_encodable(m["content"], f"{at}[{j}].content")


def _check_encodable(text: str, at: str) -> None:
    """JSON can carry a lone UTF-16 surrogate (``"\\ud800"``) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(
            f"{at} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
            "which is not text. Fix the input."
        ) from None


def _file_rows(path: str):
    """Rows of a prompts file and how to name row ``i`` in errors."""
    kind, fs, fs_path = file_kind(path)
    size = fs.info(fs_path).get("size") or 0
    if size > MAX_PROMPTS_FILE_BYTES:
        raise PromptError(
            f"`prompts_file` {path} is {size:,} bytes, over the {MAX_PROMPTS_FILE_BYTES:,} "
            "read at once. Split it, or use Parquet or a dataset."
        )
    if kind == ".parquet":
        return _parquet_rows(path), lambda i: f" row {i}"
    try:
        with fs.open(fs_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PromptError(f"`prompts_file` cannot be read: {path} ({e})") from None
    return line_rows(raw, path, kind, 0)


def file_kind(path: str):
    """The extension of a prompts file that exists and is a file, its filesystem and its path there."""
    kind = next((ext for ext in (".txt", ".jsonl", ".parquet") if path.endswith(ext)), None)
    if kind is None:
        raise PromptError(
            f"`prompts_file` {path} must end in .txt (one prompt per line), .jsonl (one JSON object "
            "per line) or .parquet; for a Hugging Face dataset set `prompts_dataset`."
        )
    try:
        fs, fs_path = fsspec.core.url_to_fs(path)
        info = fs.info(fs_path)
    except FileNotFoundError:
        raise PromptError(f"`prompts_file` not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - a bucket without credentials raises its client's own types
        raise PromptError(f"`prompts_file` cannot be read: {path} ({first_line(e)})") from None
    if info.get("type") != "file":
        raise PromptError(f"`prompts_file` cannot be read: {path} is a {info.get('type')}, not a file.")
    return kind, fs, fs_path


def line_rows(raw: bytes, path: str, kind: str, first: int):
    """Rows of the ``.txt``/``.jsonl`` lines in ``raw``, the first of them line ``first`` of ``path`` (0-based),
    and how to name row ``i`` of them in errors (by its line in the whole file)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first + raw[: e.start].count(b"\n") + 1
        raise PromptError(f"`prompts_file` {path} is not UTF-8 (line {line}).") from None
    # lines end at "\n" only: str.splitlines would also split a prompt at U+2028, a form feed or a lone "\r"
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.removesuffix("\r") for line in lines]
    for number, line in enumerate(lines, start=first + 1):
        if line.strip() == "":
            raise PromptError(
                f"`prompts_file` {path} line {number} is blank. Every line is one prompt (its "
                "global_prompt_index is its line number - 1): remove the blank line."
            )

    def where(i: int) -> str:
        return f" line {first + i + 1}"

    if kind == ".txt":
        return ({"prompt": line} for line in lines), where
    return (_json_line(path, number, line) for number, line in enumerate(lines, start=first + 1)), where


def _json_line(path: str, number: int, line: str) -> Any:
    try:
        return json.loads(line, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise PromptError(f"`prompts_file` {path} line {number}: malformed JSON ({e.msg}).") from None
    except KeyError as e:
        raise PromptError(
            f"`prompts_file` {path} line {number}: the key {e.args[0]!r} appears twice; JSON would keep "
            "the last. Keep one."
        ) from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = {}
    for key, value in pairs:
        if key in row:
            raise KeyError(key)
        row[key] = value
    return row


def open_parquet(path: str):
    """``path`` as a ``pyarrow.parquet.ParquetFile``; a file that is not Parquet is a :class:`PromptError`."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(fsspec.open(path, "rb").open())
    except Exception as e:  # pyarrow raises its own error types for files that are not Parquet
        raise PromptError(f"`prompts_file` {path} is not a readable Parquet file ({e}).") from None


def _parquet_rows(path: str, start: int = 0, end: int | None = None):
    """Rows [``start``, ``end``) of a Parquet file, reading only the row groups that hold them, 4,096 at a time."""
    parquet = open_parquet(path)
    groups, first, position = [], 0, None
    for g in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(g).num_rows
        if first + rows > start and (end is None or first < end):
            position = first if position is None else position  # the global row of the first group's first row
            groups.append(g)
        first += rows
    end = first if end is None else end
    for batch in parquet.iter_batches(batch_size=4096, row_groups=groups) if groups else ():
        lo, hi = max(start, position) - position, min(end, position + len(batch)) - position
        position += len(batch)
        if lo < hi:
            yield from batch.slice(lo, hi - lo).to_pylist()


def saved_dataset(name: str, split: str):
    """A dataset directory written by ``save_to_disk`` (memory-mapped, its ``split``), or None for anything else."""
    import datasets

    saved = ("state.json", "dataset_dict.json")  # what save_to_disk writes for a Dataset / a DatasetDict
    if not (os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in saved)):
        return None
    try:
        loaded = datasets.load_from_disk(name)
    except Exception as e:  # datasets raises many types for an unreadable directory
        raise PromptError(f"`prompts_dataset` {name} (split {split!r}) does not load: {e}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise PromptError(f"`prompts_dataset` {name} has no split {split!r}. Set prompts_split.")
        return loaded[split]
    if str(loaded.split or "train") != split:  # one saved split: another asked for is not silently it
        raise PromptError(f"`prompts_dataset` {name} has no split {split!r}. Set prompts_split.")
    return loaded


def _dataset_rows(name: str, split: str):
    """Rows of a Hugging Face dataset: a directory written by ``save_to_disk``, a directory of data files, or a hub
    id (which needs the network)."""
    import datasets

    loaded = saved_dataset(name, split)
    if loaded is None:
        try:
            loaded = datasets.load_dataset(name, split=split)
        except KeyError:
            raise PromptError(f"`prompts_dataset` {name} has no split {split!r}. Set prompts_split.") from None
        except Exception as e:  # datasets raises many types for a missing or unreadable dataset
            raise PromptError(f"`prompts_dataset` {name} (split {split!r}) does not load: {e}") from None
    yield from loaded
