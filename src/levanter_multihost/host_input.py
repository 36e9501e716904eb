"""Per-host input: above a size, each host reads and tokenizes only its share of a prompts file or saved dataset.

Reading every prompt on every host costs each host the whole job's parsing and tokenizing. From
``per_host_input_min_bytes`` on, a ``.txt``/``.jsonl``/``.parquet`` prompts file or a dataset saved with
``save_to_disk`` is instead

1. scanned once by every host: a ``.txt``/``.jsonl`` file's line starts (:func:`scan`: streaming, no JSON parsing,
   no tokenizing, 8 bytes a prompt), a table's prompt columns' byte lengths (:func:`scan_table`: Arrow compute,
   no Python object per row), and a SHA-256 of the bytes;
2. cut into one contiguous range of rows per replica (:meth:`HostInput.share`), balanced by a cost the scan alone
   gives: a row's bytes (a bound on its tokens) plus the config's ``max_new_tokens``, times the config's
   ``n_generations`` less the generations earlier attempts left, so a resume spreads the missing work over every
   replica; every host cuts the same ranges from the same scan, so every prompt lands in exactly one share;
3. read by byte range (lines) or by row group (Parquet; a saved dataset is memory-mapped), parsed, checked and
   tokenized by its hosts only (:meth:`HostInput.read_share`).

A row's own ``max_new_tokens`` or ``n_generations`` is known to its host only: it changes the balance, never which
rows are sampled or what they hold. The leader's completeness check reads every row's ``n_generations`` in one
streaming pass when it merges (:attr:`HostInput.n_generations`; a table's one column). No JAX import.
"""

import functools
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from levanter_multihost.prompts import (
    PromptError,
    PromptRecords,
    file_kind,
    open_parquet,
    read_line_range,
    read_row_range,
    saved_dataset,
)
from levanter_multihost.runplan import PromptSet
from levanter_multihost.sharding import cost_ranges

SCAN_CHUNK_BYTES = 4 * 1024**2
"""Bytes the scan reads at a time: its memory stays flat in the file's size."""
SPELLS_A_KEY = (b"n_generations", b"completion", b"\\u")
"""A line whose row can set `n_generations` or a `completion` holds the key spelled out, or with ``\\u`` escapes."""


@dataclass(frozen=True)
class LineIndex:
    """Where each line of a prompts file starts, from one streaming pass over its bytes."""

    path: str
    offsets: np.ndarray
    """Byte offset of each line's start, and the file's end (int64, one more than the lines)."""
    sha256: str
    """SHA-256 of the file's bytes: two hosts given different files disagree on it."""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def row_bytes(self) -> np.ndarray:
        """Each line's bytes, its newline included."""
        return np.diff(self.offsets)

    def read(self, start: int, end: int, fields: tuple[str, str]) -> PromptRecords:
        """The prompts of lines [``start``, ``end``), read by their bytes."""
        return read_line_range(self.path, int(self.offsets[start]), int(self.offsets[end]), start, *fields)

    def generation_pass(self, generations: int) -> tuple[np.ndarray, dict[bool, int]]:
        """Every row's generations (its `n_generations`, else ``generations``) and the first row with and without a
        `completion`, streaming, parsing only the lines that can set either."""
        values = np.full(len(self), generations, dtype=np.int32)
        if self.path.endswith(".txt"):
            return values, {False: 0}
        scored: dict[bool, int] = {}
        _, fs, fs_path = file_kind(self.path)
        with fs.open(fs_path, "rb") as f:
            for i, line in enumerate(f):
                row = json.loads(line) if any(key in line for key in SPELLS_A_KEY) else {}
                if row.get("n_generations") is not None:
                    values[i] = int(row["n_generations"])
                scored.setdefault(row.get("completion") is not None, i)
        return values, scored


def scan(path: str) -> LineIndex:
    """Every line's start and the bytes' SHA-256, reading ``path`` a chunk at a time (lines end at ``\\n``)."""
    _, fs, fs_path = file_kind(path)
    digest = hashlib.sha256()
    starts = [np.zeros(1, dtype=np.int64)]
    size = 0
    with fs.open(fs_path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK_BYTES):
            digest.update(chunk)
            starts.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n")) + (size + 1))
            size += len(chunk)
    offsets = np.concatenate(starts)
    if offsets[-1] < size:  # a last line without a newline
        offsets = np.append(offsets, size)
    return LineIndex(path, offsets, digest.hexdigest())


