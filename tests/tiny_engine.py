"""The tiny addition model on one CPU device, as the in-process engine tests load it (float32, no sharding)."""

from contextlib import contextmanager
from pathlib import Path

import haliax as hax
import jax
import jmp
import numpy as np
from haliax.partitioning import ResourceAxis
from jax.sharding import Mesh
from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
from levanter.models.llama import LlamaConfig
from levanter.trainer import TrainerConfig

from levanter_multihost.model_loading import load_model
from levanter_multihost.runplan import ModelSource

TINY = Path(__file__).resolve().parents[1] / "assets" / "tiny-addition"
TRAINER = TrainerConfig(mp=jmp.get_policy("f32"), model_axis_size=1)


@contextmanager
def one_device():
    """A mesh of this process's first device, with the trainer's axis mapping."""
    mesh = Mesh(
        np.array(jax.local_devices()[:1]).reshape(1, 1, 1),
        (ResourceAxis.REPLICA, ResourceAxis.DATA, ResourceAxis.MODEL),
    )
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(TRAINER.compute_axis_mapping):
        yield


def load_tiny():
    """The tiny model and its character tokenizer, loaded as the sampler loads them."""
    tokenizer = load_tokenizer(str(TINY))
    with one_device():
        model = load_model(ModelSource(RepoRef(str(TINY)), None, LlamaConfig(), TRAINER), tokenizer)
    return model, tokenizer
