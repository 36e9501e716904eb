"""What this host still has to sample, given the outputs already in ``output_dir``.

Covers the run fingerprint (model, tokenizer, prompts, seed, temperature, max_new_tokens, stop, n_generations)
stored in ``output_dir/run.json``, refusing outputs of another run, reading rows of earlier shard files (written
by any number of hosts) and the (prompt, generation) pairs still missing from this host's shard. Leaves out
sampling and the gather. No JAX import.
"""

import glob as _glob
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import fsspec

from levanter_multihost import outputs

RUN_FILE = "run.json"
SHARD_PATTERN = re.compile(r"host_(\d{4})_of_(\d{4})\.jsonl$")


class ResumeError(ValueError):
    """Outputs in ``output_dir`` that belong to another run, or that cannot be resumed."""


def fingerprint_fields(config, prompts: Sequence[str], tokenizer_name: str) -> dict[str, Any]:
    model = str(config.hf_checkpoint) if config.hf_checkpoint is not None else str(config.checkpoint_path)
    return {
        "model": model,
        "tokenizer": tokenizer_name,
        "prompts_sha256": hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest(),
        "num_prompts": len(prompts),
        "seed": config.seed,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        "stop_sequence": config.stop_sequence,
        "n_generations": config.n_generations,
    }


def fingerprint(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def read_run_file(output_dir: str) -> dict[str, Any] | None:
    path = outputs.join(output_dir, RUN_FILE)
    if not outputs.exists(path):
        return None
    with fsspec.open(path, "r") as f:
        return json.load(f)


def earlier_outputs(output_dir: str) -> list[str]:
    """Shard files already in ``output_dir`` (from any host count), sorted."""
    fs, path = fsspec.core.url_to_fs(output_dir)
    if not fs.exists(path):
        return []
    names = fs.glob(f"{_glob.escape(path.rstrip('/'))}/host_*_of_*.jsonl")
    protocol = output_dir.split("://", 1)[0] + "://" if "://" in output_dir else ""
    return sorted(protocol + n for n in names if SHARD_PATTERN.search(n))


def check_earlier_run(config, fields: dict[str, Any]) -> None:
    """Refuse to mix outputs: earlier outputs must belong to this run (``resume``) or be replaced (``overwrite``)."""
    run = read_run_file(config.output_dir)
    shards = earlier_outputs(config.output_dir)
    if (run is None and not shards) or config.overwrite:
        return
    if not config.resume:
        raise ResumeError(
            f"output_dir ({config.output_dir}) holds outputs of an earlier run. Set resume: true to continue it, "
            "overwrite: true to replace it, or choose another output_dir."
        )
    if run is None:
        raise ResumeError(
            f"output_dir ({config.output_dir}) has shard files but no {RUN_FILE}, so they cannot be checked against "
            "this run. Use overwrite: true or another output_dir."
        )
    if run["fingerprint"] != fingerprint(fields):
        changed = sorted(k for k in fields if run["fields"].get(k) != fields[k])
        raise ResumeError(
            f"Cannot resume: output_dir ({config.output_dir}) holds a run with fingerprint {run['fingerprint']}, "
            f"this config has {fingerprint(fields)} (differs in {changed}). Outputs of different configs are never "
            "mixed: use another output_dir or overwrite: true."
        )


def run_file_bytes(fields: dict[str, Any]) -> bytes:
    return json.dumps({"fingerprint": fingerprint(fields), "fields": fields}, indent=2).encode("utf-8")


def existing_rows(output_dir: str, wanted: set[int]) -> dict[tuple[int, int], dict[str, Any]]:
    """Rows of earlier shard files whose prompt is in ``wanted``, keyed by (prompt, generation)."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for path in earlier_outputs(output_dir):
        for row in outputs.read_jsonl(path):
            if row["global_prompt_index"] in wanted:
                rows[(row["global_prompt_index"], row["generation_index"])] = row
    return rows


def missing_generations(
    shard: Sequence[int], n_generations: int, have: dict[tuple[int, int], Any]
) -> dict[int, tuple[int, ...]]:
    """For each prompt of ``shard``, the generations not in ``have`` (prompts with none missing are left out)."""
    out = {}
    for p in shard:
        gens = tuple(g for g in range(n_generations) if (p, g) not in have)
        if gens:
            out[p] = gens
    return out


def prepare_output_dir(config, fields: dict[str, Any], host: int, announcer) -> None:
    """Leader: refuse outputs of another run, clear an overwritten one and record this run's fingerprint, then
    tell the others the directory is ready (or why not).

    Other hosts wait for that, so none reads or writes a directory the leader is still checking or clearing.
    """
    if host != 0:
        announcer.wait_for("ready", config.gather_timeout_s)
        return
    check_earlier_run(config, fields)
    if config.overwrite:
        fs, path = fsspec.core.url_to_fs(config.output_dir)
        stale = [outputs.MERGED_NAME, outputs.SUMMARY_NAME, outputs.TIMELINE_NAME, RUN_FILE]
        for name in stale:
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                fs.rm(f"{path.rstrip('/')}/{name}")
        for shard in earlier_outputs(config.output_dir):
            fs.rm(fsspec.core.url_to_fs(shard)[1])
    outputs.write_atomic(outputs.join(config.output_dir, RUN_FILE), run_file_bytes(fields))
    announcer.publish("ready", True)