@dataclass(frozen=True)
class TableIndex:
    """A Parquet file or a dataset saved with ``save_to_disk``, as every host knows it before reading its share:
    each row's prompt bytes, from its prompt columns alone."""

    path: str
    kind: str
    """``.parquet`` or ``dataset``."""
    split: str
    """A dataset's split (``prompts_split``)."""
    row_bytes: np.ndarray
    """Each row's text prompt bytes, or its chat's contents' bytes, + 1 (int64)."""
    sha256: str
    """SHA-256 of the data files' bytes (and the split): two hosts given different inputs disagree on it."""

    def __len__(self) -> int:
        return len(self.row_bytes)

    def read(self, start: int, end: int, fields: tuple[str, str]) -> PromptRecords:
        """The prompts of rows [``start``, ``end``): a Parquet file's row groups that hold them, a dataset's rows."""
        return read_row_range(self.kind, self.path, start, end, self.split, *fields)

    def generation_pass(self, generations: int) -> tuple[np.ndarray, dict[bool, int]]:
        """Every row's generations and the first row with and without a `completion`, from those two columns."""
        values, has = [], []
        for rows, columns in _column_batches(self.kind, self.path, self.split, ("n_generations", "completion")):
            given = columns.get("n_generations")
            batch = np.full(rows, generations, dtype=np.int32)
            if given is not None:
                batch = np.where(
                    pc.is_null(given).to_numpy(zero_copy_only=False), batch, given.fill_null(0).to_numpy()
                )
            values.append(batch.astype(np.int32))
            if "completion" in columns:
                has.append(pc.is_valid(columns["completion"]).to_numpy(zero_copy_only=False))
        if not has:
            return np.concatenate(values), {False: 0}
        scored = np.concatenate(has)
        return np.concatenate(values), {
            bool(v): int(np.argmax(scored == v)) for v in (True, False) if (scored == v).any()
        }


def scan_table(kind: str, path: str, split: str, fields: tuple[str, str]) -> TableIndex:
    """Each row's prompt bytes from the prompt and messages columns only (a Parquet row group at a time), and the
    data files' SHA-256."""
    sizes = []
    for rows, columns in _column_batches(kind, path, split, fields):
        sizes.append(np.ones(rows, dtype=np.int64))
        for column in columns.values():
            sizes[-1] += _text_bytes(column)
    digest = hashlib.sha256(split.encode() if kind == "dataset" else b"")
    for file in _data_files(kind, path, split):
        fs, fs_path = fsspec.core.url_to_fs(file)
        with fs.open(fs_path, "rb") as f:
            while chunk := f.read(SCAN_CHUNK_BYTES):
                digest.update(chunk)
    return TableIndex(path, kind, split, np.concatenate([np.zeros(0, np.int64), *sizes]), digest.hexdigest())


def _column_batches(kind: str, path: str, split: str, names: tuple[str, ...]):
    """(rows, the columns of ``names`` the input has) one Parquet row group at a time, so memory stays flat in the
    file's rows; a saved dataset's in one piece (memory-mapped)."""
    if kind == ".parquet":
        parquet = open_parquet(path)
        present = [n for n in names if n in parquet.schema_arrow.names]
        for g in range(parquet.metadata.num_row_groups):
            group = parquet.read_row_group(g, columns=present)
            yield parquet.metadata.row_group(g).num_rows, {n: group.column(n) for n in present}
        return
    table = saved_dataset(path, split).data
    yield table.num_rows, {n: table.column(n) for n in names if n in table.column_names}


def _data_files(kind: str, path: str, split: str) -> list[str]:
    if kind == ".parquet":
        return [path]
    return sorted(f["filename"] for f in saved_dataset(path, split).cache_files)


