"""Top-k, top-p and min-p, and seeds: in Levanter's real engine with the tiny model, against Hugging Face.

The sampler (``seams.sampler.ControlledSampler``) is checked alone on fixed logits, then through the engine: with
top-k 1 or top-p 1e-9 a hot temperature gives the greedy output, rows without controls are unchanged beside rows
with them, and the first tokens sampled under each control follow the truncated, renormalized softmax of
transformers' own logits (Flax Llama, float32), by an exact support check and a chi-square test.
"""

import json
import os
from pathlib import Path

import haliax as hax
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
from levanter.compat.hf_checkpoints import RepoRef, load_tokenizer
from levanter.inference.engine import InferenceEngineConfig
from levanter.layers.sampler import Sampler
from levanter.models.llama import LlamaConfig
from levanter.trainer import TrainerConfig
from multihost import run_in_process
from test_bad_input import config, fails, jsonl

from levanter_multihost import model_loading, seams
from levanter_multihost.addition import make_prompts
from levanter_multihost.generation import WorkItem, build_engine, generate_batch, sequence_keys
from levanter_multihost.runplan import ModelSource, Sampling, StopCondition
from levanter_multihost.seams.sampler import ControlledSampler, controlled_temperatures

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-addition")
TRAINER = TrainerConfig(mp=jmp.get_policy("f32"), model_axis_size=1)
ENGINE = InferenceEngineConfig(
    max_seq_len=24,
    page_size=8,
    max_pages=3 * 256,
    max_seqs=256,
    max_seqs_in_prefill=256,
    max_prefill_size=256 * 8,
    max_queued_tokens=256,
    max_rounds=8,
    compute_dtype=jnp.float32,
)
NO_STOP = Sampling(seed=0, stop=StopCondition(), logprobs=True)
VOCAB = hax.Axis("vocab", 6)
LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=np.float32))


def chi_square_critical(dof: int, z: float = 3.719) -> float:
    """The chi-square quantile at the normal quantile ``z`` (3.719: p = 1e-4), by Wilson and Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def assert_follows(tokens: np.ndarray, expected: np.ndarray) -> None:
    """Tokens outside ``expected``'s support never appear; the counts pass a chi-square test at p = 1e-4."""
    counts = np.bincount(tokens, minlength=len(expected))
    assert counts[expected == 0].sum() == 0, f"tokens outside the kept set: {np.nonzero(counts * (expected == 0))}"
    kept = expected > 0
    want = expected[kept] * len(tokens)
    statistic = float(((counts[kept] - want) ** 2 / want).sum())
    assert statistic < chi_square_critical(max(int(kept.sum()) - 1, 1)), (counts[kept], want)


def truncated(probs: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Hugging Face's warpers in its order (top-k, top-p, min-p) on ``probs``, renormalized; a plain reading."""
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), dtype=bool)
    mass, top_k_mass = 0.0, probs[order[: top_k or len(probs)]].sum()
    for rank, token in enumerate(order):
        if (top_k and rank >= top_k) or (top_p < 1 and mass >= top_p * top_k_mass):
            break
        keep[token] = probs[token] >= min_p * probs[order[0]]
        mass += probs[token]
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@jax.jit
def draw(sampler, logits, temperature, keys):
    """One (token, log-probability) per key from ``sampler`` on the same logits; compiled once per sampler type."""
    return jax.vmap(lambda k: tuple(x.array for x in sampler(logits, temperature, key=k)))(keys)


def sample_alone(controls: tuple, n: int = 20000) -> np.ndarray:
    """``n`` tokens from ``ControlledSampler`` on LOGITS, one key each, under (temperature, top_k, top_p, min_p)."""
    coded, table = controlled_temperatures(np.array([controls], np.float32))
    keys = jax.random.split(jax.random.PRNGKey(1), n)
    tokens, _ = draw(
        ControlledSampler(VOCAB, table),
        hax.named(jnp.asarray(LOGITS), VOCAB),
        hax.named(jnp.asarray(coded[0]), ()),
        keys,
    )
    return np.asarray(tokens)


# kept: 2, 2, 4 tokens; then 2, because top-p reads the distribution top-k left renormalized (3 on the raw one)
@pytest.mark.parametrize("top_k,top_p,min_p", [(2, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.2), (3, 0.8, 0.0)])
def test_the_sampler_alone_follows_the_truncated_softmax(top_k, top_p, min_p):
    tokens = sample_alone((1.0, top_k, top_p, min_p))
    assert_follows(tokens, truncated(np.exp(LOGITS) / np.exp(LOGITS).sum(), top_k, top_p, min_p))


