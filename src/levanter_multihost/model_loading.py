"""Loading the tokenizer and the model onto this host's own devices.

Covers the local mesh (``jax.local_devices()`` only, model-parallel across the host's chips as
``trainer.model_axis_size`` says) and loading an HF checkpoint (Levanter's converter) or a Levanter checkpoint
straight onto it, so nothing crosses hosts. Leaves out engine construction (:mod:`levanter_multihost.generation`).
"""

import contextlib
import logging
import os

import equinox as eqx
import haliax as hax
import jax
import numpy as np
from haliax import Axis
from haliax.partitioning import ResourceAxis, round_axis_for_partitioning
from jax.sharding import Mesh
from levanter.checkpoint import load_checkpoint
from levanter.compat.hf_checkpoints import HFCheckpointConverter, RepoRef, load_tokenizer
from levanter.models.lm_model import LmHeadModel
from levanter.trainer import TrainerConfig

logger = logging.getLogger(__name__)


def local_mesh(trainer: TrainerConfig) -> Mesh:
    """A (replica, data, model) mesh of this host's devices only: ``model_axis_size`` chips per model replica."""
    devices = jax.local_devices()
    model = trainer.model_axis_size
    if len(devices) % model != 0:
        raise ValueError(
            f"trainer.model_axis_size ({model}) does not divide this host's {len(devices)} devices. "
            f"Set it to a divisor of {len(devices)}."
        )
    grid = np.array(devices).reshape(1, len(devices) // model, model)
    return Mesh(grid, (ResourceAxis.REPLICA, ResourceAxis.DATA, ResourceAxis.MODEL))


@contextlib.contextmanager
def on_local_mesh(trainer: TrainerConfig):
    """Make this host's mesh and the trainer's compute axis mapping current."""
    with hax.partitioning.set_mesh(local_mesh(trainer)), hax.axis_mapping(trainer.compute_axis_mapping):
        yield


def local_or_hub(path: str) -> str:
    """An existing local directory as an absolute path: a relative one such as ``assets/tiny-addition`` also
    reads as a hub repo id, and Hugging Face would go looking for it on the network."""
    return os.path.abspath(path) if os.path.isdir(path) else path


def tokenizer_path(tokenizer: str | None, hf_checkpoint, checkpoint_path: str | None) -> str:
    """The tokenizer to load: ``tokenizer`` if set, else the HF checkpoint's own."""
    if tokenizer is not None:
        return local_or_hub(tokenizer)
    if hf_checkpoint is not None:
        return local_or_hub(hf_checkpoint.model_name_or_path)
    raise ValueError(
        f"`tokenizer` is not set and `checkpoint_path` ({checkpoint_path}) is a Levanter checkpoint, which holds "
        "no tokenizer. Set `tokenizer`."
    )


def load_tokenizer_from(path: str):
    return load_tokenizer(path)


def load_model(config, tokenizer) -> LmHeadModel:
    """Load the model onto the current (local) mesh, in the trainer's compute dtype. Call inside on_local_mesh."""
    trainer: TrainerConfig = config.trainer
    mapping = trainer.compute_axis_mapping
    dtype = trainer.mp.compute_dtype
    if config.hf_checkpoint is not None:
        ref = RepoRef(local_or_hub(config.hf_checkpoint.model_name_or_path), config.hf_checkpoint.revision)
        # name the checkpoint up front: the converter's default reference is a hub model it would try to fetch
        converter: HFCheckpointConverter = config.model.hf_checkpoint_converter(ref_checkpoint=ref.model_name_or_path)
        converter = converter.replaced(reference_checkpoint=ref, tokenizer=tokenizer)
        model = converter.load_pretrained(config.model.model_type, ref=ref, axis_mapping=mapping, dtype=dtype)
    else:
        vocab = round_axis_for_partitioning(Axis("vocab", len(tokenizer)), mapping)
        shape = eqx.filter_eval_shape(config.model.build, vocab, key=jax.random.PRNGKey(0))
        model = load_checkpoint(shape, config.checkpoint_path, subpath="model", axis_mapping=mapping)
        model = trainer.mp.cast_to_compute(model)
    return model
