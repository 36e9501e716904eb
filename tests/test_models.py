"""A second architecture end to end: the tiny Qwen3 (``assets/tiny-qwen3``, random weights) through the sampler,
against Hugging Face's Qwen3 written out in numpy; and architectures the engine cannot run, refused before load.

transformers has no Flax Qwen3 and torch is not installed, so the reference is ``modeling_qwen3``'s forward pass
in float64 numpy from the checkpoint's safetensors: RMSNorm, per-head RMSNorm on queries and keys, rotary
positions (rotate-half), grouped KV heads, causal softmax attention, SwiGLU.
"""

import json
import shutil

import numpy as np
import pytest
from multihost import REPO, launch
from safetensors.numpy import load_file
from test_bad_input import config, fails

from levanter_multihost import model_loading

QWEN3 = REPO / "assets" / "tiny-qwen3"
NEW_TOKENS = 6
PROMPT = "4821+377="


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rotate(x, positions, theta):
    """Rotary positions as Hugging Face applies them: the two halves of each head rotated together."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (np.arange(0, x.shape[-1], 2) / x.shape[-1])
    angles = np.concatenate([positions[:, None] * inv_freq] * 2, axis=-1)[:, None, :]  # [T, 1, D]
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def qwen3_logits(ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of ``ids``: Hugging Face's Qwen3ForCausalLM, in numpy."""
    c = json.loads((QWEN3 / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(QWEN3 / "model.safetensors").items()}
    eps, heads, kv, d = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    positions = np.arange(len(ids), dtype=np.float64)
    h = w["model.embed_tokens.weight"][ids]
    causal = np.tril(np.ones((len(ids), len(ids)), dtype=bool))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(len(ids), heads, d)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(len(ids), kv, d)
        q, k = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps), rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(len(ids), kv, d)
        q, k = rotate(q, positions, c["rope_theta"]), rotate(k, positions, c["rope_theta"])
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        scores = np.where(causal, scores, -np.inf)
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        h = h + np.einsum("hqk,khd->qhd", attn, v).reshape(len(ids), heads * d) @ w[p + "self_attn.o_proj.weight"].T
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def greedy(ids: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Hugging Face greedy decoding of ``new_tokens`` tokens, and the smallest top-1 / top-2 logit gap on the way."""
    ids, gap = list(ids), np.inf
    for _ in range(new_tokens):
        logits = qwen3_logits(ids)[-1]
        top = np.sort(logits)
        gap = min(gap, top[-1] - top[-2])
        ids.append(int(logits.argmax()))
    return ids[-new_tokens:], gap


def test_the_checkpoint_is_the_script_s_output(tmp_path):
    """assets/tiny-qwen3 is exactly what scripts/make_tiny_qwen3.py writes (deterministic)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_qwen3.py"), "--out", str(tmp_path)], check=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (QWEN3 / name).read_bytes(), name


def test_the_architecture_comes_from_config_json():
    from levanter.models.llama import LlamaConfig
    from levanter.models.qwen import Qwen3Config

    hf = json.loads((QWEN3 / "config.json").read_text())
    model = model_loading.architecture(hf, LlamaConfig(), "x")
    assert type(model) is Qwen3Config and (model.hidden_dim, model.num_layers, model.num_kv_heads) == (32, 2, 4)
    assert model_loading.encoded(model)["type"] == "qwen3"


QWEN3_FLAGS = (
    f"--hf_checkpoint={QWEN3}",
    "--prompts=" + json.dumps([PROMPT]),
    "--task=null",
    f"--max_new_tokens={NEW_TOKENS}",
    "--stop_at_eos=false",
)
"""The README's job shape (tiny_local.yaml: every axis sharded over a host's 4 devices) on the tiny Qwen3, greedy."""


@pytest.mark.slow
@pytest.mark.multihost
def test_qwen3_on_2_hosts_matches_hugging_face_greedy_and_a_host_without_prompts_idles(tmp_path):
    """Host-count independence is the engine's, shown on Llama (test_end_to_end); here host 0 samples the one
    prompt, Hugging Face's greedy continuation, and host 1, given none, loads nothing and still reports."""
    from levanter.compat.hf_checkpoints import load_tokenizer

    run = launch(tmp_path, *QWEN3_FLAGS, hosts=2)
    rows = run.rows()
    assert [(r["prompt"], r["process_index"]) for r in rows] == [(PROMPT, 0)]
    tokenizer = load_tokenizer(str(QWEN3))
    expected, gap = greedy(tokenizer(PROMPT, add_special_tokens=False)["input_ids"], NEW_TOKENS)
    assert gap > 1e-3  # no near-tie that float32 could flip
    assert rows[0]["generated_token_ids"] == expected
    assert [len(run.parts(h)) for h in range(2)] == [1, 0]
    hosts = run.summary()["hosts"]
    assert [h["host"] for h in hosts] == [0, 1]
    assert hosts[1]["prompts"] == 0 and hosts[1]["tokens_generated"] == 0 and hosts[1]["model_load_s"] == 0


def test_an_architecture_the_engine_cannot_run_is_one_line_before_load(tmp_path, monkeypatch):
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    ckpt = tmp_path / "qwen2"
    shutil.copytree(QWEN3, ckpt)
    settings = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(
        json.dumps({**settings, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    )
    fails(
        config(tmp_path, f"--hf_checkpoint={ckpt}"),
        r"is a 'qwen2' \(Qwen2ForCausalLM\) model; this sampler runs "
        r"llama and qwen3 checkpoints",
    )


def test_a_model_type_that_contradicts_the_checkpoint_is_one_line_before_load(tmp_path, monkeypatch):
    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    fails(config(tmp_path, "--model.type=mistral"), r"model is 'mistral' but hf_checkpoint .* is a 'llama' model")


def test_the_plan_and_the_tracker_see_the_checkpoints_own_shape(tmp_path):
    import jax

    from levanter_multihost import capacity_inputs
    from levanter_multihost.resolution import resolve

    resolved = resolve(
        config(tmp_path, f"--hf_checkpoint={QWEN3}", "--trainer.model_axis_size=1"), 0, 1, len(jax.local_devices())
    )
    logged = resolved.reporting.config["config"]["model"]
    assert (logged["type"], logged["hidden_dim"], logged["num_heads"], logged["num_kv_heads"]) == ("qwen3", 32, 8, 4)
    assert type(resolved.model.model).__name__ == "Qwen3Config"
    shape = capacity_inputs.model_shape(
        str(QWEN3), resolved.model.trainer, resolved.engine.limits
    )  # trainer.mp is f32
    assert shape.weight_bytes == sum(a.nbytes for a in load_file(QWEN3 / "model.safetensors").values())


@pytest.mark.slow
def test_loading_reads_the_architecture_even_where_the_plan_could_not():
    """A hub id outside the cache or a URL leaves the plan with the config's default (Llama); the loader still
    reads config.json and builds the checkpoint's own architecture, never a Llama from Qwen3 weights."""
    import os

    import jmp
    from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
    from levanter.models.llama import LlamaConfig
    from levanter.models.qwen import Qwen3LMHeadModel
    from levanter.trainer import TrainerConfig

    from levanter_multihost.runplan import ModelSource

    trainer = TrainerConfig(mp=jmp.get_policy("f32"), model_axis_size=1)
    source = ModelSource(RepoRef(os.path.abspath(QWEN3)), None, LlamaConfig(), trainer)
    with model_loading.on_local_mesh(trainer):
        model = model_loading.load_model(source, load_tokenizer(str(QWEN3)))
    assert type(model) is Qwen3LMHeadModel
