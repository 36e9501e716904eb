"""Resolve-time checks that need no model and no tokenizer: value limits the engine's types impose, locations
whose scheme no filesystem serves, the config file's YAML (syntax and repeated keys, by line), and the prompts'
carried columns. Each failure is one line naming the field, value, line or column and the fix. No JAX import.
"""

import json
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import fsspec
import yaml

from levanter_multihost.errors import ConfigError, first_line
from levanter_multihost.prompts import FLOAT32_MAX, INT32_MAX, PromptError, PromptRecords, broken_rule
from levanter_multihost.replicas import Replicas
from levanter_multihost.runplan import Timeouts
from levanter_multihost.sharding import STRATEGIES

if TYPE_CHECKING:
    from levanter_multihost.config import SampleLmMultihostConfig

TASKS = ("addition",)
"""The tasks whose answers the leader scores (``task``)."""
MIN_SILENT_HOST_S = 5.0
"""Below this a garbage-collection pause or a slow store call reads as a dead host."""
MIN_GATHER_CHUNK_BYTES = 512
"""Below this each key-value write carries more overhead than rows, and a gather takes hours."""

logger = logging.getLogger(__name__)


def check_limits(config: "SampleLmMultihostConfig") -> None:
    """Integers the engine holds in int32, temperatures in float32, a mesh of at least one chip, and every
    location's URL scheme."""
    for name in ("max_new_tokens", "n_generations", "batch_size", "samples_table_rows"):
        value = getattr(config, name)
        if isinstance(value, int) and value > INT32_MAX:
            raise ConfigError(
                f"{name} ({value}) is over {INT32_MAX} (2**31 - 1), the largest the engine's int32 counters hold."
            )
    t = config.temperature
    if isinstance(t, (int, float)) and math.isfinite(t) and abs(t) > FLOAT32_MAX:
        raise ConfigError(f"temperature ({t}) overflows float32 (at most {FLOAT32_MAX:.3g}): it would sample as inf.")
    axis = config.trainer.model_axis_size
    if not isinstance(axis, int) or isinstance(axis, bool) or axis < 1:
        raise ConfigError(
            f"trainer.model_axis_size ({axis}) must be an integer >= 1: the chips each model replica is sharded over."
        )
    checkpoint = config.hf_checkpoint.model_name_or_path if config.hf_checkpoint is not None else None
    for name, value in (
        ("output_dir", config.output_dir),
        ("prompts_file", config.prompts_file),
        ("prompts_dataset", config.prompts_dataset),
        ("hf_checkpoint", checkpoint),
        ("checkpoint_path", config.checkpoint_path),
        ("tokenizer", config.tokenizer),
    ):
        check_scheme(name, value)


def timeouts(config: "SampleLmMultihostConfig") -> Timeouts:
    """The waits between hosts; checked first, since every host needs them to report any other failure."""
    t = config.silent_host_timeout_s
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= MIN_SILENT_HOST_S):
        raise ConfigError(
            f"silent_host_timeout_s ({t}) must be a finite number of seconds >= {MIN_SILENT_HOST_S:g} "
            "(the v5p configs use 60)."
        )
    if not (isinstance(config.gather_chunk_bytes, int) and config.gather_chunk_bytes >= MIN_GATHER_CHUNK_BYTES):
        raise ConfigError(
            f"gather_chunk_bytes ({config.gather_chunk_bytes}) must be an integer >= "
            f"{MIN_GATHER_CHUNK_BYTES} (default {4 * 1024 * 1024})."
        )
    # several beats per timeout, so one late beat never reads as a dead host
    return Timeouts(heartbeat_interval_s=min(2.0, t / 4), silent_host_s=t)


