"""Loading the tokenizer and the model onto the devices of this host's replica.

Covers the replica's mesh (its hosts' devices: this host's own when ``hosts_per_replica`` is 1, else JAX's
multi-process mesh over the group's; model-parallel over ``trainer.model_axis_size`` of them) and loading an HF
checkpoint (Levanter's converter) or a Levanter checkpoint straight onto it, each host reading the shards its
devices hold. Leaves out engine construction (:mod:`levanter_multihost.generation`).
"""

import contextlib
import json
import logging
import os

import equinox as eqx
import fsspec
import haliax as hax
import jax
import numpy as np
from haliax import Axis
from haliax.partitioning import ResourceAxis, round_axis_for_partitioning
from jax.sharding import Mesh
from levanter.checkpoint import load_checkpoint
from levanter.compat.hf_checkpoints import HFCheckpointConverter
from levanter.models.llama import LlamaConfig
from levanter.models.lm_model import LmConfig, LmHeadModel
from levanter.models.qwen import Qwen3Config
from levanter.trainer import TrainerConfig

from levanter_multihost.errors import ConfigError
from levanter_multihost.replicas import Replicas
from levanter_multihost.runplan import ModelSource

logger = logging.getLogger(__name__)


def mesh_over(devices: list, trainer: TrainerConfig) -> Mesh:
    """A (replica, data, model) mesh of ``devices`` (host by host, in order): ``model_axis_size`` consecutive
    devices per model shard, so a model axis no wider than a host stays within the host."""
    model = trainer.model_axis_size
    if len(devices) % model != 0:
        raise ValueError(
            f"trainer.model_axis_size ({model}) does not divide the replica's {len(devices)} devices. "
            f"Set it to a divisor of {len(devices)}."
        )
    grid = np.array(devices).reshape(1, len(devices) // model, model)
    return Mesh(grid, (ResourceAxis.REPLICA, ResourceAxis.DATA, ResourceAxis.MODEL))


def replica_devices(replicas: Replicas, replica: int) -> list:
    """Every device of ``replica``'s hosts (other processes' too: JAX's multi-process mesh), host by host."""
    hosts = replicas.hosts_of(replica)
    return sorted((d for d in jax.devices() if d.process_index in hosts), key=lambda d: (d.process_index, d.id))


@contextlib.contextmanager
def on_mesh(trainer: TrainerConfig, devices: list):
    """Make the mesh of ``devices`` and the trainer's compute axis mapping current."""
    with hax.partitioning.set_mesh(mesh_over(devices, trainer)), hax.axis_mapping(trainer.compute_axis_mapping):
        yield


def on_local_mesh(trainer: TrainerConfig):
    """:func:`on_mesh` of this host's devices only."""
    return on_mesh(trainer, jax.local_devices())


def resolve_location(name: str, field: str) -> str:
    """A checkpoint or tokenizer location: an existing local directory as an absolute path (a relative one such
    as ``assets/tiny-addition`` also reads as a hub repo id), a URL or hub id unchanged.

    A name that looks local but is missing fails here, naming ``field``, instead of sending Hugging Face to the
    network: it starts with ``/``, ``.`` or ``~``, or its parent directory exists here.
    """
    if os.path.isdir(name):
        return os.path.abspath(name)
    if "://" in name:
        return name
    parent = os.path.dirname(name.rstrip("/"))
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or (parent and os.path.isdir(parent)):
        raise ConfigError(
            f"{field} ({name}) is not a directory here. Give the path of a local checkpoint, an fsspec "
            "URL, or a Hugging Face hub id (org/name)."
        )
    return name


def model_vocab_size(hf_checkpoint: str | None) -> int | None:
    """The model's vocabulary size from the HF checkpoint's config.json (a local directory), without weights."""
    path = None if hf_checkpoint is None else os.path.join(hf_checkpoint, "config.json")
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return int(json.load(f)["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:  # not JSON, no vocab_size, or not a number
        raise ConfigError(
            f"{path} has no readable vocab_size ({type(e).__name__}: {e}). Fix the checkpoint's config.json."
        ) from None


ARCHITECTURES: dict[str, type[LmConfig]] = {"llama": LlamaConfig, "qwen3": Qwen3Config}
"""Hugging Face ``model_type`` -> Levanter config: what the pinned Levanter both converts from a checkpoint and
decodes in its ``InferenceEngine``. It converts Mistral, Qwen2, Gemma and OLMo too, but their models have no paged
decode (``decode`` / ``initial_cache``)."""


def architecture(hf_config: dict | None, given: LmConfig, where: str) -> LmConfig:
    """The model config a checkpoint's ``config.json`` (``hf_config``) describes; ``given`` (the config's
    ``model``) where no config.json is readable. ``where`` names the checkpoint in errors."""
    if hf_config is None:
        return given
    model_type = hf_config.get("model_type", "llama")  # the planner's known shapes are Llama's and name none
    if model_type not in ARCHITECTURES:
        named = f"{model_type!r} ({', '.join(hf_config.get('architectures') or [])})".replace(" ()", "")
        raise ConfigError(
            f"{where} is a {named} model; this sampler runs {' and '.join(ARCHITECTURES)} "
            "checkpoints (what the pinned Levanter's inference engine decodes). Use one of those."
        )
    cls = ARCHITECTURES[model_type]
    if type(given) not in (LlamaConfig, cls):  # Llama is the default, so only another explicit type contradicts
        given_name = LmConfig.get_choice_name(type(given))
        raise ConfigError(
            f"model is {given_name!r} but {where} is a {model_type!r} model. Leave `model` unset with "
            "hf_checkpoint: its architecture comes from the checkpoint's config.json."
        )
    import transformers

    settings = {k: v for k, v in hf_config.items() if k != "model_type"}
    return cls.from_hf_config(transformers.CONFIG_MAPPING[model_type](**settings))


def encoded(model: LmConfig) -> dict:
    """``model`` as the tracker logs it: its registered type, then its fields."""
    import draccus

    return {"type": LmConfig.get_choice_name(type(model)), **draccus.encode(model)}


def checkpoint_config(ref) -> dict:
    """The ``config.json`` of an HF checkpoint: from its directory or fsspec URL, else from the hub (as its weights
    will be)."""
    name = ref.model_name_or_path
    if os.path.isdir(name) or "://" in name:
        with fsspec.open(f"{name.rstrip('/')}/config.json") as f:
            return json.load(f)
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(name, "config.json", revision=ref.revision)) as f:
        return json.load(f)


def load_model(source: ModelSource, tokenizer) -> LmHeadModel:
    """Load the model onto the current mesh, in the trainer's compute dtype. Call inside :func:`on_mesh`."""
    trainer = source.trainer
    mapping = trainer.compute_axis_mapping
    dtype = trainer.mp.compute_dtype
    if source.hf_checkpoint is not None:
        ref = source.hf_checkpoint
        # the plan knew the architecture only where config.json was readable before load (not a URL, nor a hub
        # id outside the cache): read it now, so no checkpoint ever loads as another architecture
        model_config = architecture(checkpoint_config(ref), source.model, f"hf_checkpoint {ref.model_name_or_path}")
        # name the checkpoint up front: the converter's default reference is a hub model it would try to fetch
        converter: HFCheckpointConverter = model_config.hf_checkpoint_converter(ref_checkpoint=ref.model_name_or_path)
        converter = converter.replaced(reference_checkpoint=ref, tokenizer=tokenizer)
        model = converter.load_pretrained(model_config.model_type, ref=ref, axis_mapping=mapping, dtype=dtype)
    else:
        vocab = round_axis_for_partitioning(Axis("vocab", len(tokenizer)), mapping)
        shape = eqx.filter_eval_shape(source.model.build, vocab, key=jax.random.PRNGKey(0))
        model = load_checkpoint(shape, source.checkpoint_path, subpath="model", axis_mapping=mapping)
        model = trainer.mp.cast_to_compute(model)
    return model
