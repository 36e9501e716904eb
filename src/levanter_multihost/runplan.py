"""The run plan: everything the stages need, resolved and checked once from the config before the model loads.

Frozen, typed values only. ``resolution.resolve`` builds a :class:`RunPlan`; ``main`` hands each stage the pieces it
needs, so no stage reads the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from levanter_multihost.capacity import EngineLimits
from levanter_multihost.replicas import Replicas
from levanter_multihost.rundir import RunDir

if TYPE_CHECKING:  # Levanter's types only for annotations: the coordination and merge code stays light to import
    from levanter.compat.hf_checkpoints import RepoRef
    from levanter.inference.engine import InferenceEngineConfig
    from levanter.models.lm_model import LmConfig
    from levanter.trainer import TrainerConfig

    from levanter_multihost.host_input import HostInput


class TokenTable:
    """Token ids of many prompts in one flat array (a Python list per prompt would cost ~40 bytes a token)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = flat
        """Every prompt's ids, one after the other (int32)."""
        self.offsets = offsets
        """Where each prompt's ids start in ``flat``, and the end (int64, one more than the prompts)."""

    @classmethod
    def of(cls, token_ids: Sequence[Sequence[int]]) -> TokenTable:
        lengths = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
        flat = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int32, count=int(lengths.sum()))
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]))

    @classmethod
    def concatenate(cls, tables: Sequence[TokenTable]) -> TokenTable:
        if not tables:
            return cls.of([])
        ends = np.cumsum([0] + [len(t.flat) for t in tables[:-1]])
        offsets = np.concatenate([[0]] + [t.offsets[1:] + end for t, end in zip(tables, ends)])
        return cls(np.concatenate([t.flat for t in tables]), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.flat[self.offsets[i] : self.offsets[i + 1]].tolist()

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True)
class PromptSet:
    """The run's prompts in global order, with what each one asks for."""

    texts: list[str]
    """Each prompt as written into its output rows (the rendered text of a chat prompt)."""
    tokens: TokenTable
    """Each prompt's token ids, exactly as the engine is given them."""
    max_new_tokens: np.ndarray
    """New tokens per sequence, per prompt (the config's value unless the row overrides it)."""
    temperature: np.ndarray
    """Sampling temperature per prompt; 0 is greedy."""
    n_generations: np.ndarray
    """Sequences sampled per prompt."""
    top_k: np.ndarray
    """Per prompt, sample from the k most likely tokens only (int32; 0 keeps every token)."""
    top_p: np.ndarray
    """Per prompt, sample from the fewest most likely tokens whose probability reaches p (float32; 1: all)."""
    min_p: np.ndarray
    """Per prompt, drop tokens less likely than min_p times the most likely one (float32; 0: none)."""
    seed: np.ndarray
    """Per prompt, the seed of its sampling keys (int64: the row's `seed`, else the config's)."""
    extra_json: list[bytes] | None = None
    """Per prompt, its carried input columns as JSON object members (``b', "id": 3'``), or None for none."""
    completions: TokenTable | None = None
    """Per prompt, the token ids of the `completion` it is scored on (:mod:`.scoring`); None when generating."""
    first: int = 0
    """Global index of the first prompt: 0 for the whole job's, the start of its share for one host's
    (:mod:`.host_input`); prompt ``first + i`` is entry ``i`` of every column."""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def total_sequences(self) -> int:
        return int(self.n_generations.sum())


@dataclass(frozen=True)
class StopCondition:
    """When a sequence stops before ``max_new_tokens``."""

    strings: tuple[str, ...] = ()
    """Stop strings, in config order."""
    token_ids: tuple[tuple[int, ...], ...] = ()
    """Token ids of each stop string, aligned with ``strings``."""
    eos_ids: tuple[int, ...] = ()
    """End-of-sequence token ids that stop a sequence (empty when ``stop_at_eos`` is false)."""
    include_stop_in_text: bool = False
    """Keep the stop string in ``generated_text`` (token ids end with the token that completes it)."""

    @property
    def sequences(self) -> tuple[tuple[int, ...], ...]:
        """Every stop sequence the engine watches for: the stop strings' tokens, then each EOS id alone."""
        return self.token_ids + tuple((e,) for e in self.eos_ids)


