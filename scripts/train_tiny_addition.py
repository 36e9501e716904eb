"""Train the tiny addition Llama with Levanter on CPU and save it as a Hugging Face checkpoint.

    uv run python scripts/train_tiny_addition.py --config_path assets/tiny-addition/train.yaml

Covers the character-level tokenizer, the training data (``levanter_multihost.addition`` examples, loss on the
answer and its terminator only), training with Levanter's ``Trainer`` (its Llama, its Adam config, its per-token
``compute_next_token_loss``), logging loss and held-out exact-match accuracy, saving the model with Levanter's
HF converter, and a final greedy check of the saved checkpoint with Levanter's ``InferenceEngine`` on
``addition.make_prompts(engine_prompts, engine_seed)``. Everything is deterministic from ``trainer.seed``.

Training examples are 16 positions long (the longest problem plus answer); the saved config keeps
``model.seq_len`` as its maximum length: Llama's rotary positions hold no parameters, so the lengths may differ.
Exact match under teacher forcing (every answer token is the argmax given the true prefix) equals greedy
exact match, so the in-training accuracy needs no decode loop.

Leaves out multi-host training, resuming and checkpoints of the training state: a run takes minutes.
"""

import json
import logging
import os
import time
from dataclasses import dataclass, field

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import haliax as hax
import jax
import jax.numpy as jnp
import jax.random as jrandom
import levanter
import numpy as np
from haliax import Axis
from haliax.partitioning import ResourceAxis, named_jit
from jax.sharding import Mesh
from levanter.data.dataset import AsyncDataset
from levanter.inference.engine import InferenceEngineConfig
from levanter.layers.attention import AttentionMask
from levanter.models.llama import LlamaConfig, LlamaLMHeadModel
from levanter.models.lm_model import LmExample, compute_next_token_loss
from levanter.optim import AdamConfig
from levanter.trainer import Trainer, TrainerConfig
from levanter.utils.jax_utils import parameter_count
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from levanter_multihost import addition
from levanter_multihost.generation import WorkItem, build_engine, generate_batch
from levanter_multihost.runplan import Sampling, StopCondition

logger = logging.getLogger("train_tiny_addition")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = "0123456789+-*=. (),?"
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""The model has no chat format: a chat's messages are its prompt, concatenated (lets the sampler's chat path run)."""
TRAIN_POSITIONS = addition.MAX_PROMPT_CHARS + addition.MAX_ANSWER_CHARS + 1


@dataclass
class TrainTinyAdditionConfig:
    """Model, optimizer, run length and where the checkpoint goes."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Levanter trainer: seed, batch size, steps, mesh, tracker."""
    model: LlamaConfig = field(
        default_factory=lambda: LlamaConfig(
            seq_len=64, hidden_dim=64, intermediate_dim=256, num_layers=4, num_heads=4, num_kv_heads=4
        )
    )
    """Llama architecture; `seq_len` is the saved maximum length, not the training length."""
    optimizer: AdamConfig = field(default_factory=AdamConfig)
    """Levanter's AdamW with its learning-rate schedule."""
    output_dir: str = "assets/tiny-addition"
    """Directory of the Hugging Face checkpoint (config, safetensors, tokenizer)."""
    log_every: int = 100
    """Steps between loss lines."""
    eval_every: int = 500
    """Steps between held-out exact-match evaluations (also run after the last step)."""
    eval_examples: int = 512
    """Held-out problems (`make_prompts(eval_examples, eval_seed)`) scored during training."""
    eval_seed: int = 1
    """Seed of the problems scored during training."""
    engine_prompts: int = 256
    """Held-out prompts greedily decoded from the saved checkpoint with the InferenceEngine; 0 skips the check."""
    engine_seed: int = 0
    """Seed of the engine check's prompts (0 gives config/prompts/addition_256.txt)."""
    engine: InferenceEngineConfig = field(
        default_factory=lambda: InferenceEngineConfig(
            max_seq_len=64,
            page_size=8,
            max_pages=1024,
            max_seqs=256,
            max_seqs_in_prefill=256,
            max_prefill_size=4096,
        )
    )
    """InferenceEngine sizing for the final check: every prompt is admitted in one prefill, since the engine stops
    decoding after `max_seq_len / max_rounds` rounds whether or not queued prompts are done."""
    max_new_tokens: int = 8
    """Tokens generated per prompt in the final check."""


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of ``CHARACTERS``, plus the special tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=CHAT_TEMPLATE,
    )


