"""The addition task: determinism, the held-out split, scoring and the prompts CLI. Pure Python, fast."""

import pytest

from levanter_multihost import addition


def test_prompts_are_deterministic_distinct_and_extend():
    prompts = addition.make_prompts(300, seed=0)
    assert prompts == addition.make_prompts(300, seed=0)
    assert len(set(prompts)) == 300
    assert addition.make_prompts(100, seed=0) == prompts[:100]
    assert addition.make_prompts(300, seed=1) != prompts


def test_eval_prompts_are_held_out_and_training_examples_are_not():
    for prompt in addition.make_prompts(500, seed=0):
        assert addition.is_held_out(*addition.parse_prompt(prompt))
    eval_prompts = set(addition.make_prompts(1024, seed=0))
    for i in range(2000):
        prompt, answer = addition.training_example(seed=0, index=i)
        assert not addition.is_held_out(*addition.parse_prompt(prompt))
        assert prompt not in eval_prompts
        assert answer == addition.expected_answer(prompt) + addition.TERMINATOR


def test_training_examples_are_deterministic_and_cover_every_length():
    examples = [addition.training_example(seed=3, index=i) for i in range(400)]
    assert examples == [addition.training_example(seed=3, index=i) for i in range(400)]
    assert examples != [addition.training_example(seed=4, index=i) for i in range(400)]
    lengths = {len(str(a)) for p, _ in examples for a in addition.parse_prompt(p)}
    assert lengths == set(range(1, addition.MAX_DIGITS + 1))
    assert max(len(p) for p, _ in examples) <= addition.MAX_PROMPT_CHARS
    assert max(len(a) for _, a in examples) <= addition.MAX_ANSWER_CHARS + 1


def test_held_out_share_is_about_one_in_buckets():
    pairs = [(a, b) for a in range(300) for b in range(100)]
    share = sum(addition.is_held_out(a, b) for a, b in pairs) / len(pairs)
    assert abs(share - 1 / addition.HELD_OUT_BUCKETS) < 0.01


def test_expected_answer_and_score():
    assert addition.expected_answer("4821+377=") == "5198"
    assert addition.score("5198.", "4821+377=")
    assert addition.score("5198", "4821+377=")
    assert addition.score(" 5198.\n7+1=8.", "4821+377=")
    assert not addition.score("5197.", "4821+377=")
    assert not addition.score("51980.", "4821+377=")
    assert not addition.score("", "4821+377=")
    assert not addition.score(".5198", "4821+377=")


def test_parse_prompt_rejects_other_text():
    with pytest.raises(ValueError, match="4821\\+377="):
        addition.parse_prompt("4821-377=")


def test_accuracy():
    rows = [
        {"prompt": "1+2=", "generated_text": "3."},
        {"prompt": "10+5=", "generated_text": "15.", "extra": 1},
        {"prompt": "99+1=", "generated_text": "10."},
        {"prompt": "7+7=", "generated_text": "14"},
    ]
    assert addition.accuracy(rows) == 0.75
    with pytest.raises(ValueError, match="generated_text"):
        addition.accuracy([{"prompt": "1+2="}])
    with pytest.raises(ValueError, match="at least one row"):
        addition.accuracy([])


def test_make_prompts_rejects_nonpositive_n():
    with pytest.raises(ValueError, match="at least 1"):
        addition.make_prompts(0, seed=0)


def test_cli_writes_one_prompt_per_line(tmp_path):
    out = tmp_path / "prompts.txt"
    addition.main(["--n", "32", "--seed", "0", "--out", str(out)])
    assert out.read_text().splitlines() == addition.make_prompts(32, seed=0)
