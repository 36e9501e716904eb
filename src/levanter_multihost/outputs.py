"""Rows, shard files and the merged output.

Covers the row schema, the per-host file ``host_{i:04d}_of_{n:04d}.jsonl``, the completeness check (every
expected (prompt, generation) pair exactly once) and the merged ``merged.jsonl`` sorted by
(``global_prompt_index``, ``generation_index``). Every file is written under a temporary name and renamed, on a
local path or any fsspec URL. Leaves out how rows travel between hosts (:mod:`levanter_multihost.gather`).
No JAX import.
"""

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec

MERGED_NAME = "merged.jsonl"
SUMMARY_NAME = "summary.json"
TIMELINE_NAME = "timeline.png"
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
)


class MergeError(RuntimeError):
    """Rows missing or duplicated; the message names them."""


def shard_name(host: int, num_hosts: int) -> str:
    return f"host_{host:04d}_of_{num_hosts:04d}.jsonl"


def join(output_dir: str, name: str) -> str:
    return output_dir.rstrip("/") + "/" + name


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary sibling of ``path``, then rename it into place."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    parent = os.path.dirname(fs_path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{fs_path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, fs_path)


def jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with fsspec.open(path, "rb") as f:
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def exists(path: str) -> bool:
    fs, fs_path = fsspec.core.url_to_fs(path)
    return fs.exists(fs_path)


def expected_pairs(num_prompts: int, n_generations: int) -> set[tuple[int, int]]:
    return {(p, g) for p in range(num_prompts) for g in range(n_generations)}


def merge_rows(rows: Sequence[dict[str, Any]], num_prompts: int, n_generations: int) -> list[dict[str, Any]]:
    """Check every expected (prompt, generation) pair is present exactly once and return rows in order."""
    counts = Counter((r["global_prompt_index"], r["generation_index"]) for r in rows)
    expected = expected_pairs(num_prompts, n_generations)
    missing = sorted(expected - counts.keys())
    duplicated = sorted(k for k, c in counts.items() if c > 1)
    unexpected = sorted(counts.keys() - expected)
    if missing or duplicated or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (prompt, generation) pairs, first {missing[:10]}")
        if duplicated:
            parts.append(f"{len(duplicated)} duplicated, first {duplicated[:10]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, first {unexpected[:10]}")
        raise MergeError("Cannot merge: " + "; ".join(parts) + ".")
    return sorted(rows, key=lambda r: (r["global_prompt_index"], r["generation_index"]))


def write_shard(output_dir: str, host: int, num_hosts: int, rows: Sequence[dict[str, Any]]) -> str:
    """Write this host's rows (sorted) to its shard file; return the path."""
    path = join(output_dir, shard_name(host, num_hosts))
    write_atomic(path, jsonl_bytes(rows))
    return path