def check_scheme(name: str, location: str | None) -> None:
    """A URL whose scheme fsspec serves, with its package installed."""
    if not isinstance(location, str) or "://" not in location:
        return
    protocol = location.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(
            f"{name} ({location}): no filesystem serves the URL scheme {protocol}://. Use a local "
            "path or a URL such as gs://bucket/path."
        ) from None
    except ImportError as e:
        raise ConfigError(
            f"{name} ({location}): {protocol}:// needs a package this environment lacks ({first_line(e)})."
        ) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with every mapping's keys checked for repeats (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"The config repeats the key {key!r} (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}); YAML would keep the last. Keep one."
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def check_yaml(path: str) -> None:
    """The config file parses as YAML, without repeated keys; the error names the file and line."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--config_path {path} cannot be read ({type(e).__name__}: {e}).") from None
    try:
        yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config_path {path}{where} is not valid YAML: {e.problem or e.context}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config_path {path} is not valid YAML: {e}.") from None


def check_carried_columns(records: PromptRecords, output_format: str) -> None:
    """Warn once when ``id`` values repeat; for Parquet output, refuse a carried column whose type varies between
    rows (Parquet holds one type per column: it would fail after all the sampling)."""
    if records.extra_json is None:
        return
    rows = [json.loads(b"{" + members[1:] + b"}") for members in records.extra_json]
    ids = Counter(json.dumps(row["id"], sort_keys=True) for row in rows if "id" in row)
    repeated = [value for value, count in ids.items() if count > 1]
    if repeated:
        logger.warning(
            "%d `id` values repeat across prompts (e.g. %s); rows are told apart by global_prompt_index.",
            len(repeated),
            repeated[0][:40],
        )
    if output_format != "parquet":
        return
    kinds: dict[str, Any] = {}
    for i, row in enumerate(rows):
        for column, value in row.items():
            try:
                kinds[column] = _unify(kinds.get(column), value)
            except TypeError as e:
                path, new, old = e.args
                raise PromptError(
                    f"Prompt {i}: carried column `{column}{path}` is a {new}, but a {old} in earlier "
                    "prompts: Parquet holds one type per column, and the merge would fail after all "
                    "the sampling. Make it one type, or set output_format: jsonl."
                ) from None


def _kind(kind: Any) -> str:
    return kind if isinstance(kind, str) else kind[0]


def _unify(kind: Any, value: Any, path: str = "") -> Any:
    """The JSON kind of ``value`` merged into ``kind`` (None: nothing seen yet); TypeError where they conflict."""
    if value is None:
        return kind
    if isinstance(value, bool):
        new = "boolean"
    elif isinstance(value, (int, float)):
        new = "number"
    elif isinstance(value, str):
        new = "string"
    elif isinstance(value, list):
        element = kind[1] if isinstance(kind, tuple) and kind[0] == "list" else None
        for item in value:
            element = _unify(element, item, f"{path}[]")
        new = ("list", element)
    else:
        fields = dict(kind[1]) if isinstance(kind, tuple) and kind[0] == "object" else {}
        for key, item in value.items():
            fields[key] = _unify(fields.get(key), item, f"{path}.{key}")
        new = ("object", fields)
    if kind is not None and _kind(kind) != _kind(new):
        raise TypeError(path, _kind(new), _kind(kind))
    return new


def check_values(config: "SampleLmMultihostConfig", num_hosts: int, local_devices: int) -> None:
    """Checks on the config's own values for a job of ``num_hosts`` hosts of ``local_devices`` devices: each names
    the field, the value and the fix."""
    check_limits(config)

    def number(name: str, low: float, *, integer: bool = False, strict: bool = True) -> None:
        value = getattr(config, name)
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (strict and value == low):
            raise ConfigError(
                f"{name} ({value}) must be {'an integer' if integer else 'a finite number'} "
                f"{'>' if strict else '>='} {low}."
            )

    number("max_new_tokens", 0, integer=True)
    number("n_generations", 0, integer=True)
    number("temperature", 0, strict=False)
    number("progress_interval_s", 0, strict=False)
    number("samples_table_rows", 0, integer=True, strict=False)
    if config.batch_size is not None:
        number("batch_size", 0, integer=True)
    if config.per_host_input_min_bytes is not None:
        number("per_host_input_min_bytes", 0, integer=True, strict=False)
    for name in ("seed", "top_k", "top_p", "min_p"):
        rule = broken_rule(name, getattr(config, name))
        if rule is not None:
            raise ConfigError(f"{name} ({getattr(config, name)}) must be {rule}.")
    if (config.hf_checkpoint is None) == (config.checkpoint_path is None):
        raise ConfigError("Set exactly one of `hf_checkpoint` and `checkpoint_path`.")
    for name, allowed in {"shard_strategy": STRATEGIES, "output_format": ("jsonl", "parquet")}.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name} ({getattr(config, name)!r}) must be one of {list(allowed)}.")
    if not config.merge and config.output_format != "jsonl":
        raise ConfigError(
            f"output_format ({config.output_format!r}) is the merged file's, but merge is false: the JSONL parts are "
            "the output. Set output_format: jsonl, or merge: true."
        )
    if config.task is not None and config.task not in TASKS:
        raise ConfigError(f"task ({config.task!r}) is not a known task. Use one of {list(TASKS)} or leave it unset.")
    if config.resume and config.overwrite:
        raise ConfigError("`resume` and `overwrite` are both true. Choose one.")
    k = Replicas.of(config.hosts_per_replica, num_hosts).hosts_per_replica
    axis, devices = config.trainer.model_axis_size, k * local_devices
    if devices % axis != 0:
        where = (
            f"this host's {devices} devices"
            if k == 1
            else f"a replica's {devices} devices ({k} hosts x {local_devices})"
        )
        raise ConfigError(
            f"trainer.model_axis_size ({axis}) does not divide {where}. Set it to a divisor of {devices}."
        )
