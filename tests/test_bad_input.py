"""Bad input fails before the model loads, with one error naming the field, prompt, file line or column and the
fix, and touches no output.

Each case runs the real entrypoint in-process (one host) with model loading booby-trapped.
"""

import json
import logging
import os
import re
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
    fails(
        config(tmp_path, f"--prompts_dataset={tmp_path}"),
        r"Both `prompts_file` \(.*addition_256.txt\) and "
        r"`prompts_dataset` \(.*\) are set. Set one, e.g. --prompts_file null",
    )


def test_no_prompts(tmp_path):
    fails(config(tmp_path, "--prompts_file=null"), r"No prompts: set `prompts`")
    fails(config(tmp_path, "--prompts_file=null", "--prompts=[]"), r"No prompts: the prompt source is empty")


def test_empty_string_prompt(tmp_path):
    fails(config(tmp_path, '--prompts=["1+2=", ""]'), r"`prompts`\[1\]: `prompt` is an empty string")


def test_prompt_longer_than_the_engine_allows(tmp_path):
    long = "1" * 40 + "+1="
    cfg = config(tmp_path, f'--prompts=["1+2=", "{long}"]', "--task=null")
    fails(
        cfg,
        r"Prompt 1 has 43 tokens, and with max_new_tokens 6 needs 49 positions, more than engine\.max_seq_len "
        r"\(32\)\. Raise engine\.max_seq_len to 49",
    )


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


@pytest.mark.parametrize(
    "column,value",
    [
        ("max_new_tokens", 0),
        ("n_generations", -1),
        ("temperature", -1.0),
        ("max_new_tokens", 2.5),
        ("n_generations", True),
        ("max_new_tokens", 3_000_000_000),
        ("n_generations", 2**40),
        ("temperature", 1e39),
    ],
)
def test_a_non_positive_or_non_integer_or_overflowing_per_row_override(tmp_path, column, value):
    path = jsonl(tmp_path, [{"prompt": "1+2="}, {"prompt": "3+4=", column: value}])
    fails(config(tmp_path, f"--prompts_file={path}"), rf"line 2: `{column}` is {re.escape(repr(value))}; it must be")


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
    fails(
        config(tmp_path, f"--prompts_file={path}", f"--tokenizer={tokenizer}"),
        r"Prompt 0 is a chat \(messages\), but the tokenizer has no chat template. Set chat_template",
    )


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
        ("--gather_chunk_bytes=0", r"gather_chunk_bytes \(0\) must be an integer >= 512"),
        ("--gather_chunk_bytes=1", r"gather_chunk_bytes \(1\) must be an integer >= 512"),
        ("--silent_host_timeout_s=0.01", r"silent_host_timeout_s \(0.01\) must be a finite number of seconds >= 5"),
        ("--max_new_tokens=3000000000", r"max_new_tokens \(3000000000\) is over 2147483647 \(2\*\*31 - 1\)"),
        ("--n_generations=1099511627776", r"n_generations \(1099511627776\) is over 2147483647"),
        (
            "--temperature=1e39",
            r"temperature \(1e\+39\) overflows float32 \(at most 3.4e\+38\): it would sample as inf",
        ),
        ("--trainer.model_axis_size=0", r"trainer.model_axis_size \(0\) must be an integer >= 1"),
        ("--trainer.model_axis_size=-1", r"trainer.model_axis_size \(-1\) must be an integer >= 1"),
        (
            "--prompts_file=foo://x/p.txt",
            r"prompts_file \(foo://x/p.txt\): no filesystem serves the URL scheme foo://",
        ),
        ("--output_dir=foo://x/out", r"output_dir \(foo://x/out\): no filesystem serves the URL scheme foo://"),
        ("--hf_checkpoint=foo://x/ckpt", r"hf_checkpoint \(foo://x/ckpt\): no filesystem serves the URL scheme"),
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
    fails(
        config(tmp_path, "--batch_size=300"),
        r"batch_size \(300\) is more sequences than one engine call completes "
        r"in one wave for these prompts: at most 256, set by engine.max_seqs \(256\)\. Set batch_size to 256",
    )


def test_more_generations_than_slots_is_a_message_not_a_crash(tmp_path):
    fails(
        config(tmp_path, "--n_generations=257"),
        r"Prompt 0 asks for 257 generations, more than engine.max_seqs "
        r"\(256\) slots. Raise engine.max_seqs to 257",
    )