def encode_example(prompt: str, answer: str, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids padded to ``TRAIN_POSITIONS`` and a mask that is 1 where the next token is part of the answer."""
    ids = [vocab[c] for c in prompt + answer]
    if len(ids) > TRAIN_POSITIONS:
        raise ValueError(f"{prompt + answer!r} has {len(ids)} characters; training rows hold {TRAIN_POSITIONS}.")
    tokens = np.full(TRAIN_POSITIONS, vocab["<pad>"], dtype=np.int32)
    tokens[: len(ids)] = ids
    mask = np.zeros(TRAIN_POSITIONS, dtype=np.int32)
    mask[len(prompt) - 1 : len(ids) - 1] = 1
    return tokens, mask


class AdditionDataset(AsyncDataset[LmExample]):
    """``length`` training examples, the i-th always ``addition.training_example(seed, i)``."""

    def __init__(self, seed: int, length: int, vocab: dict[str, int]):
        super().__init__()
        self.seed = seed
        self.length = length
        self.vocab = vocab
        self.Pos = Axis("position", TRAIN_POSITIONS)
        self.attn_mask = AttentionMask.causal()

    async def async_len(self) -> int:
        return self.length

    async def final_length_is_known(self) -> bool:
        return True

    def is_finite(self) -> bool:
        return True

    async def current_len(self) -> int:
        return self.length

    async def get_batch(self, indices) -> list[LmExample]:
        return [self._example(int(i)) for i in indices]

    def _example(self, index: int) -> LmExample:
        tokens, mask = encode_example(*addition.training_example(self.seed, index), self.vocab)
        return LmExample(
            tokens=hax.named(tokens, self.Pos),
            loss_mask=hax.named(mask, self.Pos),
            attn_mask=self.attn_mask,
        )


def held_out_batch(n: int, seed: int, vocab: dict[str, int]) -> tuple[hax.NamedArray, hax.NamedArray]:
    """Tokens and answer masks of ``make_prompts(n, seed)`` with their answers, as (batch, position) arrays."""
    rows = [
        encode_example(p, addition.expected_answer(p) + addition.TERMINATOR, vocab)
        for p in addition.make_prompts(n, seed)
    ]
    axes = (Axis("batch", n), Axis("position", TRAIN_POSITIONS))
    return hax.named(np.stack([t for t, _ in rows]), axes), hax.named(np.stack([m for _, m in rows]), axes)


def exact_match(model: LlamaLMHeadModel, tokens: hax.NamedArray, mask: hax.NamedArray) -> hax.NamedArray:
    """Per row: whether every answer token is the argmax given the true prefix (= greedy exact match)."""
    logits = model(tokens, attn_mask=AttentionMask.causal())
    predicted = hax.argmax(logits, "vocab")
    target = hax.roll(tokens, -1, "position")
    wrong = (predicted != target) & (mask > 0)
    return ~hax.any(wrong, axis="position")


def answer_loss(model: LlamaLMHeadModel, example: LmExample, *, key=None):
    """Mean next-token loss over the answer tokens. Levanter's default mean reduction hands a float mask to
    ``jnp.mean(where=...)``, which this JAX rejects, so the mean is taken here."""
    per_token = compute_next_token_loss(model, example, key=key, reduction=None)
    return hax.sum(per_token) / hax.maximum(hax.sum(example.loss_mask), 1)


def save_hf_checkpoint(model: LlamaLMHeadModel, config: LlamaConfig, tokenizer, out_dir: str) -> None:
    """Write config.json and the tokenizer first (the converter reads them as its reference), then the weights."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    config.to_hf_config(len(tokenizer), {"architectures": ["LlamaForCausalLM"]}).save_pretrained(out_dir)
    converter = config.hf_checkpoint_converter(ref_checkpoint=out_dir)
    converter.save_pretrained(model, out_dir, save_tokenizer=True)


def engine_accuracy(config: TrainTinyAdditionConfig, checkpoint: str) -> float:
    """Load ``checkpoint`` as the sampler does and greedily decode held-out prompts with the InferenceEngine."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    mesh = Mesh(
        np.array(jax.local_devices()).reshape(1, 1, -1), (ResourceAxis.REPLICA, ResourceAxis.DATA, ResourceAxis.MODEL)
    )
    mapping = {"heads": ResourceAxis.MODEL, "mlp": ResourceAxis.MODEL}
    prompts = addition.make_prompts(config.engine_prompts, config.engine_seed)
    terminator = tuple(tokenizer(addition.TERMINATOR, add_special_tokens=False)["input_ids"])
    stop = StopCondition((addition.TERMINATOR,), (terminator,))
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    items = [
        WorkItem(i, p, list(t), (0,), 1, config.max_new_tokens, 0.0) for i, (p, t) in enumerate(zip(prompts, ids))
    ]
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(mapping):
        converter = config.model.hf_checkpoint_converter(ref_checkpoint=checkpoint)
        model = converter.load_pretrained(LlamaLMHeadModel, ref=checkpoint, dtype=jnp.float32, axis_mapping=mapping)
        engine = build_engine(model, tokenizer, config.engine, logprobs=False)
        pairs, _ = generate_batch(
            engine, tokenizer, items, Sampling(seed=0, stop=stop), 0, lambda _: None, lambda: 0.0
        )
    rows = [row for row, _ in pairs]
    for row in rows[:4]:
        logger.info("engine sample: %s -> %r", row["prompt"], row["generated_text"])
    return addition.accuracy(rows)


def main(config: TrainTinyAdditionConfig) -> dict:
    levanter.initialize(config)
    logger.setLevel(logging.INFO)
    start = time.perf_counter()
    tokenizer = build_tokenizer(config.model.seq_len)
    vocab = tokenizer.get_vocab()
    trainer_config = config.trainer
    optimizer = config.optimizer.build(trainer_config.num_train_steps)
    summary: dict = {}

    with Trainer(trainer_config, optimizer, answer_loss, add_default_hooks=False) as trainer:
        model_key, training_key = jrandom.split(jrandom.PRNGKey(trainer_config.seed))
        Vocab = Axis("vocab", len(tokenizer))
        state = trainer.initial_state(training_key, model_init=lambda: config.model.build(Vocab, key=model_key))
        summary["parameters"] = int(parameter_count(state.model))
        logger.info("Model: %d parameters, vocabulary %d", summary["parameters"], Vocab.size)

        eval_tokens, eval_mask = held_out_batch(config.eval_examples, config.eval_seed, vocab)
        score = named_jit(exact_match, axis_resources=trainer.compute_axis_mapping)

        def log_loss(info):
            logger.info("step %d: loss %.4f (%.3fs/step)", info.step, info.loss, info.step_duration)

        def log_accuracy(info):
            correct = np.asarray(score(info.model, eval_tokens, eval_mask).array)
            summary["held_out_exact_match"] = float(correct.mean())
            logger.info("step %d: held-out exact match %.4f", info.step, summary["held_out_exact_match"])

        trainer.add_hook(log_loss, every=config.log_every)
        trainer.add_hook(log_accuracy, every=config.eval_every)
        dataset = AdditionDataset(
            trainer_config.seed, trainer_config.num_train_steps * trainer_config.train_batch_size, vocab
        )
        info = trainer.train(state, trainer.data_loader(dataset).iter_from_step(0))
        summary["final_loss"] = float(info.loss)
        summary["train_seconds"] = time.perf_counter() - start
        save_hf_checkpoint(info.model, config.model, tokenizer, config.output_dir)

    if config.engine_prompts > 0:
        summary["engine_exact_match"] = engine_accuracy(config, config.output_dir)
    summary["total_seconds"] = time.perf_counter() - start
    logger.info("Summary: %s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    levanter.config.main(main)()