@dataclass(frozen=True)
class Sampling:
    """How every sequence is sampled (per-prompt values live in :class:`PromptSet`)."""

    seed: int
    """Seed of the per-sequence keys; a key depends only on this, the global prompt index and the generation."""
    stop: StopCondition
    """Stop strings and EOS."""
    logprobs: bool = False
    """Record the log-probability of every generated token."""
    prompt_logprobs: bool = False
    """Scoring rows: also record the log-probability of every prompt token after the first."""


@dataclass(frozen=True)
class EngineSettings:
    """The engine each host builds, and how its work is cut into batches."""

    config: InferenceEngineConfig
    """Levanter's engine config, as given."""
    limits: EngineLimits
    """The same numbers as the capacity planner sees them."""
    max_pages: int | None
    """``max_pages`` in effect (the planner's HBM estimate when unset, None when unknown)."""
    batch_size: int | None
    """The config's cap on sequences per batch; None lets the engine's limits decide."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from and how they are laid out on a host's chips."""

    hf_checkpoint: RepoRef | None
    """Hugging Face checkpoint (local path made absolute, fsspec URL or hub id), or None."""
    checkpoint_path: str | None
    """Levanter checkpoint, or None."""
    model: LmConfig
    """Architecture (read from the checkpoint's config for an HF checkpoint)."""
    trainer: TrainerConfig
    """The replica's mesh (``model_axis_size``), axis mapping and precision."""


@dataclass(frozen=True)
class Timeouts:
    """Every wait between hosts, one name per meaning (resolved before the plan: hosts need it to report any
    failure of resolving)."""

    heartbeat_interval_s: float
    """How often every host shows the others it is alive."""
    silent_host_s: float
    """A host (leader included) whose heartbeat has not moved for this long is dead or hung."""


@dataclass(frozen=True)
class Reporting:
    """What the leader reports and where."""

    tracker: Any
    """Levanter tracker config(s) (``trainer.tracker``)."""
    run_name: str
    """Name of the run in the tracker and the summary."""
    run_id: str | None
    """Tracker run id (``trainer.id``, or ``RUN_ID``), None to let the tracker choose."""
    config: dict
    """The resolved config, logged as the tracker run's config."""
    samples_table_rows: int
    """Rows of the samples table (the first ones of the merged output); 0 for none."""
    task: str | None
    """Task whose exact-answer checker scores the merged rows (``addition``), or None."""
    progress_interval_s: float
    """Seconds between each host's progress lines; 0 turns them off."""


@dataclass(frozen=True)
class RunPlan:
    """Everything resolved from the config before the model loads, the same on every host."""

    prompts: PromptSet | HostInput
    """Every prompt, or, for a large file, its lines, each host reading its share later (:mod:`.host_input`)."""
    sampling: Sampling
    engine: EngineSettings
    model: ModelSource
    tokenizer: Any
    """The loaded Hugging Face tokenizer."""
    run_dir: RunDir
    """Owner of ``output_dir``."""
    fingerprint: dict[str, Any]
    """What identifies the run's outputs: a resume accepts only rows written under the same fingerprint."""
    resume: bool
    """Keep the rows already in the run directory and sample only the missing ones."""
    overwrite: bool
    """Replace an earlier run's outputs (once this run's merge is written)."""
    shard_strategy: str
    """How prompts are split over replicas (:mod:`levanter_multihost.sharding`)."""
    replicas: Replicas
    """The job's hosts in replica groups: each runs one engine on one mesh over its hosts' chips."""
    reporting: Reporting
    output_format: str = "jsonl"
    """Format of the merged output: ``jsonl`` or ``parquet``."""
    merge: bool = True
    """Merge the parts into one file; False: the parts, indexed, are the output."""

    @property
    def merged_name(self) -> str:
        return f"merged.{self.output_format}"
