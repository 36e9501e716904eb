"""Output rows: their fields and encoding, and the streaming merge of sorted parts into one ordered output.

A row is one JSON line whose fields come in a fixed order (``ROW_FIELDS``, then the optional fields, then the
prompt's carried input columns), so every line starts with ``LINE_PREFIX`` and its (prompt, generation) can be
read without parsing JSON. Parts are sorted; :func:`merge_sorted` merges any number of them with a heap,
opening a part only when its first row comes up, and :class:`Completeness` checks on the way that every
expected (prompt, generation) pair is there exactly once. Memory stays flat in the number of rows. No JAX import.
"""

import heapq
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

ROW_FIELDS = (
    "global_prompt_index",
    "generation_index",
    "process_index",
    "prompt",
    "prompt_token_count",
    "generated_token_ids",
    "generated_text",
    "generated_token_count",
    "finish_reason",
    "stop_reason",
)
SCORE_FIELDS = (
    *ROW_FIELDS[:5],
    "completion_token_ids",
    "completion_token_count",
    "completion_logprobs",
    "completion_logprob",
    "is_greedy",
)
"""A scoring row's fields, in order, instead of ``ROW_FIELDS`` (:mod:`levanter_multihost.scoring`)."""
OPTIONAL_FIELDS = ("generated_logprobs",)
"""Written after ``ROW_FIELDS`` when the run asks for them (``logprobs``)."""
SCORE_OPTIONAL_FIELDS = ("prompt_logprobs",)
"""Written after ``SCORE_FIELDS`` when the run asks for them (``prompt_logprobs``)."""
OUTPUT_FIELDS = ROW_FIELDS + OPTIONAL_FIELDS + SCORE_FIELDS[5:] + SCORE_OPTIONAL_FIELDS
LINE_PREFIX = re.compile(
    rb'\{"global_prompt_index": (0|[1-9][0-9]*), "generation_index": (0|[1-9][0-9]*), "process_index": '
)
"""The start of every line :func:`row_line` writes; its groups are the line's (prompt, generation)."""

Key = tuple[int, int]


class MergeError(RuntimeError):
    """Rows missing, duplicated or unreadable; the message names them."""


def row_line(row: dict[str, Any], extra_json: bytes | None = None) -> bytes:
    """One JSON line: ``ROW_FIELDS`` (``SCORE_FIELDS`` for a scoring row) in order, then its optional fields
    present, then ``extra_json`` (carried input columns, already encoded as object members)."""
    required, optional = (
        (SCORE_FIELDS, SCORE_OPTIONAL_FIELDS) if "completion_token_ids" in row else (ROW_FIELDS, OPTIONAL_FIELDS)
    )
    fields = required + optional
    missing = [k for k in required if k not in row]
    unknown = sorted(set(row) - set(fields))
    if missing or unknown:
        raise ValueError(f"Row lacks fields {missing}, has unknown fields {unknown}; see outputs.OUTPUT_FIELDS.")
    ordered = {k: row[k] for k in fields if k in row}
    line = json.dumps(ordered, ensure_ascii=False).encode("utf-8")
    if extra_json:
        line = line[:-1] + extra_json + b"}"
    return line + b"\n"


def keyed_lines(data: bytes, where: str) -> list[tuple[Key, bytes]]:
    """Each line of a part (``where`` names it in errors) with its (prompt, generation), newline kept."""
    if not data:
        return []
    if not data.endswith(b"\n"):
        raise MergeError(f"{where}: does not end with a newline (truncated?); it cannot be merged.")
    return [_keyed(line, where, number) for number, line in enumerate(data.split(b"\n")[:-1], start=1)]


def read_keyed(stream: Iterable[bytes], where: str) -> Iterator[tuple[Key, bytes]]:
    """:func:`keyed_lines` one line at a time, from a file opened ``"rb"`` (which splits at newline bytes only), so
    a merge holds one line per open part instead of whole parts."""
    for number, line in enumerate(stream, start=1):
        if not line.endswith(b"\n"):
            raise MergeError(f"{where} line {number}: does not end with a newline (truncated?); it cannot be merged.")
        yield _keyed(line[:-1], where, number)


