"""Scoring rows (a `completion` column): lm-eval-harness ``loglikelihood`` semantics, checked against Hugging Face.

The reference is transformers' own Llama (its Flax implementation, which reads the checkpoint's safetensors
without torch): the log-softmax of its logits at each completion token, float32 on both sides. The slow test runs
the sampler on 2 emulated hosts, then resumes on 1 with a host's parts gone and finds the same rows.
"""

import json
import os
import re
import shutil

import draccus
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
from levanter.inference.engine import InferenceEngineConfig
from levanter.models.llama import LlamaConfig
from levanter.trainer import TrainerConfig
from multihost import REPO, TINY_CONFIG, cache_flags, launch, read_jsonl

from levanter_multihost import capacity_inputs, host_work, model_loading, plan_cli, scoring, tracking
from levanter_multihost.addition import expected_answer, make_prompts
from levanter_multihost.capacity import PromptDemand
from levanter_multihost.capacity_inputs import CapacityError
from levanter_multihost.errors import UserError
from levanter_multihost.generation import WorkItem
from levanter_multihost.outputs import SCORE_FIELDS, row_line
from levanter_multihost.resolution import resolve
from levanter_multihost.runplan import EngineSettings, ModelSource
from levanter_multihost.sample_lm_multihost import SampleLmMultihostConfig, main

TINY = str(REPO / "assets" / "tiny-addition")
LIKELIHOOD_CONFIG = REPO / "config" / "sampler" / "tiny_likelihood_eval.yaml"


def pairs(n: int, seed: int) -> list[dict]:
    """Held-out addition prompts, each with its right answer and a wrong one (off by one in the last digit)."""
    rows = []
    for i, p in enumerate(make_prompts(n, seed=seed)):
        right = expected_answer(p)
        wrong = str(int(right) + 1 if not right.endswith("9") else int(right) - 1)
        rows.append({"prompt": p, "completion": right + ".", "id": f"q{i}", "right": True})
        rows.append({"prompt": p, "completion": wrong + ".", "id": f"q{i}", "right": False})
    return rows


@pytest.fixture(scope="module")
def scored():
    """16 prompt/completion pairs scored by :func:`scoring.score_batch` on 4 CPU devices, prompt_logprobs on, in
    batches of at most 12 rows (so two bucketed shapes and a padded last batch)."""
    tokenizer = load_tokenizer(TINY)
    trainer = TrainerConfig(model_axis_size=1)
    rows = pairs(8, seed=11)
    prompt_ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    config = InferenceEngineConfig(
        max_seq_len=32, page_size=8, max_pages=64, max_seqs=12, max_prefill_size=256, compute_dtype=jnp.float32
    )
    engine = EngineSettings(config, capacity_inputs.engine_limits(config), 64, None)
    items = [
        WorkItem(i, r["prompt"], list(p), (0,), 1, 0, 0.0, None, completion_ids=tuple(c))
        for i, (r, p, c) in enumerate(zip(rows, prompt_ids, completion_ids))
    ]
    with model_loading.on_local_mesh(trainer):
        model = model_loading.load_model(
            ModelSource(RepoRef(os.path.abspath(TINY)), None, LlamaConfig(), trainer), tokenizer
        )
        batches = scoring.batches(items, engine)
        out = [row for b in batches for row, _ in scoring.score_batch(model, b, engine, True, 0, lambda: 0.0)[0]]
    return rows, out, batches


