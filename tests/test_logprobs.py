"""Greedy log-probabilities from the engine equal Hugging Face ``transformers``' log-softmax of the chosen tokens.

The reference is transformers' own Llama (its Flax implementation, which reads the checkpoint's safetensors
without torch), run over each prompt and the tokens the engine chose; float32 on both sides.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
from levanter.inference.engine import InferenceEngineConfig
from levanter.models.llama import LlamaConfig
from levanter.trainer import TrainerConfig
from multihost import REPO

from levanter_multihost import model_loading, seams
from levanter_multihost.addition import make_prompts
from levanter_multihost.generation import WorkItem, build_engine, generate_batch
from levanter_multihost.runplan import ModelSource, Sampling, StopCondition

pytestmark = pytest.mark.slow  # the real engine in this process

TINY = str(REPO / "assets" / "tiny-addition")
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def engine_rows():
    """16 held-out prompts, greedy, 8 new tokens each, log-probabilities on, on one CPU device."""
    seams.checks_as_nan()
    tokenizer = load_tokenizer(TINY)
    trainer = TrainerConfig(model_axis_size=1)
    config = InferenceEngineConfig(
        max_seq_len=32,
        page_size=8,
        max_pages=128,
        max_seqs=16,
        max_seqs_in_prefill=16,
        max_prefill_size=256,
        max_queued_tokens=16,
        max_rounds=8,
        compute_dtype=jnp.float32,
    )
    prompts = make_prompts(16, seed=3)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    items = [WorkItem(i, p, list(t), (0,), 1, NEW_TOKENS, 0.0) for i, (p, t) in enumerate(zip(prompts, ids))]
    with model_loading.on_local_mesh(trainer):
        model = model_loading.load_model(
            ModelSource(RepoRef(os.path.abspath(TINY)), None, LlamaConfig(), trainer), tokenizer
        )
        engine = build_engine(model, tokenizer, config, logprobs=True)
        rows, _ = generate_batch(
            engine,
            tokenizer,
            items,
            Sampling(seed=0, stop=StopCondition(), logprobs=True),
            0,
            lambda _: None,
            lambda: 0.0,
        )
    return [(row, item.token_ids) for (row, _), item in zip(rows, items)]


def test_greedy_logprobs_equal_transformers_log_softmax_of_the_chosen_tokens(engine_rows):
    from transformers import FlaxLlamaForCausalLM

    reference = FlaxLlamaForCausalLM.from_pretrained(TINY, from_pt=True, dtype=jnp.float32)
    forward = jax.jit(lambda ids: reference(ids).logits)
    worst = 0.0
    for row, prompt_ids in engine_rows:
        generated = row["generated_token_ids"]
        assert len(row["generated_logprobs"]) == len(generated) == NEW_TOKENS
        # padded at the end to one length, so the reference compiles once; causal attention never looks ahead
        sequence = np.zeros((1, 32), dtype=np.int32)
        sequence[0, : len(prompt_ids) + len(generated)] = prompt_ids + generated
        logits = forward(sequence)[0].astype(jnp.float32)
        log_softmax = jax.nn.log_softmax(logits, axis=-1)
        # position t's logits predict token t + 1: the first new token comes from the prompt's last position
        positions = np.arange(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(generated))
        expected = np.asarray(log_softmax[positions, np.array(generated)])
        assert np.asarray(log_softmax[positions].argmax(-1)).tolist() == generated  # greedy chose the argmax
        np.testing.assert_allclose(row["generated_logprobs"], expected, atol=1e-4, rtol=0)
        worst = max(worst, float(np.max(np.abs(np.array(row["generated_logprobs"]) - expected))))
    assert worst < 1e-4