def _keyed(line: bytes, where: str, number: int) -> tuple[Key, bytes]:
    """``line`` (without its newline) with its key, newline put back; the row's JSON is not parsed."""
    match = LINE_PREFIX.match(line)
    if match is None or not line.endswith(b"}"):
        raise MergeError(
            f"{where} line {number}: {line[:80]!r} is not a row as outputs.row_line writes it (one JSON object "
            'per line starting {"global_prompt_index": P, "generation_index": G, "process_index": ...).'
        )
    return (int(match[1]), int(match[2])), line + b"\n"


@dataclass(frozen=True)
class SortedRun:
    """A sorted source of keyed lines (a part), opened only when the merge reaches its first key."""

    first: Key
    """Key of its first line."""
    open: Callable[[], Iterator[tuple[Key, bytes]]]
    """Yields its keyed lines in ascending order."""
    where: str = "a part"
    """Names the run in errors (``host 2's batch 5``)."""


def merge_sorted(runs: Sequence[SortedRun]) -> Iterator[tuple[Key, bytes]]:
    """All lines of ``runs`` in ascending key order; a run is opened when no line before its first is left.

    Raises :class:`MergeError` naming the run if one is not sorted or does not start at its declared first key
    (either would put a line out of order in the output).
    """
    pending = sorted(runs, key=lambda r: r.first)
    heap: list[tuple[Key, int, bytes, Iterator]] = []
    i = 0
    while heap or i < len(pending):
        # every run not yet opened starts after the smallest line in the heap, so it cannot come first
        while i < len(pending) and (not heap or pending[i].first <= heap[0][0]):
            run = pending[i]
            lines = run.open()
            first = next(lines, None)
            if first is not None:
                if first[0] != run.first:
                    raise MergeError(f"{run.where} starts at {first[0]}, not at {run.first} as declared.")
                heapq.heappush(heap, (first[0], i, first[1], lines))
            i += 1
        if not heap:  # the runs left were empty
            break
        key, index, line, lines = heapq.heappop(heap)
        yield key, line
        following = next(lines, None)
        if following is not None:
            if following[0] < key:
                raise MergeError(f"{pending[index].where} is not sorted: {following[0]} after {key}.")
            heapq.heappush(heap, (following[0], index, following[1], lines))


class Completeness:
    """Checks a sorted stream of keys against the expected pairs: every (prompt, g) with g < n_generations[prompt]."""

    def __init__(self, n_generations: Sequence[int]):
        self.n_generations = n_generations
        self.expected = self._expected()
        self.next: Key | None = next(self.expected, None)
        self.last: Key | None = None
        self.missing: list[Key] = []
        self.duplicated: list[Key] = []
        self.unexpected: list[Key] = []
        self.counts = {"missing": 0, "duplicated": 0, "unexpected": 0}

    def _expected(self) -> Iterator[Key]:
        for prompt, n in enumerate(self.n_generations):
            for g in range(int(n)):
                yield (prompt, g)

    def _note(self, kind: str, key: Key) -> None:
        self.counts[kind] += 1
        found = getattr(self, kind)
        if len(found) < 10:
            found.append(key)

    def see(self, key: Key) -> None:
        if key == self.last:
            self._note("duplicated", key)
            return
        while self.next is not None and self.next < key:
            self._note("missing", self.next)
            self.next = next(self.expected, None)
        if key == self.next:
            self.next = next(self.expected, None)
        else:
            self._note("unexpected", key)
        self.last = key

    def check(self) -> None:
        """Raise :class:`MergeError` naming what is missing, duplicated or unexpected."""
        while self.next is not None:
            self._note("missing", self.next)
            self.next = next(self.expected, None)
        if any(self.counts.values()):
            parts = [
                f"{self.counts[kind]} {kind} (prompt, generation) pairs, first {getattr(self, kind)}"
                for kind in ("missing", "duplicated", "unexpected")
                if self.counts[kind]
            ]
            raise MergeError("Cannot merge: " + "; ".join(parts) + ".")