def test_without_controls_the_sampler_is_levanters_bit_for_bit():
    """A position without controls in a controlled batch: the same tokens and log-probabilities as Levanter's."""
    coded, table = controlled_temperatures(np.array([[0.7, 0, 1.0, 0.0], [0.7, 2, 1.0, 0.0]], np.float32))
    assert coded[0] == np.float32(0.7) and coded[1] < 0  # only the controlled one is coded
    logits = hax.named(jax.random.normal(jax.random.PRNGKey(0), (6,)), VOCAB)
    t, keys = hax.named(jnp.float32(0.7), ()), jax.random.split(jax.random.PRNGKey(2), 200)
    ours = draw(ControlledSampler(VOCAB, table), logits, t, keys)
    theirs = draw(Sampler(VOCAB), logits, t, keys)
    assert [np.asarray(x).tobytes() for x in ours] == [np.asarray(x).tobytes() for x in theirs]


def test_greedy_rows_and_rows_without_controls_leave_no_table():
    coded, table = controlled_temperatures(np.array([[0.0, 3, 0.5, 0.1], [0.9, 0, 1.0, 0.0]], np.float32))
    assert table is None and coded.tolist() == [0.0, np.float32(0.9)]


def test_seeds_keep_all_64_bits_and_seeds_below_2_to_the_32_keep_their_keys():
    def keys(seed):
        halves = np.array([[seed & 0xFFFFFFFF, seed >> 32]] * 2, dtype=np.uint32)
        return np.asarray(sequence_keys(halves, np.array([3, 3]), np.array([0, 1])))

    for seed in (5, 2**32 - 1):  # the keys every earlier run had: PRNGKey(seed), the prompt, the generation
        old = jax.random.fold_in(jax.random.PRNGKey(seed), 3)
        assert keys(seed).tolist() == [np.asarray(old).tolist(), np.asarray(jax.random.fold_in(old, 1)).tolist()]
    assert keys(5).tolist() != keys(5 + 2**32).tolist() != keys(5 + 2**33).tolist()
    assert keys(2**63 - 1).tolist() != keys(2**31 - 1).tolist()


@pytest.fixture(scope="module")
def tiny():
    """The tiny addition model (float32), its tokenizer and one engine of ENGINE on one CPU device."""
    seams.checks_as_nan()
    tokenizer = load_tokenizer(TINY)
    with model_loading.on_local_mesh(TRAINER):
        model = model_loading.load_model(
            ModelSource(RepoRef(os.path.abspath(TINY)), None, LlamaConfig(), TRAINER), tokenizer
        )
        engine = build_engine(model, tokenizer, ENGINE, logprobs=True)
    return engine, tokenizer


def run(tiny, items, sampling=NO_STOP):
    engine, tokenizer = tiny
    with model_loading.on_local_mesh(TRAINER):
        rows, _ = generate_batch(engine, tokenizer, items, sampling, 0, lambda _: None, lambda: 0.0)
    return {(r["global_prompt_index"], r["generation_index"]): r for r, _ in rows}


def items_of(tiny, prompts, temperature, max_new=6, **controls):
    ids = tiny[1](prompts, add_special_tokens=False)["input_ids"]
    return [
        WorkItem(i, p, list(t), (0, 1), 2, max_new, temperature, **controls)
        for i, (p, t) in enumerate(zip(prompts, ids))
    ]


@pytest.mark.slow
def test_top_k_1_or_a_tiny_top_p_at_a_hot_temperature_is_greedy(tiny):
    prompts = make_prompts(24, seed=5)
    greedy = run(tiny, items_of(tiny, prompts, 0.0))
    hot = run(tiny, items_of(tiny, prompts, 1.5))
    for controls in ({"top_k": 1}, {"top_p": 1e-9}):
        controlled = run(tiny, items_of(tiny, prompts, 1.5, **controls))
        assert {k: r["generated_token_ids"] for k, r in controlled.items()} == {
            k: r["generated_token_ids"] for k, r in greedy.items()
        }, controls
        assert all(r["generated_logprobs"] == [0.0] * len(r["generated_logprobs"]) for r in controlled.values())
    assert any(hot[k]["generated_token_ids"] != greedy[k]["generated_token_ids"] for k in greedy)  # 1.5 is hot


@pytest.mark.slow
def test_rows_without_controls_are_unchanged_beside_rows_with_them(tiny):
    prompts = make_prompts(16, seed=6)
    plain = run(tiny, items_of(tiny, prompts, 1.2))
    mixed = items_of(tiny, prompts, 1.2)
    mixed[1::2] = items_of(tiny, prompts, 1.2, top_k=3, top_p=0.9, min_p=0.05)[1::2]
    beside = run(tiny, mixed)
    for index in range(0, 16, 2):
        for g in (0, 1):
            assert beside[(index, g)]["generated_token_ids"] == plain[(index, g)]["generated_token_ids"]
            assert beside[(index, g)]["generated_logprobs"] == plain[(index, g)]["generated_logprobs"]


