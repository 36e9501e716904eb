"""What a run's fingerprint holds beyond the config's own values: locations spelled one way, and a checkpoint's
content. No JAX import.

A resume refuses outputs written under another fingerprint, and the leader refuses a host whose fingerprint is
not its own (:meth:`~levanter_multihost.coordination.Coordinator.agree`), so both must change when the rows would
and stay put when they would not: ``./assets/x`` is ``assets/x``, a copy of a checkpoint elsewhere (every TPU
worker downloads its own) is the same checkpoint, new weights written over the old path are not.
"""

import hashlib
import json
import os
import posixpath
from typing import TYPE_CHECKING

import fsspec

from levanter_multihost.errors import ConfigError, first_line
from levanter_multihost.runplan import PromptSet

if TYPE_CHECKING:
    from levanter_multihost.config import SampleLmMultihostConfig
    from levanter_multihost.host_input import LineIndex, TableIndex

HEAD_BYTES = 64 * 1024
"""Bytes read from the start of each sampled file (a safetensors header, a small config whole)."""
SAMPLE_BLOCKS = 16
"""Blocks read at evenly spread offsets of each sampled file, so other weights of the same shapes show."""
SAMPLE_BLOCK_BYTES = 4096
SAMPLED_FILES = 8
"""Largest files of a checkpoint whose content is sampled (every file's name and size count)."""


def canonical_location(name: str | None) -> str | None:
    """``name`` spelled one way: a local path normalized (``./a//b/`` is ``a/b``), a URL without trailing slashes;
    relative paths stay relative, so the same checkout elsewhere has the same fingerprint."""
    if name is None:
        return None
    if "://" in name:
        protocol, rest = name.split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest)}" if rest else name
    return os.path.normpath(os.path.expanduser(name))


def checkpoint_digest(location: str | None) -> str | None:
    """A digest of the checkpoint directory ``location`` (local or fsspec URL): every file's relative name and
    size, ``config.json`` and the largest files sampled (their first bytes and blocks spread over them). None
    where ``location`` is not a directory here (a hub id, which its name and revision identify)."""
    if location is None:
        return None
    try:
        fs, root = fsspec.core.url_to_fs(location)
        if not fs.isdir(root):
            return None
        root = root.rstrip("/")
        files = {path: info for path, info in fs.find(root, detail=True).items() if not _ignored(path, root)}
    except Exception as e:  # noqa: BLE001 - a bucket without credentials raises its client's own types
        raise ConfigError(
            f"The checkpoint {location} cannot be listed: {first_line(e)}. Check the path and, for a "
            "bucket, the credentials here."
        ) from None
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path[len(root) + 1 :]}\0{files[path].get('size')}\n".encode())
    largest = sorted(files, key=lambda p: (-(files[p].get("size") or 0), p))[:SAMPLED_FILES]
    configs = [p for p in files if p.endswith("config.json")]
    for path in sorted(set(largest) | set(configs)):
        size = files[path].get("size") or 0
        with fs.open(path, "rb") as f:
            digest.update(f.read(HEAD_BYTES))
            if size > HEAD_BYTES:
                for i in range(SAMPLE_BLOCKS):
                    f.seek(HEAD_BYTES + (size - HEAD_BYTES - SAMPLE_BLOCK_BYTES) * i // max(SAMPLE_BLOCKS - 1, 1))
                    digest.update(f.read(SAMPLE_BLOCK_BYTES))
    return digest.hexdigest()[:16]


def run_identity(config: "SampleLmMultihostConfig", checkpoint: str | None) -> dict:
    """The fingerprint's model and engine part: locations spelled one way, the checkpoint's content, and every
    setting besides sampling that changes a row or the output's schema."""
    if config.hf_checkpoint is not None:
        revision = config.hf_checkpoint.revision
        model = canonical_location(config.hf_checkpoint.model_name_or_path) + (f"@{revision}" if revision else "")
    else:
        model = canonical_location(config.checkpoint_path)
    return {
        "model": model,
        "checkpoint_digest": checkpoint_digest(checkpoint or config.checkpoint_path),
        "tokenizer": canonical_location(config.tokenizer),  # null: the checkpoint's, in its digest
        "compute_dtype": str(config.engine.compute_dtype),
        "model_axis_size": config.trainer.model_axis_size,
        "output_format": config.output_format,
    }


def prompts_digest(prompts: PromptSet, seed: int) -> str:
    """A digest of every prompt's text, tokens, per-prompt values and carried columns (``seed``: the config's)."""
    digest = hashlib.sha256(json.dumps(prompts.texts).encode("utf-8"))
    for column in (prompts.tokens.flat, prompts.max_new_tokens, prompts.temperature, prompts.n_generations):
        digest.update(column.tobytes())
    controls = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed}
    for name, default in controls.items():  # only when set: the fingerprints of runs without them stay as they were
        if (getattr(prompts, name) != default).any():
            digest.update(name.encode() + getattr(prompts, name).tobytes())
    for extra in prompts.extra_json or ():
        digest.update(extra + b"\n")
    return digest.hexdigest()


def fields(config: "SampleLmMultihostConfig", prompts_sha256: str, num_prompts: int, checkpoint: str | None) -> dict:
    """What identifies a run's outputs: a resume refuses a directory, the leader a host, with other values."""
    controls = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": config.seed}
    return {
        **run_identity(config, checkpoint),
        "precision": str(config.trainer.mp),
        "prompts_sha256": prompts_sha256,
        "num_prompts": num_prompts,
        "seed": config.seed,
        "temperature": config.temperature,
        "max_new_tokens": config.max_new_tokens,
        "n_generations": config.n_generations,
        "stop_sequences": list(config.stop_sequences),
        "stop_at_eos": config.stop_at_eos,
        "include_stop_in_text": config.include_stop_in_text,
        "logprobs": config.logprobs,
        **({"prompt_logprobs": True} if config.prompt_logprobs else {}),  # absent: older fingerprints stay valid
        **{name: getattr(config, name) for name, default in controls.items() if getattr(config, name) != default},
    }


def per_host_digest(config: "SampleLmMultihostConfig", index: "LineIndex | TableIndex") -> str:
    """A digest of prompts read per host (:mod:`.host_input`): their bytes and every setting that turns their rows
    into prompts and tokens (the tokenizer is in :func:`run_identity`)."""
    settings = {
        "file_sha256": index.sha256,
        "prompt_field": config.prompt_field,
        "messages_field": config.messages_field,
        "chat_template": config.chat_template,
        "add_bos": config.add_bos,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def _ignored(path: str, root: str) -> bool:
    """A file that does not make the model: hidden or under a hidden directory (``.cache/huggingface`` download
    metadata, which differs between copies), or a model card."""
    name = path[len(root) + 1 :]
    return name.endswith(".md") or any(part.startswith(".") for part in name.split("/"))
