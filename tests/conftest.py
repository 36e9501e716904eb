"""Shared set-up: JAX on several CPU devices, offline hubs and wandb, and the multi-host runs many tests share.

Each multi-host run below starts real processes (``infra/launch.py --local_hosts N``) that form one JAX
distributed job on loopback; it runs once per session and many tests assert on its outputs.
"""

import json
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
from multihost import REPO, compile_cache_env, launch, run_in_process

TINY = REPO / "assets" / "tiny-addition"
FEATURE_ROWS = [
    {"prompt": "12+30=", "id": "r0", "answer": "42"},
    {"messages": [{"role": "user", "content": "7+5="}], "id": "r1", "answer": "12"},
    {"prompt": "100+23=", "id": "r2", "max_new_tokens": 3},
    {"prompt": "2269+795=", "id": "r3", "temperature": 0.0},
    {"prompt": "9+9=", "id": "r4", "n_generations": 3},
    {"prompt": "4821+377=", "id": "r5", "meta": {"source": "held-out", "tags": ["a", "b"]}},
    {"messages": [{"role": "system", "content": "1"}, {"role": "user", "content": "5+5="}], "id": "r6"},
    {"prompt": "999+1=", "id": "r7", "answer": None},
    {"prompt": "58+67=", "id": "r8", "top_p": 0.8, "seed": 2**40 + 3},
    {"prompt": "3+4=", "id": "r9", "top_k": 2, "min_p": 0.05},
]
"""Text and chat prompts, carried columns of several types, and per-row overrides (sampling controls and a 64-bit
seed included)."""
FEATURE_FLAGS = (
    "--temperature=0.8",
    "--seed=7",
    "--n_generations=2",
    '--stop_sequences=["9", "0"]',
    "--logprobs=true",
    "--max_new_tokens=6",
    "--gather_chunk_bytes=512",
    "--trainer.model_axis_size=1",
    "--task=null",
)
"""Sampled, several generations, two stop strings (plus EOS), log-probabilities, tiny store chunks."""


SHARED_RUNS = {"greedy_4x4": "greedy", "greedy_2x4": "greedy", "features_3": "features", "features_1": "features"}
"""The session's multi-host runs below, by group: the modules whose tests use a group's runs go to one xdist
worker, so each run happens once. (``greedy_1x4`` runs in the test process in seconds: a worker needing it makes
its own.)"""
HEAVIEST_FIRST = ("greedy", "test_faults", "test_replicas", "features", "test_models")
"""The groups with the longest work (``--durations``), handed out first so the two workers finish close together."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the group marks into node-id suffixes
def pytest_collection_modifyitems(items):
    """Every multi-host test is slow: the fast lane (``-m "not slow"``) leaves them all out.

    Under xdist (``-n 2 --dist loadgroup``, pyproject.toml) a test goes to a worker with its whole group: a module's
    tests together (its module-scoped runs happen once), the modules sharing session runs together; the longest
    groups go first.
    """
    for item in items:
        if item.get_closest_marker("multihost") is not None:
            item.add_marker(pytest.mark.slow)
    groups: dict[str, str] = {}
    for item in items:
        for name in item.fixturenames:
            if name in SHARED_RUNS:
                groups.setdefault(item.module.__name__, SHARED_RUNS[name])
    tiers = {}  # a module's tier: 0 multi-host, 1 slow, 2 the rest
    for item in items:
        tier = 0 if item.get_closest_marker("multihost") else 1 if item.get_closest_marker("slow") else 2
        tiers[item.module.__name__] = min(tier, tiers.get(item.module.__name__, 2))

    def group(item) -> str:
        return groups.get(item.module.__name__, item.module.__name__)

    def weight(item) -> tuple[int, int]:
        name = group(item)
        return (
            (HEAVIEST_FIRST.index(name), 0) if name in HEAVIEST_FIRST else (len(HEAVIEST_FIRST), tiers.get(name, 0))
        )

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=weight)  # stable: a module keeps its order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Stop before any test if xdist did not group them (no ``@group`` suffix on the node ids): each worker would run
    the shared multi-host runs again (pytest 9.2 with xdist 3.8: pytest-dev/pytest-xdist#1386)."""
    if node.config.getoption("dist") == "loadgroup" and ids and "@" not in ids[0]:
        pytest.exit("pytest-xdist did not group the tests: keep pytest as pinned in pyproject.toml, or use -n 0.", 4)