@pytest.mark.slow
def test_a_rows_own_seed_is_the_run_seed_for_that_row_whatever_the_batch(tiny):
    prompts, hot = make_prompts(8, seed=7), 3.0
    seed = 2**40 + 11
    alone = run(tiny, items_of(tiny, prompts, hot), Sampling(seed=seed, stop=StopCondition(), logprobs=True))
    own = items_of(tiny, prompts, hot)
    own[3] = items_of(tiny, prompts, hot, seed=seed)[3]
    beside = run(tiny, own[2:5])  # another batch, the run seed 0 for the others
    for g in (0, 1):
        assert beside[(3, g)]["generated_token_ids"] == alone[(3, g)]["generated_token_ids"]
    # the seed decides: its low 32 bits alone sample otherwise
    low = run(tiny, items_of(tiny, prompts, hot), Sampling(seed=seed - 2**40, stop=StopCondition(), logprobs=True))
    assert [low[k]["generated_token_ids"] for k in low] != [alone[k]["generated_token_ids"] for k in alone]
    others = [(2, 0), (2, 1), (4, 0), (4, 1)]  # the run seed 0, not the row's: sampled otherwise
    assert any(beside[k]["generated_token_ids"] != alone[k]["generated_token_ids"] for k in others)


SETTINGS = ({"top_k": 3}, {"top_p": 0.6}, {"min_p": 0.1}, {"top_k": 6, "top_p": 0.5})
SAMPLES = 768
TEMPERATURE = 4.0


@pytest.mark.slow
def test_first_tokens_follow_the_truncated_softmax_of_transformers_logits(tiny):
    from transformers import FlaxLlamaForCausalLM

    prompt = "9+"  # the tiny model spreads its next digit over several tokens here
    ids = tiny[1](prompt, add_special_tokens=False)["input_ids"]
    reference = FlaxLlamaForCausalLM.from_pretrained(TINY, from_pt=True, dtype=jnp.float32)
    probs = np.asarray(jax.nn.softmax(reference(np.array([ids])).logits[0, -1] / TEMPERATURE), dtype=np.float64)
    items = [
        WorkItem(s, prompt, ids, tuple(range(SAMPLES)), SAMPLES, 1, TEMPERATURE, **controls)
        for s, controls in enumerate(SETTINGS)
    ]
    firsts = {s: [] for s in range(len(SETTINGS))}
    for start in range(0, SAMPLES, 64):  # 64 generations of each setting per batch: all four in every batch
        batch = [WorkItem(**{**vars(i), "generations": tuple(range(start, start + 64))}) for i in items]
        for (s, _), row in run(tiny, batch).items():
            firsts[s].append(row["generated_token_ids"][0])
    for s, controls in enumerate(SETTINGS):
        assert_follows(np.array(firsts[s]), truncated(probs, **controls))


@pytest.mark.parametrize(
    "flag,match",
    [
        ("--top_p=0", r"top_p \(0.0\) must be a number in \(0, 1\]"),
        ("--top_p=1.5", r"top_p \(1.5\) must be"),
        ("--top_k=-1", r"top_k \(-1\) must be an integer >= 0"),
        ("--min_p=2", r"min_p \(2.0\) must be a number in"),
    ],
)
def test_a_bad_control_in_the_config_is_one_line_before_load(tmp_path, flag, match):
    fails(config(tmp_path, flag), match)


@pytest.mark.parametrize(
    "column,value", [("top_p", 0.0), ("top_k", 1.5), ("min_p", -0.1), ("seed", 2**63), ("seed", -3), ("top_k", True)]
)
def test_a_bad_control_in_a_row_names_the_line(tmp_path, column, value):
    path = jsonl(tmp_path, [{"prompt": "1+2="}, {"prompt": "3+4=", column: value}])
    fails(config(tmp_path, f"--prompts_file={path}"), rf"line 2: `{column}` is {value!r}; it must be")


@pytest.mark.slow
def test_the_command_line_top_k_1_or_top_p_1e_9_at_temperature_1_5_gives_the_greedy_output(tmp_path):
    prompts = "--prompts=" + json.dumps(make_prompts(32, seed=8))
    runs = {}
    hot = ["--temperature=1.5"]
    cases = {"greedy": [], "top_k": ["--top_k=1", *hot], "top_p": ["--top_p=1e-9", *hot], "hot": hot}
    for name, flags in cases.items():
        run_in_process(tmp_path / name, prompts, "--task=null", *flags)
        rows = [json.loads(line) for line in (tmp_path / name / "merged.jsonl").read_text().splitlines()]
        runs[name] = [r["generated_token_ids"] for r in rows]
    assert runs["top_k"] == runs["greedy"] == runs["top_p"] != runs["hot"]


def test_the_seam_checks_what_it_relies_on_and_fails_loudly_when_it_moves(monkeypatch):
    from levanter.inference import engine

    from levanter_multihost.seams import SeamError
    from levanter_multihost.seams.sampler import check_sampler_seam

    check_sampler_seam()  # the pinned engine has everything
    monkeypatch.delattr(engine, "_handle_clones")
    with pytest.raises(SeamError, match=r"engine._handle_clones no longer gathers .* \(installed: levanter 1\.2"):
        check_sampler_seam()
