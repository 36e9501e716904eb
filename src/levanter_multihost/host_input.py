"""Per-host input: above a size, each host reads and tokenizes only its share of a ``.txt``/``.jsonl`` prompts file.

Reading every prompt on every host costs each host the whole job's parsing and tokenizing. From
``per_host_input_min_bytes`` on, a prompts file is instead

1. scanned once by every host (:func:`scan`): where each line starts and a SHA-256 of the bytes, streaming, with no
   JSON parsing and no tokenizing (8 bytes a prompt);
2. cut into one contiguous range of lines per host (:meth:`HostInput.share`), balanced by a cost the scan alone
   gives: a line's bytes (a bound on its tokens) plus the config's ``max_new_tokens``, times the config's
   ``n_generations`` less the generations earlier attempts left, so a resume spreads the missing work over every
   host; every host cuts the same ranges from the same scan, so every prompt lands in exactly one share;
3. read by byte range, parsed, checked and tokenized by its host only (:meth:`HostInput.read_share`).

A row's own ``max_new_tokens`` or ``n_generations`` is known to its host only: it changes the balance, never which
rows are sampled or what they hold. The leader's completeness check reads every row's ``n_generations`` in one
streaming pass when it merges (:attr:`HostInput.n_generations`). No JAX import.
"""

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from levanter_multihost.prompts import PromptError, file_kind
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
    def line_bytes(self) -> np.ndarray:
        """Each line's bytes, its newline included."""
        return np.diff(self.offsets)


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
class HostInput:
    """The prompts of a large file, as every host knows them before reading its share: their count and lines."""

    index: LineIndex
    max_new_tokens: int
    """The config's ``max_new_tokens`` (rows may set their own)."""
    generations: int
    """The config's ``n_generations`` (rows may set their own)."""
    strategy: str
    """``contiguous``: equal counts of prompts with work left; ``balanced``: equal estimated work."""
    read: Callable[[int, int, int], PromptSet]
    """Reads, checks and encodes the lines in bytes [start, end), the first of them prompt ``first``."""

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
        offsets = self.index.offsets
        return self.read(int(offsets[share.start]), int(offsets[share.stop]), share.start)

    @functools.cached_property
    def n_generations(self) -> np.ndarray:
        """Every prompt's generations: the row's `n_generations`, else the config's. One streaming pass, parsing
        only the lines that can set it (each host has checked the values of its own rows); it also checks what no
        host sees alone: a run scores every row (each has a `completion`) or none."""
        values = np.full(len(self), self.generations, dtype=np.int32)
        if self.index.path.endswith(".txt"):
            return values
        scored = {}  # True / False: the first row with / without a completion
        _, fs, fs_path = file_kind(self.index.path)
        with fs.open(fs_path, "rb") as f:
            for i, line in enumerate(f):
                row = json.loads(line) if any(key in line for key in SPELLS_A_KEY) else {}
                if row.get("n_generations") is not None:
                    values[i] = int(row["n_generations"])
                scored.setdefault(row.get("completion") is not None, i)
        if len(scored) == 2:
            raise PromptError(
                f"Row {scored[False]} has no `completion`, but row {scored[True]} does: a run scores every row or "
                "none. Give every row a completion, or split the input."
            )
        return values


def share_costs(lines: LineIndex, max_new_tokens: int, missing: np.ndarray, strategy: str) -> np.ndarray:
    """What the shares balance, per prompt, from the scan alone and the generations ``missing`` of each: under
    ``contiguous`` 1 for a prompt with work left, under ``balanced`` its estimated work."""
    if strategy == "contiguous":
        return (missing > 0).astype(np.int64)
    return (lines.line_bytes + max_new_tokens) * missing


def per_host_lines(file: str | None, min_bytes: int | None) -> LineIndex | None:
    """The lines of ``file`` when it is read per host (a ``.txt`` or ``.jsonl`` file of ``min_bytes`` or more), else
    None: every host reads it whole."""
    if file is None or min_bytes is None or not file.endswith((".txt", ".jsonl")):
        return None
    _, fs, fs_path = file_kind(file)
    if (fs.info(fs_path).get("size") or 0) < min_bytes:
        return None
    index = scan(file)
    if not len(index):
        raise PromptError("No prompts: the prompt source is empty.")
    return index
