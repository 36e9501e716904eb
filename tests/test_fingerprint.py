"""The run fingerprint changes when the rows would and only then: locations spelled one way, the checkpoint's
content (not its path or its copy), and every setting besides sampling that changes a row or the output schema.
Resolved without a model (seconds)."""

import shutil

import draccus
import pytest
from multihost import REPO, TINY_CONFIG

from levanter_multihost.config import SampleLmMultihostConfig
from levanter_multihost.fingerprint import canonical_location, checkpoint_digest
from levanter_multihost.resolution import resolve

TINY = REPO / "assets" / "tiny-addition"


def fields(tmp_path, *args: str) -> dict:
    config = draccus.parse(
        SampleLmMultihostConfig, config_path=str(TINY_CONFIG), args=[f"--output_dir={tmp_path / 'out'}", *args]
    )
    return resolve(config, host=0, num_hosts=1, local_devices=4).fingerprint


def differ(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.mark.parametrize(
    "a,b",
    [("./assets/x", "assets/x"), ("assets//x/", "assets/x"), ("gs://b//x/", "gs://b/x"), ("org/name", "org/name")],
)
def test_a_location_is_spelled_one_way(a, b):
    assert canonical_location(a) == canonical_location(b)


def test_the_same_checkpoint_spelled_another_way_is_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert (
        differ(
            fields(tmp_path, "--hf_checkpoint=./assets/tiny-addition"),
            fields(tmp_path, "--hf_checkpoint=assets/tiny-addition"),
        )
        == []
    )


def test_a_copy_of_the_checkpoint_has_its_digest_and_new_weights_at_the_same_path_do_not(tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(TINY, copy)
    (copy / ".cache").mkdir()
    (copy / ".cache" / "download-metadata").write_text("a time stamp of this copy")
    (copy / "README.md").write_text("a different model card")
    assert checkpoint_digest(str(copy)) == checkpoint_digest(str(TINY))
    before = fields(tmp_path, f"--hf_checkpoint={copy}")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = bytes((b + 1) % 256 for b in data[header:])  # retrained: same shapes, same size, other values
    weights.write_bytes(bytes(data))
    assert differ(before, fields(tmp_path, f"--hf_checkpoint={copy}")) == ["checkpoint_digest"]
    assert checkpoint_digest("meta-llama/Llama-3.1-8B") is None  # a hub id: its name and revision say which


@pytest.mark.parametrize(
    "flag,field",
    [
        ("--engine.compute_dtype=bfloat16", "compute_dtype"),
        ("--trainer.model_axis_size=2", "model_axis_size"),
        ("--output_format=parquet", "output_format"),
    ],
)
def test_every_setting_that_changes_a_row_or_the_schema_is_in_the_fingerprint(tmp_path, flag, field):
    assert differ(fields(tmp_path), fields(tmp_path, flag)) == [field]
