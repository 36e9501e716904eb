"""A few steps of scripts/train_tiny_addition.py: it trains, writes a Hugging Face checkpoint, and the checkpoint
loads with the tokenizer and with Levanter's converter. No network; the trained model's accuracy is checked
elsewhere (the sampler's tests), not here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a training run in a process of its own

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_training_smoke_run_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [
        sys.executable,
        "scripts/train_tiny_addition.py",
        "--config_path",
        "assets/tiny-addition/train.yaml",
        "--trainer.num_train_steps",
        "3",
        "--trainer.train_batch_size",
        "8",
        "--trainer.log_dir",
        str(tmp_path / "logs"),
        "--eval_every",
        "2",
        "--eval_examples",
        "16",
        "--engine_prompts",
        "0",
        "--output_dir",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # imported while the training runs: the imports take about as long as the run itself
    import haliax as hax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from levanter.models.llama import LlamaConfig, LlamaLMHeadModel
    from transformers import AutoTokenizer

    output, _ = proc.communicate(timeout=280)
    assert proc.returncode == 0, output[-6000:]
    assert "held-out exact match" in output

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["max_position_embeddings"] == 64

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert config["vocab_size"] == len(tokenizer)
    ids = tokenizer("4821+377=", add_special_tokens=False)["input_ids"]
    assert tokenizer("4821+377=")["input_ids"] == ids, "no BOS/EOS may be added: the model never saw them"
    assert len(ids) == 9 and tokenizer.decode(ids + tokenizer(".")["input_ids"]) == "4821+377=."

    mesh = Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1, 1), ("replica", "data", "model"))
    with hax.partitioning.set_mesh(mesh):
        converter = LlamaConfig().hf_checkpoint_converter(ref_checkpoint=str(out))
        model = converter.load_pretrained(LlamaLMHeadModel, ref=str(out), dtype=jnp.float32)
    assert model.Vocab.size == len(tokenizer)
    assert model.config.hidden_dim == config["hidden_size"]