@pytest.fixture(scope="session", autouse=True)
def shared_compile_cache(tmp_path_factory):
    """One persistent compilation cache for every run of the session, on every xdist worker (its base temp is under
    the session's): each program compiles once, whichever worker needs it first."""
    root = tmp_path_factory.getbasetemp()
    cache = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "jax_cache"
    cache.mkdir(exist_ok=True)
    os.environ.update(compile_cache_env(cache))
    return cache


@pytest.fixture(scope="session")
def greedy_4x4(tmp_path_factory):
    """The README's job: 4 hosts x 4 devices, 256 prompts, greedy, one batch per host, tracked to wandb (offline)."""
    out = tmp_path_factory.mktemp("greedy_4x4")
    wandb_dir = tmp_path_factory.mktemp("wandb")
    tracker = [
        "--trainer.tracker.type",
        "wandb",
        "--trainer.tracker.mode=offline",  # key by key, as a user types
        "--trainer.tracker.project=levanter-multihost-test",
        "--trainer.tracker.tags=[host-dp, test]",
    ]
    run = launch(out, *tracker, "--run_name=readme-job", hosts=4, env_extra={"WANDB_DIR": str(wandb_dir)})
    run.wandb_dir = wandb_dir
    return run


@pytest.fixture(scope="session")
def greedy_2x4(tmp_path_factory):
    """The same on 2 hosts in batches of 24 sequences (6 per host), into a ``file://`` URL, logging compilations to
    show the programs come from the 4x4 run's cache entries."""
    out = tmp_path_factory.mktemp("greedy_2x4")
    run = launch(f"file://{out}", "--batch_size=24", hosts=2, env_extra={"JAX_LOG_COMPILES": "1"})
    run.output_dir = out
    return run


@pytest.fixture(scope="session")
def greedy_1x4(tmp_path_factory):
    """The same on 1 host (in this process, 4 devices) in batches of 100, with only heads and mlp sharded (q/k/v,
    vocab and the KV cache whole)."""
    out = tmp_path_factory.mktemp("greedy_1x4")
    return run_in_process(out, "--batch_size=100", '--trainer.tensor_parallel_axes=["heads", "mlp"]')


@pytest.fixture(scope="session")
def eos_checkpoint(tmp_path_factory):
    """The tiny model with a generation_config.json whose EOS ids are </s> and "." (the answer's terminator)."""
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny-eos"
    shutil.copytree(TINY, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 18]}))
    return ckpt


@pytest.fixture(scope="session")
def feature_inputs(tmp_path_factory):
    """FEATURE_ROWS as a .jsonl file, a .parquet file and a Hugging Face dataset directory."""
    import datasets
    import pandas as pd

    folder = tmp_path_factory.mktemp("inputs")
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FEATURE_ROWS))
    frame = pd.DataFrame(FEATURE_ROWS)
    frame.to_parquet(folder / "rows.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(folder / "rows_dataset"))
    return folder


def _features(tmp_path_factory, eos_checkpoint, hosts: int, source: str, *flags: str):
    out = tmp_path_factory.mktemp(f"features_{hosts}")
    return launch(
        out, f"--hf_checkpoint={eos_checkpoint}", source, *FEATURE_FLAGS, *flags, hosts=hosts, devices_per_host=1
    )


@pytest.fixture(scope="session")
def features_3(tmp_path_factory, eos_checkpoint, feature_inputs):
    """FEATURE_ROWS from JSONL on 3 hosts, sharded by cost, each host reading only its share of the file."""
    source = f"--prompts_file={feature_inputs / 'rows.jsonl'}"
    return _features(
        tmp_path_factory, eos_checkpoint, 3, source, "--shard_strategy=balanced", "--per_host_input_min_bytes=0"
    )


@pytest.fixture(scope="session")
def features_1(tmp_path_factory, eos_checkpoint, feature_inputs):
    """The same from a dataset directory on 1 host (in this process, 4 devices), in batches of 3 sequences, merged
    into merged.parquet; the dataset read as per-host input (its scan, then its rows memory-mapped)."""
    out = tmp_path_factory.mktemp("features_1")
    source = f"--prompts_dataset={feature_inputs / 'rows_dataset'}"
    flags = [f for f in FEATURE_FLAGS if not f.startswith("--trainer.model_axis_size")]
    return run_in_process(
        out,
        f"--hf_checkpoint={eos_checkpoint}",
        source,
        "--prompts_file=null",
        *flags,
        "--batch_size=3",
        "--output_format=parquet",
        "--per_host_input_min_bytes=0",
    )
