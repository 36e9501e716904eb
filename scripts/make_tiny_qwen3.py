"""Make ``assets/tiny-qwen3``: a tiny Qwen3 checkpoint with random weights, for loading and parity checks only.

    uv run python scripts/make_tiny_qwen3.py [--out assets/tiny-qwen3]

A second architecture for CI: Qwen3 (Llama plus a norm on each head's queries and keys, and grouped KV heads), the
one other Hugging Face architecture the pinned Levanter both converts and decodes in its ``InferenceEngine``. The
weights are drawn with numpy from a fixed seed and written as float32 safetensors under Hugging Face's names, so
no torch is needed; the config is transformers' own ``Qwen3Config``; the tokenizer is the tiny addition model's.
The model is untrained: it says nothing about addition, only whether this sampler computes what Hugging Face's
Qwen3 computes (``tests/test_models.py``). Deterministic: the same files every time.
"""

import argparse
import shutil
from pathlib import Path

import numpy as np
import transformers
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets" / "tiny-addition"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SHAPE = {
    "vocab_size": 24,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def weights(config: transformers.Qwen3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a Qwen3ForCausalLM under its Hugging Face name; scaled so the logits are far from ties."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim

    def linear(out: int, into: int) -> np.ndarray:
        return (rng.standard_normal((out, into)) / np.sqrt(into)).astype(np.float32)

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rng.standard_normal((config.vocab_size, hidden)).astype(np.float32)}
    for i in range(config.num_hidden_layers):
        at = f"model.layers.{i}."
        tensors |= {
            at + "input_layernorm.weight": norm(hidden),
            at + "self_attn.q_proj.weight": linear(heads * head_dim, hidden),
            at + "self_attn.k_proj.weight": linear(kv * head_dim, hidden),
            at + "self_attn.v_proj.weight": linear(kv * head_dim, hidden),
            at + "self_attn.o_proj.weight": linear(hidden, heads * head_dim),
            at + "self_attn.q_norm.weight": norm(head_dim),
            at + "self_attn.k_norm.weight": norm(head_dim),
            at + "post_attention_layernorm.weight": norm(hidden),
            at + "mlp.gate_proj.weight": linear(config.intermediate_size, hidden),
            at + "mlp.up_proj.weight": linear(config.intermediate_size, hidden),
            at + "mlp.down_proj.weight": linear(hidden, config.intermediate_size),
        }
    tensors["model.norm.weight"] = norm(hidden)
    tensors["lm_head.weight"] = 3.0 * linear(config.vocab_size, hidden)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "assets" / "tiny-qwen3"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    config = transformers.Qwen3Config(**SHAPE, architectures=["Qwen3ForCausalLM"])
    config.to_json_file(out / "config.json")
    save_file(weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, out / name)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
