"""Bad input fails before the model loads, with one error naming the field, prompt, file line or column and the
fix, and touches no output.

Each case runs the real entrypoint in-process (one host) with model loading booby-trapped.
"""

import json
import os
import shutil

import draccus
import pytest
from multihost import REPO, TINY_CONFIG

from levanter_multihost import model_loading
from levanter_multihost.errors import UserError
from levanter_multihost.sample_lm_multihost import SampleLmMultihostConfig, main

TINY = REPO / "assets" / "tiny-addition"


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was caught")

    monkeypatch.setattr(model_loading, "load_model", trap)


def config(tmp_path, *args: str) -> SampleLmMultihostConfig:
    base = [f"--output_dir={tmp_path / 'out'}", "--overwrite=false"]
    return draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=[*base, *args])


def fails(cfg, match: str):
    with pytest.raises(UserError, match=match):
        main(cfg)


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def jsonl(tmp_path, rows, name="p.jsonl") -> str:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows).encode())


def test_a_file_and_a_dataset_at_once(tmp_path):
    fails(config(tmp_path, f"--prompts_dataset={tmp_path}"), r"Both `prompts_file` \(.*addition_256.txt\) and "
          r"`prompts_dataset` \(.*\) are set. Set one, e.g. --prompts_file null")  # fmt: skip


def test_no_prompts(tmp_path):
    fails(config(tmp_path, "--prompts_file=null"), r"No prompts: set `prompts`")
    fails(config(tmp_path, "--prompts_file=null", "--prompts=[]"), r"No prompts: the prompt source is empty")


def test_empty_string_prompt(tmp_path):
    fails(config(tmp_path, '--prompts=["1+2=", ""]'), r"`prompts`\[1\]: `prompt` is an empty string")


def test_prompt_longer_than_the_engine_allows(tmp_path):
    long = "1" * 40 + "+1="
    cfg = config(tmp_path, f'--prompts=["1+2=", "{long}"]', "--task=null")
    fails(cfg, r"Prompt 1 has 43 tokens, and with max_new_tokens 6 needs 49 positions, more than engine\.max_seq_len "
          r"\(32\)\. Raise engine\.max_seq_len to 49")  # fmt: skip


def test_prompts_file_missing_unreadable_not_utf8_or_not_a_file(tmp_path):
    fails(config(tmp_path, f"--prompts_file={tmp_path / 'nope.txt'}"), r"`prompts_file` not found: .*nope.txt")
    (tmp_path / "dir.txt").mkdir()
    fails(config(tmp_path, f"--prompts_file={tmp_path / 'dir.txt'}"), r"`prompts_file` cannot be read: .* directory")
    path = write(tmp_path, "latin1.txt", "1+2=\ncafé\n".encode("latin-1"))
    fails(config(tmp_path, f"--prompts_file={path}"), r"is not UTF-8 \(line 2")
    os.symlink("/dev/zero", tmp_path / "zero.txt")  # would read until memory runs out
    fails(config(tmp_path, f"--prompts_file={tmp_path / 'zero.txt'}"), r"zero.txt is a \w+, not a file")


def test_txt_lines_split_at_newlines_only_and_blank_lines_are_refused(tmp_path):
    path = write(tmp_path, "p.txt", "1+2=\n3\u2028+4=\n5\f+6=\n".encode())
    from levanter_multihost.prompts import read_prompts

    assert read_prompts(file=path).texts == ["1+2=", "3\u2028+4=", "5\f+6="]
    path = write(tmp_path, "q.txt", b"1+2=\n\n3+4=\n")
    fails(config(tmp_path, f"--prompts_file={path}"), r"q.txt line 2 is blank. Every line is one prompt")


def test_malformed_jsonl_line_and_missing_or_doubled_prompt(tmp_path):
    path = write(tmp_path, "p.jsonl", b'{"prompt": "1+2="}\n{"prompt": "3+4="\n')
    fails(config(tmp_path, f"--prompts_file={path}"), r"p.jsonl line 2: malformed JSON")
    path = jsonl(tmp_path, [{"prompt": "1+2="}, {"text": "3+4="}], "q.jsonl")
    fails(config(tmp_path, f"--prompts_file={path}"), r"q.jsonl line 2: has neither `prompt` and `messages`")
    path = jsonl(tmp_path, [{"prompt": "1+2=", "messages": [{"role": "user", "content": "1+2="}]}], "r.jsonl")
    fails(config(tmp_path, f"--prompts_file={path}"), r"r.jsonl line 1: has both `prompt` and `messages`")
    path = jsonl(tmp_path, [{"question": "1+2="}], "s.jsonl")
    fails(config(tmp_path, f"--prompts_file={path}", "--prompt_field=text"), r"line 1: has neither `text`")


def test_a_column_that_clashes_with_an_output_field(tmp_path):
    path = jsonl(tmp_path, [{"prompt": "1+2=", "finish_reason": "x"}])
    fails(config(tmp_path, f"--prompts_file={path}"), r"line 1: column `finish_reason` clashes with the output field")


@pytest.mark.parametrize("column,value", [("max_new_tokens", 0), ("n_generations", -1), ("temperature", -1.0),
                                          ("max_new_tokens", 2.5), ("n_generations", True)])  # fmt: skip
def test_a_non_positive_or_non_integer_per_row_override(tmp_path, column, value):
    path = jsonl(tmp_path, [{"prompt": "1+2="}, {"prompt": "3+4=", column: value}])
    fails(config(tmp_path, f"--prompts_file={path}"), rf"line 2: `{column}` is {value!r}; it must be")