@pytest.mark.slow  # transformers converts the checkpoint for Flax: ~10 s on a busy CPU
def test_scoring_rows_equal_transformers_log_softmax(scored):
    from transformers import FlaxLlamaForCausalLM

    inputs, rows, batches = scored
    assert [len(b) for b in batches] == [12, 4]  # the token budget allows 256 // 16 = 16 rows, max_seqs 12
    reference = FlaxLlamaForCausalLM.from_pretrained(TINY, from_pt=True, dtype=jnp.float32)
    texts = [given["prompt"] + given["completion"] for given in inputs]
    sequences = np.zeros((len(texts), 32), dtype=np.int32)  # right-padded: causal attention never looks ahead
    for r, ids in enumerate(load_tokenizer(TINY)(texts, add_special_tokens=False)["input_ids"]):
        sequences[r, : len(ids)] = ids
    all_log_softmax = np.asarray(jax.nn.log_softmax(reference(sequences).logits.astype(jnp.float32), axis=-1))
    worst = 0.0
    for given, row, ids, log_softmax in zip(inputs, rows, sequences, all_log_softmax, strict=True):
        assert list(row)[: len(SCORE_FIELDS)] == list(SCORE_FIELDS)
        prompt, completion = row["prompt_token_count"], row["completion_token_ids"]
        assert row["completion_token_count"] == len(completion) == len(row["completion_logprobs"])
        # digits and "." are single tokens: prompt + completion tokenize as the prompt's tokens, then the completion's
        end = prompt + len(completion)
        assert ids[prompt:end].tolist() == completion and not ids[end:].any()
        positions = np.arange(prompt - 1, prompt - 1 + len(completion))
        expected = log_softmax[positions, np.array(completion)]
        np.testing.assert_allclose(row["completion_logprobs"], expected, atol=1e-4, rtol=0)
        assert abs(row["completion_logprob"] - float(expected.sum())) < 1e-4
        assert row["completion_logprob"] == sum(row["completion_logprobs"])
        assert row["is_greedy"] == bool((log_softmax[positions].argmax(-1) == np.array(completion)).all())
        expected_prompt = log_softmax[np.arange(prompt - 1), ids[1:prompt]]
        np.testing.assert_allclose(row["prompt_logprobs"], expected_prompt, atol=1e-4, rtol=0)
        worst = max(worst, abs(row["completion_logprob"] - float(expected.sum())))
    assert worst < 1e-4
    # the trained model prefers the right sum, and greedy decoding writes exactly it
    right = [r for g, r in zip(inputs, rows) if g["right"]]
    wrong = [r for g, r in zip(inputs, rows) if not g["right"]]
    assert all(r["is_greedy"] for r in right) and not any(w["is_greedy"] for w in wrong)
    assert all(r["completion_logprob"] > w["completion_logprob"] for r, w in zip(right, wrong))


def test_a_scoring_row_is_written_in_its_own_field_order():
    scored = {
        "global_prompt_index": 4,
        "generation_index": 0,
        "process_index": 1,
        "prompt": "1+2=",
        "prompt_token_count": 4,
        "completion_token_ids": [5, 11],
        "completion_token_count": 2,
        "completion_logprobs": [-0.5, -0.25],
        "completion_logprob": -0.75,
        "is_greedy": True,
    }
    line = row_line({**dict(reversed(scored.items())), "prompt_logprobs": [-1.0, -2.0, -3.0]}, b', "id": "q4"')
    assert line.startswith(b'{"global_prompt_index": 4, "generation_index": 0, "process_index": 1, "prompt": ')
    assert list(json.loads(line)) == [*SCORE_FIELDS, "prompt_logprobs", "id"]
    for bad in ({**scored, "generated_text": "3."}, {k: v for k, v in scored.items() if k != "is_greedy"}):
        with pytest.raises(ValueError, match="Row lacks fields"):
            row_line(bad)


def drop(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "process_index"}


def run_config(out, *args: str, config=TINY_CONFIG) -> SampleLmMultihostConfig:
    base = [f"--output_dir={out}", "--task=null", "--overwrite=false", *cache_flags()]
    return draccus.parse(SampleLmMultihostConfig, config_path=str(config), args=[*base, *args])


@pytest.mark.parametrize(
    ("row", "args", "message"),
    [
        ({"prompt": "1+2=", "completion": 3}, (), r"`completion` is 3; it must be a non-empty string to score\.$"),
        ({"prompt": "1+2=", "completion": ["3"]}, (), r"`completion` is \['3'\]; it must be a non-empty string"),
        ({"prompt": "1+2="}, ("--prompt_logprobs=true",), r"prompt_logprobs is true, but no row has a `completion`"),
        ({"prompt": "1+2=", "completion": "3."}, ("--task=addition",), r"task \('addition'\) checks generated text"),
        ({"prompt": "1+2=", "completion": "3.", "n_generations": 2}, (), r"Row 0 asks for 2 generations"),
    ],
)
def test_bad_scoring_input_is_one_line_before_load(tmp_path, monkeypatch, row, args, message):
    def trap(*_, **__):
        raise AssertionError("the model was loaded before the bad input was caught")

    monkeypatch.setattr(model_loading, "load_model", trap)
    path = tmp_path / "p.jsonl"
    other = {"prompt": "2+2=", **({"completion": "4."} if "completion" in row else {})}
    path.write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    with pytest.raises(UserError, match=message) as caught:
        main(run_config(tmp_path / "out", f"--prompts_file={path}", *args))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "parts").exists() or not any((tmp_path / "out" / "parts").iterdir())