def _text_bytes(column: "pa.ChunkedArray") -> np.ndarray:
    """Each row's UTF-8 bytes of a string column, or of the ``content`` strings of a chat column (0 where null)."""
    column = column.combine_chunks()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        flat, parents = pc.list_flatten(column), pc.list_parent_indices(column).to_numpy()
        if pa.types.is_struct(flat.type) and flat.type.get_field_index("content") >= 0:
            content = pc.binary_length(flat.field("content")).fill_null(0).to_numpy(zero_copy_only=False)
            return np.bincount(parents, weights=content, minlength=len(column)).astype(np.int64)
    return np.zeros(len(column), dtype=np.int64)  # a column of another type fails the row's check when read


@dataclass(frozen=True)
class HostInput:
    """The prompts of a large file, as every host knows them before reading its share: their count and lines."""

    index: "LineIndex | TableIndex"
    max_new_tokens: int
    """The config's ``max_new_tokens`` (rows may set their own)."""
    generations: int
    """The config's ``n_generations`` (rows may set their own)."""
    strategy: str
    """``contiguous``: equal counts of prompts with work left; ``balanced``: equal estimated work."""
    read: Callable[[int, int], PromptSet]
    """Reads, checks and encodes the prompts [start, end)."""

    def __len__(self) -> int:
        return len(self.index)

    def share(self, host: int, num_hosts: int, earlier: set[tuple[int, int]]) -> range:
        """The prompts ``host`` answers for: it verifies their rows kept from earlier attempts and samples the rest.

        Cut by the generations still missing of each prompt (estimated with the config's ``n_generations``), so a
        fresh run's shares are balanced by work and a resume's by the work left.
        """
        kept = Counter(p for p, _ in earlier)
        missing = np.full(len(self), self.generations, dtype=np.int64)
        if kept:
            prompts = np.fromiter(kept.keys(), dtype=np.int64, count=len(kept))
            counts = np.fromiter(kept.values(), dtype=np.int64, count=len(kept))
            missing[prompts] = np.maximum(self.generations - counts, 0)
        return cost_ranges(share_costs(self.index, self.max_new_tokens, missing, self.strategy), num_hosts)[host]

    def read_share(self, share: range) -> PromptSet:
        return self.read(share.start, share.stop)

    @functools.cached_property
    def n_generations(self) -> np.ndarray:
        """Every prompt's generations: the row's `n_generations`, else the config's, in one pass (each host has
        checked the values of its own rows); it also checks what no host sees alone: a run scores every row (each
        has a `completion`) or none."""
        values, scored = self.index.generation_pass(self.generations)
        if len(scored) == 2:
            raise PromptError(
                f"Row {scored[False]} has no `completion`, but row {scored[True]} does: a run scores every row or "
                "none. Give every row a completion, or split the input."
            )
        return values


def share_costs(
    index: "LineIndex | TableIndex", max_new_tokens: int, missing: np.ndarray, strategy: str
) -> np.ndarray:
    """What the shares balance, per prompt, from the scan alone and the generations ``missing`` of each: under
    ``contiguous`` 1 for a prompt with work left, under ``balanced`` its estimated work."""
    if strategy == "contiguous":
        return (missing > 0).astype(np.int64)
    return (index.row_bytes + max_new_tokens) * missing


def per_host_index(
    prompts, file: str | None, dataset: str | None, split: str, prompt_field: str, messages_field: str, min_bytes
) -> "LineIndex | TableIndex | None":
    """The scan of the prompt source when it is read per host (a ``.txt``/``.jsonl``/``.parquet`` file or a
    ``save_to_disk`` dataset of ``min_bytes`` or more), else None: every host reads it whole (inline prompts, a
    dataset loaded by name, both a file and a dataset set: ``read_prompts`` names that mistake)."""
    if prompts is not None or min_bytes is None or (file is None) == (dataset is None):
        return None
    if file is not None:
        kind, fs, fs_path = file_kind(file)
        if (fs.info(fs_path).get("size") or 0) < min_bytes:
            return None
        index = scan(file) if kind != ".parquet" else scan_table(kind, file, split, (prompt_field, messages_field))
    else:
        loaded = saved_dataset(dataset, split)
        if loaded is None or sum(os.path.getsize(f["filename"]) for f in loaded.cache_files) < min_bytes:
            return None
        index = scan_table("dataset", dataset, split, (prompt_field, messages_field))
    if not len(index):
        raise PromptError("No prompts: the prompt source is empty.")
    return index