def test_a_lone_surrogate_in_a_jsonl_prompt_names_the_line(tmp_path):
    path = write(tmp_path, "p.jsonl", b'{"prompt": "1+2="}\n{"prompt": "3\\ud800+4="}\n')
    fails(config(tmp_path, f"--prompts_file={path}"), r"line 2: `prompt` holds a lone surrogate \(U\+D800")


def test_a_chat_prompt_without_a_template(tmp_path):
    tokenizer = tmp_path / "tok"
    shutil.copytree(TINY, tokenizer)
    settings = json.loads((tokenizer / "tokenizer_config.json").read_text())
    del settings["chat_template"]
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(settings))
    path = jsonl(tmp_path, [{"messages": [{"role": "user", "content": "1+2="}]}])
    fails(config(tmp_path, f"--prompts_file={path}", f"--tokenizer={tokenizer}"),
          r"Prompt 0 is a chat \(messages\), but the tokenizer has no chat template. Set chat_template")  # fmt: skip


@pytest.mark.parametrize(
    "flag,match",
    [
        ("--max_new_tokens=0", r"max_new_tokens \(0\) must be an integer > 0"),
        ("--temperature=-0.5", r"temperature \(-0.5\) must be a finite number >= 0"),
        ("--temperature=nan", r"temperature \(nan\) must be a finite number"),
        ("--temperature=inf", r"temperature \(inf\) must be a finite number"),
        ("--n_generations=0", r"n_generations \(0\) must be an integer > 0"),
        ("--silent_host_timeout_s=nan", r"silent_host_timeout_s \(nan\) must be a finite number of seconds"),
        ("--silent_host_timeout_s=inf", r"silent_host_timeout_s \(inf\) must be a finite"),
        ("--gather_chunk_bytes=0", r"gather_chunk_bytes \(0\) must be an integer >= 1"),
        ("--seed=18446744073709551616", r"seed \(18446744073709551616\) must be an integer in \[0, 2\*\*63 - 1\]"),
        ("--seed=-1", r"seed \(-1\) must be"),
        ("--batch_size=0", r"batch_size \(0\) must be an integer > 0"),
        ("--shard_strategy=random", r"shard_strategy \('random'\) must be one of \['contiguous', 'balanced'\]"),
        ("--output_format=csv", r"output_format \('csv'\) must be one of \['jsonl', 'parquet'\]"),
        ("--task=multiplication", r"task \('multiplication'\) is not a known task"),
        ("--trainer.model_axis_size=3", r"trainer.model_axis_size \(3\) does not divide this host's 4 devices"),
        ("--engine.auto_size=true", r"engine.auto_size is true, but it needs the HBM of the chips .* set tpu_type"),
    ],
)
def test_bad_values(tmp_path, flag, match):
    fails(config(tmp_path, flag), match)


def test_a_batch_size_the_engine_cannot_hold_names_the_largest_that_fits(tmp_path):
    fails(config(tmp_path, "--batch_size=300"), r"batch_size \(300\) is more sequences than one engine call completes "
          r"in one wave for these prompts: at most 256, set by engine.max_seqs \(256\)\. Set batch_size to 256")  # fmt: skip


def test_more_generations_than_slots_is_a_message_not_a_crash(tmp_path):
    fails(config(tmp_path, "--n_generations=257"), r"Prompt 0 asks for 257 generations, more than engine.max_seqs "
          r"\(256\) slots. Raise engine.max_seqs to 257")  # fmt: skip


def test_stop_strings(tmp_path):
    fails(config(tmp_path, '--stop_sequences=[""]'), r"stop_sequences entry '' tokenizes to nothing")
    fails(config(tmp_path, '--stop_sequences=["a"]'), r"stop_sequences entry 'a' tokenizes to the unknown token")
    five = '--stop_sequences=["1", "2", "3", "4"]'  # plus EOS: five stop sequences, the engine holds four
    fails(config(tmp_path, five), r"5 stop sequences \(stop strings and EOS ids\) are more than engine.max_stop_seqs "
          r"\(4\) holds")  # fmt: skip


def test_task_addition_with_other_prompts(tmp_path):
    fails(config(tmp_path, '--prompts=["1+2=", "what is 3+4?"]'), r"Prompt 1 \('what is 3\+4\?'\) is not an addition")


def test_a_missing_local_checkpoint_is_named_without_a_hub_lookup(tmp_path):
    fails(config(tmp_path, f"--hf_checkpoint={tmp_path / 'nowhere'}"), r"hf_checkpoint \(.*nowhere\) is not a directory")
    fails(config(tmp_path, "--hf_checkpoint=assets/no-such-model"), r"hf_checkpoint \(assets/no-such-model\) is not")


def test_output_dir_not_writable(tmp_path):
    blocker = write(tmp_path, "file", b"")
    fails(config(tmp_path, f"--output_dir={blocker}/sub"), r"output_dir \(.*file/sub\) is not writable")


def test_earlier_outputs_are_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "merged.jsonl").write_text('{"keep": true}\n')
    fails(config(tmp_path), r"output_dir \(.*out\) holds outputs of an earlier run \(merged.jsonl\). Set resume: true")
    assert (out / "merged.jsonl").read_text() == '{"keep": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["merged.jsonl"]


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    hf["vocab_size"] = 5
    (ckpt / "config.json").write_text(json.dumps(hf))
    fails(
        config(tmp_path, f"--hf_checkpoint={ckpt}"), r"The tokenizer has \d+ tokens but the model's vocabulary has 5"
    )