@pytest.mark.slow
def test_the_likelihood_eval_on_2_hosts_resumes_on_1_to_identical_rows(tmp_path):
    """docs/usage.md's likelihood eval: 128 held-out sums, each with its right answer and a wrong one; then host
    1's half scored again by one host (this process) in a resume, bit for bit the same."""
    flags = ("--prompt_logprobs=true", "--batch_size=16")
    tracker = "{type: wandb, mode: offline, project: levanter-multihost-test}"
    two = launch(
        tmp_path / "two",
        *flags,
        "--trainer.tracker",
        tracker,
        hosts=2,
        config=LIKELIHOOD_CONFIG,
        env_extra={"WANDB_DIR": str(tmp_path)},
    )
    rows2 = two.rows()
    assert len(rows2) == 256 and sorted({r["process_index"] for r in rows2}) == [0, 1]
    assert [r["global_prompt_index"] for r in rows2] == list(range(256))
    assert list(rows2[0]) == [*SCORE_FIELDS, "prompt_logprobs", "completion", "id", "right"]
    assert all(r["generation_index"] == 0 and "generated_text" not in r for r in rows2)
    assert all(len(r["prompt_logprobs"]) == r["prompt_token_count"] - 1 for r in rows2)
    right, wrong = rows2[0::2], rows2[1::2]
    assert all(r["right"] and not w["right"] and r["id"] == w["id"] for r, w in zip(right, wrong))
    assert np.mean([r["completion_logprob"] > w["completion_logprob"] for r, w in zip(right, wrong)]) > 0.95
    assert np.mean([r["is_greedy"] for r in right]) > 0.95 and not any(w["is_greedy"] for w in wrong)
    summary = two.summary()["summary"]
    assert summary["sample/total_sequences"] == 256 and summary["sample/total_generated_tokens"] == 0
    assert len(two.parts(0)) == len(two.parts(1)) == 8  # 128 rows a host in batches of 16
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(tracking.SCORE_TABLE_FIELDS)
    assert [dict(zip(table["columns"], r))["completion_logprob"] for r in table["data"]] == [
        r["completion_logprob"] for r in rows2
    ]

    # resume on one host: host 1's parts gone, host 0's verified and kept; the 128 rows scored again are the same
    resumed = tmp_path / "resumed"
    shutil.copytree(two.output_dir, resumed)
    (resumed / "merged.jsonl").unlink()
    for part in two.parts(1):
        (resumed / "parts" / part.name).unlink()
    main(run_config(resumed, *flags, "--resume=true", config=LIKELIHOOD_CONFIG))
    again = read_jsonl(resumed / "merged.jsonl")
    assert {r["process_index"] for r in again[128:]} == {0}
    assert [drop(r) for r in again] == [drop(r) for r in rows2]  # bit for bit: no float differs

    # a kept row whose sum does not follow from its log-probabilities is refused, naming the file and line
    tampered = tmp_path / "tampered"
    shutil.copytree(two.output_dir, tampered)
    part = tampered / "parts" / two.parts(0)[0].name
    lines = part.read_bytes().split(b"\n")
    row = json.loads(lines[0])
    row["completion_logprob"] += 1.0
    lines[0] = json.dumps(row).encode()
    part.write_bytes(b"\n".join(lines))
    refused = re.escape(f"{part.name} line 1: its completion_logprob is not the sum")
    with pytest.raises(host_work.ResumeError, match=refused):
        main(run_config(tampered, *flags, "--resume=true", config=LIKELIHOOD_CONFIG))


def test_the_planner_counts_prompt_and_completion_and_no_new_tokens(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs(4, seed=5)))
    cfg = run_config(tmp_path / "out", f"--prompts_file={path}", "--max_new_tokens=30")
    resolved = resolve(cfg, 0, 1, 4)
    tokens, completions = resolved.prompts.tokens, resolved.prompts.completions
    expected = [PromptDemand(tokens.length(i) + completions.length(i), 0, 1) for i in range(8)]
    assert (
        list(
            capacity_inputs.run_spec(
                resolved.prompts.tokens.lengths + resolved.prompts.completions.lengths,
                resolved.prompts.max_new_tokens,
                resolved.prompts.n_generations,
                resolved.sampling.stop,
                "contiguous",
                None,
            ).demands
        )
        == expected
    )
    assert list(plan_cli.plan_config(cfg, 1, None, None).run.demands) == expected  # the plan CLI counts the same
    # max_new_tokens 30 would not fit max_seq_len 32 with these prompts; scoring decodes nothing, so it fits
    assert max(d.prompt_tokens for d in expected) + 30 > 32
    path.write_text(json.dumps({"prompt": "1+2=", "completion": "3" * 40}) + "\n")
    with pytest.raises(CapacityError, match=r"Prompt 0 has 44 tokens, and with max_new_tokens 0 needs 44 positions"):
        resolve(cfg, 0, 1, 4)