def test_stop_strings(tmp_path):
    fails(config(tmp_path, '--stop_sequences=[""]'), r"stop_sequences entry '' tokenizes to nothing")
    fails(config(tmp_path, '--stop_sequences=["a"]'), r"stop_sequences entry 'a' tokenizes to the unknown token")
    five = '--stop_sequences=["1", "2", "3", "4"]'  # plus EOS: five stop sequences, the engine holds four
    fails(
        config(tmp_path, five),
        r"5 stop sequences \(stop strings and EOS ids\) are more than engine.max_stop_seqs "
        r"\(4\) holds",
    )


def test_task_addition_with_other_prompts(tmp_path):
    fails(config(tmp_path, '--prompts=["1+2=", "3+4+5="]'), r"Prompt 1 \('3\+4\+5='\) is not an addition")


def test_a_missing_local_checkpoint_is_named_without_a_hub_lookup(tmp_path):
    fails(
        config(tmp_path, f"--hf_checkpoint={tmp_path / 'nowhere'}"), r"hf_checkpoint \(.*nowhere\) is not a directory"
    )
    fails(config(tmp_path, "--hf_checkpoint=assets/no-such-model"), r"hf_checkpoint \(assets/no-such-model\) is not")


def test_output_dir_not_writable(tmp_path):
    blocker = write(tmp_path, "file", b"")
    fails(config(tmp_path, f"--output_dir={blocker}/sub"), r"output_dir \(.*file/sub\) is not writable")


def test_earlier_outputs_are_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "merged.jsonl").write_text('{"keep": true}\n')
    fails(
        config(tmp_path), r"output_dir \(.*out\) holds outputs of an earlier run \(merged.jsonl\). Set resume: true"
    )
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


@pytest.mark.parametrize(
    "output_dir,match",
    [
        ("memory://bad_input/out", r"output_dir \(memory://bad_input/out\) is in this process's memory"),
        ("", r"output_dir is empty"),
    ],
)
def test_an_output_dir_that_would_not_keep_the_outputs(tmp_path, output_dir, match):
    fails(config(tmp_path, f"--output_dir={output_dir}"), match)


@pytest.mark.parametrize("name", ["merged.jsonl", "run.json", ".lock"])
def test_an_output_path_that_is_a_directory(tmp_path, name):
    (tmp_path / "out" / name).mkdir(parents=True)
    fails(config(tmp_path), rf"out/{re.escape(name)} is a directory, but this run writes a file there")


def checkpoint_with(tmp_path, config_json: str):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY, ckpt)
    (ckpt / "config.json").write_text(config_json)
    return ckpt


def test_a_checkpoint_config_that_is_not_json_or_lacks_vocab_size(tmp_path):
    ckpt = checkpoint_with(tmp_path, "{not json")
    fails(
        config(tmp_path, f"--hf_checkpoint={ckpt}"), r"ckpt/config.json has no readable vocab_size \(JSONDecodeError"
    )
    hf = json.loads((TINY / "config.json").read_text())
    del hf["vocab_size"]
    (ckpt / "config.json").write_text(json.dumps(hf))
    fails(config(tmp_path, f"--hf_checkpoint={ckpt}"), r"ckpt/config.json has no readable vocab_size \(KeyError")


def test_a_tokenizer_directory_without_a_tokenizer(tmp_path):
    (tmp_path / "tok").mkdir()
    shutil.copy(TINY / "config.json", tmp_path / "tok")
    fails(config(tmp_path, f"--tokenizer={tmp_path / 'tok'}"), r"tokenizer \(.*tok\) does not load as a tokenizer")


@pytest.mark.parametrize("template", ["{% if %}", "{{ messages[0].nope.x }}"])
def test_a_broken_chat_template(tmp_path, template):
    path = jsonl(tmp_path, [{"messages": [{"role": "user", "content": "1+2="}]}])
    fails(
        config(tmp_path, f"--prompts_file={path}", "--task=null", f'--chat_template="{template}"'),
        r"Prompt 0: the chat template fails on its messages \((TemplateSyntaxError|UndefinedError)",
    )


