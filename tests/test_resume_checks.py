"""A resume trusts no row on disk: every row read back must be one this run writes, or the resume is refused before
anything is sampled, naming the file and line; overwrite replaces an earlier run only once its own merge is in.

One real run (in-process, one host, 12 prompts in 3 batches) makes the directory each case copies and tampers with.
"""

import json
import shutil

import draccus
import pytest
from multihost import TINY_CONFIG, cache_flags, read_jsonl

from levanter_multihost import model_loading
from levanter_multihost.errors import UserError
from levanter_multihost.sample_lm_multihost import SampleLmMultihostConfig, main

pytestmark = pytest.mark.slow  # the real engine in this process

PROMPTS = (
    '["12+30=", "7+5=", "100+23=", "2269+795=", "9+9=", "4821+377=", "15+5=", "999+1=", "58+67=", "3+4=", '
    '"1+1=", "20+22="]'
)


def config(out, *args: str) -> SampleLmMultihostConfig:
    base = [
        f"--output_dir={out}",
        f"--prompts={PROMPTS}",
        "--batch_size=4",
        "--trainer.model_axis_size=1",
        "--overwrite=false",
        *cache_flags(),
    ]
    return draccus.parse(SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=[*base, *args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    main(config(out))
    return out


@pytest.fixture
def copy(finished, tmp_path, monkeypatch):
    """A copy of the finished run without its merged output; loading the model fails the test."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "merged.jsonl").unlink()

    def trap(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad row was caught")

    monkeypatch.setattr(model_loading, "load_model", trap)
    return out


def parts(out):
    return sorted((out / "parts").glob("*.jsonl"))


def edit(path, line: int, change) -> None:
    """Apply ``change`` to the row on ``line`` (1-based) of ``path``, keeping every other line's bytes."""
    lines = path.read_bytes().split(b"\n")
    row = json.loads(lines[line - 1])
    change(row)
    lines[line - 1] = json.dumps(row, ensure_ascii=False).encode()
    path.write_bytes(b"\n".join(lines))


def refused(out, match: str):
    with pytest.raises(UserError, match=match):
        main(config(out, "--resume=true"))
    assert not (out / "merged.jsonl").exists()


def test_the_finished_run_resumes_to_the_same_output_sampling_nothing(finished, copy):
    main(config(copy, "--resume=true"))  # the model loader is a trap: nothing may be sampled
    assert (copy / "merged.jsonl").read_bytes() == (finished / "merged.jsonl").read_bytes()
    assert json.loads((copy / "summary.json").read_text())["hosts"][0]["rows_kept"] == 12


def test_tampered_text_is_named_by_file_and_line(copy):
    edit(parts(copy)[1], 2, lambda r: r.update(generated_text="TAMPERED"))
    refused(copy, r"0000000004-0000000007\..*\.jsonl line 2: its generated_text do not follow from its token ids")


def test_an_edited_prompt_is_refused(copy):
    edit(parts(copy)[0], 1, lambda r: r.update(prompt="13+30="))
    refused(copy, r"line 1: its prompt differs from prompt 0 of the input")


def test_a_row_forged_for_another_prompt_is_refused(copy):
    first, second = parts(copy)[:2]
    forged = read_jsonl(second)[0]  # prompt 4's row, put into the part of prompts 0-3
    first.write_bytes(first.read_bytes() + (json.dumps(forged, ensure_ascii=False) + "\n").encode())
    refused(copy, r"0000000000-0000000003\..*line 5: prompt 4 is outside the part's range 0-3")


def test_a_token_count_that_disagrees_with_the_ids_is_refused(copy):
    edit(parts(copy)[2], 3, lambda r: r.update(generated_token_count=r["generated_token_count"] - 1))
    refused(copy, r"line 3: its generated_token_count do not follow from its token ids")


def test_a_generation_out_of_range_is_refused_before_sampling(copy):
    edit(parts(copy)[0], 2, lambda r: r.update(generation_index=5))
    refused(copy, r"line 2: generation 5 is out of range \(n_generations 1\)")


def test_a_truncated_last_line_names_file_and_line(copy):
    part = parts(copy)[1]
    part.write_bytes(part.read_bytes()[:-20])
    refused(copy, r"0000000004-0000000007\..*\.jsonl: does not end with a newline \(truncated\?\)")


def test_a_row_in_two_parts_is_refused(copy):
    first = parts(copy)[0]
    (copy / "parts" / first.name.replace(".h0000b000000.", ".h0000b000009.")).write_bytes(first.read_bytes())
    refused(copy, r"line 1: \(prompt, generation\) \(0, 0\) is also in .*")


def test_precision_is_part_of_the_fingerprint(copy):
    with pytest.raises(UserError, match=r"Cannot resume: .*differs in \['precision'\]"):
        main(config(copy, "--resume=true", "--trainer.mp=p=f32,c=bfloat16"))


def test_overwrite_that_fails_before_sampling_leaves_every_earlier_file(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"Prompt 1 \('not addition'\) is not an addition problem"):
        main(config(out, "--overwrite=true", '--prompts=["1+2=", "not addition"]'))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
