"""Bad input fails before the model loads, with an error naming the field, prompt or file line, and touches no output.

Each case runs the real entrypoint in-process (one host) with model loading booby-trapped.
"""

import dataclasses
import json
import subprocess
import sys

import draccus
import pytest
from multihost import REPO, TINY_CONFIG, host_env

from levanter_multihost import model_loading
from levanter_multihost.sample_lm_multihost import SampleLmMultihostConfig, main


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was caught")

    monkeypatch.setattr(model_loading, "load_model", trap)


def config(tmp_path, *args: str) -> SampleLmMultihostConfig:
    base = [f"--output_dir={tmp_path / 'out'}", "--overwrite=false"]
    return draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=[*base, *args])


def fails(cfg, match: str):
    with pytest.raises(ValueError, match=match):
        main(cfg)


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_no_prompts(tmp_path):
    fails(config(tmp_path, "--prompts_file=null"), r"No prompts: set `prompts`")
    fails(config(tmp_path, "--prompts_file=null", "--prompts=[]"), r"No prompts: `prompts` is empty")


def test_empty_string_prompt(tmp_path):
    fails(config(tmp_path, "--prompts_file=null", '--prompts=["1+2=", ""]'), r"Prompt 1 is an empty string")


def test_prompt_longer_than_the_engine_allows(tmp_path):
    long = "1" * 40 + "+1="
    cfg = config(tmp_path, "--prompts_file=null", f'--prompts=["1+2=", "{long}"]')
    fails(cfg, r"Prompt 1 has 43 tokens, more than max_seq_len - max_new_tokens \(32 - 6 = 26\)")


def test_prompts_file_missing_unreadable_or_not_utf8(tmp_path):
    fails(config(tmp_path, f"--prompts_file={tmp_path / 'nope.txt'}"), r"`prompts_file` not found: .*nope.txt")
    (tmp_path / "dir.txt").mkdir()
    fails(config(tmp_path, f"--prompts_file={tmp_path / 'dir.txt'}"), r"`prompts_file` cannot be read")
    path = write(tmp_path, "latin1.txt", "1+2=\ncafé\n".encode("latin-1"))
    fails(config(tmp_path, f"--prompts_file={path}"), r"is not UTF-8 \(line 2")


def test_malformed_jsonl_line_and_missing_field(tmp_path):
    path = write(tmp_path, "p.jsonl", b'{"prompt": "1+2="}\n{"prompt": "3+4="\n')
    fails(config(tmp_path, f"--prompts_file={path}"), r"p.jsonl line 2: malformed JSON")
    path = write(tmp_path, "q.jsonl", b'{"prompt": "1+2="}\n\n{"text": "3+4="}\n')
    fails(config(tmp_path, f"--prompts_file={path}"), r"q.jsonl line 3: no `prompt` field")


def test_both_prompts_and_prompts_file(tmp_path):
    fails(config(tmp_path, '--prompts=["1+2="]'), r"Both `prompts` and `prompts_file` are set")


@pytest.mark.parametrize(
    "flag,match",
    [
        ("--max_new_tokens=0", r"max_new_tokens \(0\) must be > 0"),
        ("--temperature=-0.5", r"temperature \(-0.5\) must be >= 0"),
        ("--n_generations=0", r"n_generations \(0\) must be >= 1"),
        ("--defer_tracker_logs_until_end=false", r"defer_tracker_logs_until_end is false.*Set defer_tracker"),
    ],
)
def test_bad_values(tmp_path, flag, match):
    fails(config(tmp_path, flag), match)


def test_unknown_config_key_exits_nonzero_naming_it(tmp_path):
    bad = write(tmp_path, "bad.yaml", TINY_CONFIG.read_bytes() + b"\nmax_new_tokenz: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "levanter_multihost.sample_lm_multihost", "--config_path", bad],
        cwd=REPO, env=host_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "max_new_tokenz" in proc.stderr


def test_output_dir_not_writable(tmp_path):
    blocker = write(tmp_path, "file", b"")
    fails(config(tmp_path, f"--output_dir={blocker}/sub"), r"output_dir \(.*file/sub\) is not writable")


def test_existing_merged_output_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "merged.jsonl").write_text('{"keep": true}\n')
    fails(config(tmp_path), r"merged.jsonl exists from an earlier run. Set resume: true")
    assert (out / "merged.jsonl").read_text() == '{"keep": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["merged.jsonl"]


def test_stop_sequence_that_tokenizes_to_nothing(tmp_path):
    fails(dataclasses.replace(config(tmp_path), stop_sequence=""), r"stop_sequence \(''\) tokenizes to nothing")


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in (REPO / "assets" / "tiny-addition").iterdir():
        if f.is_file():
            (ckpt / f.name).write_bytes(f.read_bytes())
    hf = json.loads((ckpt / "config.json").read_text())
    hf["vocab_size"] = 5
    (ckpt / "config.json").write_text(json.dumps(hf))
    fails(
        config(tmp_path, f"--hf_checkpoint={ckpt}"), r"The tokenizer has \d+ tokens but the model's vocabulary has 5"
    )