def test_a_carried_column_whose_type_varies_is_refused_for_parquet_output_only(tmp_path):
    path = jsonl(
        tmp_path,
        [{"prompt": "1+2=", "id": 1, "meta": {"tags": ["a"]}}, {"prompt": "3+4=", "id": 2, "meta": {"tags": [3]}}],
    )
    fails(
        config(tmp_path, f"--prompts_file={path}", "--output_format=parquet"),
        r"Prompt 1: carried column `meta.tags\[\]` is a number, but a string in earlier prompts: Parquet holds one "
        r"type per column.* set output_format: jsonl",
    )
    from levanter_multihost import checks
    from levanter_multihost.prompts import read_prompts

    checks.check_carried_columns(read_prompts(file=path), "jsonl")  # JSON lines hold any mix


def test_a_bytes_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"prompt": ["1+2="], "blob": [b"\x00\x01"]}), path)
    fails(config(tmp_path, f"--prompts_file={path}"), r"row 0: column `blob` holds bytes")


def test_a_dataset_split_that_does_not_exist(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["1+2="]}).save_to_disk(str(tmp_path / "ds"))
    fails(
        config(tmp_path, "--prompts_file=null", f"--prompts_dataset={tmp_path / 'ds'}", "--prompts_split=test"),
        r"`prompts_dataset` .*ds has no split 'test'. Set prompts_split",
    )


@pytest.mark.parametrize("text,what", [("\ufeff", "only"), ("\x00", "only"), ("1+\u00e92=", "partly")])
def test_a_prompt_the_tokenizer_cannot_spell_is_refused_with_its_index_unless_allowed(tmp_path, text, what):
    path = jsonl(tmp_path, [{"prompt": "1+2="}, {"prompt": text}])
    fails(
        config(tmp_path, f"--prompts_file={path}", "--task=null"),
        rf"Prompt 1 becomes {what} the unknown token '<unk>': the tokenizer cannot spell .* allow_unknown_tokens",
    )
    from levanter_multihost.resolution import resolve

    cfg = config(tmp_path, f"--prompts_file={path}", "--task=null", "--allow_unknown_tokens=true")
    assert len(resolve(cfg, 0, 1, 4).prompts) == 2


def test_repeated_keys_in_a_jsonl_row_or_the_config_file_and_broken_yaml_name_the_line(tmp_path):
    path = write(tmp_path, "p.jsonl", b'{"prompt": "1+2="}\n{"prompt": "3+4=", "prompt": "5+6="}\n')
    fails(config(tmp_path, f"--prompts_file={path}"), r"p.jsonl line 2: the key 'prompt' appears twice")
    from levanter_multihost.config import parse_command_line

    repeated = write(tmp_path, "c.yaml", b"seed: 1\nengine:\n  max_seqs: 4\n  max_seqs: 8\n")
    with pytest.raises(UserError, match=r"The config repeats the key 'max_seqs' \(lines 3 and 4\)"):
        parse_command_line(["--config_path", repeated])
    broken = write(tmp_path, "b.yaml", b"max_new_tokens: 4\n  prompts: [\n")
    with pytest.raises(
        UserError, match=r"b.yaml line 2, column 10 is not valid YAML: mapping values are not allowed"
    ):
        parse_command_line(["--config_path", broken])


def test_repeated_ids_are_warned_about_once(tmp_path, caplog):
    from levanter_multihost import checks
    from levanter_multihost.prompts import read_prompts

    records = read_prompts(
        prompts=[
            {"prompt": "1+2=", "id": 7},
            {"prompt": "3+4=", "id": 7},
            {"prompt": "5+6=", "id": "x"},
            {"prompt": "7+8=", "id": "x"},
        ]
    )
    with caplog.at_level(logging.WARNING):
        checks.check_carried_columns(records, "jsonl")
    assert [r.getMessage() for r in caplog.records] == [
        "2 `id` values repeat across prompts (e.g. 7); rows are told apart by global_prompt_index."
    ]


def test_a_checkpoint_that_cannot_be_listed_is_one_line(monkeypatch):
    from levanter_multihost import fingerprint

    class NoCredentials:
        def isdir(self, path):
            raise RuntimeError("401 Anonymous caller does not have storage.objects.list access\n" + "  frame\n" * 50)

    monkeypatch.setattr(fingerprint.fsspec.core, "url_to_fs", lambda location: (NoCredentials(), location))
    with pytest.raises(UserError) as error:
        fingerprint.checkpoint_digest("gs://bucket/ckpt")
    assert str(error.value) == (
        "The checkpoint gs://bucket/ckpt cannot be listed: 401 Anonymous caller does not have "
        "storage.objects.list access. Check the path and, for a bucket, the credentials here."
    )
