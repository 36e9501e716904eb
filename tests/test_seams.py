"""Every seam of levanter_multihost.seams over the pinned dependencies, checked on CPU without a TPU.

    uv run pytest tests/test_seams.py

Ragged attention: Levanter's TPU branch is reached by making ``jax.default_backend()`` report "tpu" and replacing
JAX's Pallas kernel with a recorder; the reference branch runs for real on small arrays.
"""

import functools

import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compiler, distributed
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as pallas_module
from jax.sharding import Mesh
from levanter.layers import attention

from levanter_multihost import seams
from levanter_multihost.seams import (
    RaggedAttentionConfig,
    SeamError,
    apply_ragged_attention,
    check_ragged_attention_seam,
)

SEED_KNOBS = RaggedAttentionConfig(q_block_size=16, kv_block_pages=8)


@pytest.fixture(autouse=True)
def restore_levanter_kernel(monkeypatch):
    """Undo whatever a test installs in Levanter's module global."""
    monkeypatch.setattr(attention, "tpu_ragged_paged_attention", attention.tpu_ragged_paged_attention)


@pytest.fixture
def recorder(monkeypatch):
    """Stand in for the Pallas kernel (same signature): record keyword arguments, return ones (the reference
    never does)."""
    calls = []

    @functools.wraps(pallas_module.ragged_paged_attention)
    def kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **kwargs):
        calls.append(kwargs)
        return jnp.ones_like(q)

    monkeypatch.setattr(pallas_module, "ragged_paged_attention", kernel)
    return calls


@pytest.fixture
def on_tpu(monkeypatch):
    """Make Levanter's ``_tpu_rpa_available`` see a TPU backend."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")


@functools.cache
def small_inputs():
    """Two sequences of 2 new tokens each over 4 pages of 4 slots; one KV head, two query heads."""
    rng = np.random.default_rng(0)
    q_axes = (
        hax.Axis("position", 4),
        hax.Axis("kv_head", 1),
        hax.Axis("q_heads_per_group", 2),
        hax.Axis("head_size", 8),
    )
    kv_axes = (hax.Axis("page", 4), hax.Axis("slot", 4), hax.Axis("kv_head", 2), hax.Axis("head_size", 8))
    q = hax.named(jnp.asarray(rng.standard_normal([a.size for a in q_axes]), jnp.float32), q_axes)
    kv_pages = hax.named(jnp.asarray(rng.standard_normal([a.size for a in kv_axes]), jnp.float32), kv_axes)
    seq = hax.Axis("seq", 2)
    kv_lens = hax.named(jnp.array([3, 5], jnp.int32), seq)
    page_indices = hax.named(jnp.array([[0, 1], [2, 3]], jnp.int32), (seq, hax.Axis("page", 2)))
    cu_q_lens = hax.named(jnp.array([0, 2, 4], jnp.int32), hax.Axis("seq", 3))
    return q, kv_pages, kv_lens, page_indices, cu_q_lens, jnp.array(2, jnp.int32)


def levanter_attention():
    """Levanter's ragged paged attention on the small inputs, inside a one-device mesh (its shard_map needs one)."""
    with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("data",))):
        return attention.ragged_paged_attention(*small_inputs(), sm_scale=0.5).array


@functools.cache
def reference_attention():
    q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs = small_inputs()
    return attention.default_ragged_paged_attention(
        q, kv_pages, kv_lens, page_indices, cu_q_lens.array, num_seqs, sm_scale=0.5
    ).array


def test_pinned_levanter_still_has_what_the_seam_relies_on():
    import inspect

    assert check_ragged_attention_seam() is attention
    parameters = inspect.signature(seams.pallas_kernel()).parameters
    for name in ("num_queries_per_block", "num_kv_pages_per_block", "vmem_limit_bytes", "sm_scale", "soft_cap"):
        assert name in parameters, name


def test_seam_fails_loudly_naming_the_missing_symbol_and_versions(monkeypatch):
    monkeypatch.delattr(attention, "_do_tpu_ragged_paged_attention")
    with pytest.raises(SeamError, match=r"_do_tpu_ragged_paged_attention is gone \(installed: levanter 1\.2"):
        apply_ragged_attention(SEED_KNOBS)


def test_seam_fails_loudly_when_the_kernel_loses_a_knob(monkeypatch):
    monkeypatch.setattr(pallas_module, "ragged_paged_attention", lambda q, *, sm_scale=1.0, soft_cap=None: q)
    with pytest.raises(SeamError, match="no parameter.*num_queries_per_block"):
        check_ragged_attention_seam()


def test_tpu_branch_calls_the_kernel_with_the_configured_blocks(recorder, on_tpu):
    apply_ragged_attention(SEED_KNOBS)
    out = levanter_attention()
    assert recorder == [{"num_queries_per_block": 16, "num_kv_pages_per_block": 8, "sm_scale": 0.5, "soft_cap": None}]
    assert np.all(np.asarray(out) == 1.0), "Levanter fell back to the reference path instead of the kernel"


def test_vmem_limit_reaches_the_kernel_and_unset_knobs_keep_its_defaults(recorder, on_tpu):
    apply_ragged_attention(RaggedAttentionConfig(vmem_limit_bytes=64 * 1024 * 1024))
    levanter_attention()
    assert recorder == [{"vmem_limit_bytes": 64 * 1024 * 1024, "sm_scale": 0.5, "soft_cap": None}]


def test_applying_twice_does_not_stack(recorder, on_tpu):
    apply_ragged_attention(RaggedAttentionConfig(q_block_size=32))
    kernel = apply_ragged_attention(SEED_KNOBS)
    assert isinstance(kernel, functools.partial) and kernel.func is pallas_module.ragged_paged_attention
    assert kernel.keywords == {"num_queries_per_block": 16, "num_kv_pages_per_block": 8}


def test_disabled_routes_to_the_reference_implementation(recorder, on_tpu):
    assert apply_ragged_attention(RaggedAttentionConfig(enabled=False, q_block_size=16, kv_block_pages=8)) is None
    out = levanter_attention()
    assert recorder == []
    np.testing.assert_array_equal(out, reference_attention())


def test_cpu_run_gives_identical_outputs_with_either_setting(caplog):
    caplog.set_level("INFO", logger=seams.__name__)
    apply_ragged_attention(SEED_KNOBS)
    assert "not TPU: Levanter's reference ragged paged attention runs" in caplog.text
    with_knobs = levanter_attention()
    apply_ragged_attention(RaggedAttentionConfig(enabled=False))
    np.testing.assert_array_equal(with_knobs, levanter_attention())
    np.testing.assert_array_equal(with_knobs, reference_attention())


@pytest.mark.parametrize("field,value", [("q_block_size", 0), ("kv_block_pages", -8), ("vmem_limit_bytes", "64M")])
def test_bad_knob_values_name_field_value_and_fix(field, value):
    with pytest.raises(ValueError, match=rf"ragged_attention\.{field} is .*positive integer or null"):
        RaggedAttentionConfig(**{field: value})


# -- the compilation-cache writer ----------------------------------------------------------------------------------


@pytest.fixture
def recorded_cache_writes(monkeypatch):
    """JAX's cache writer replaced by one that records the process id it sees; this process posing as host 3."""
    seen = []
    monkeypatch.setattr(
        compiler, "_cache_write", lambda *args: seen.append((args, distributed.global_state.process_id))
    )
    monkeypatch.setattr(distributed.global_state, "process_id", 3)
    return seen


def test_every_host_writes_its_cache_entries_through_jax_own_writer(recorded_cache_writes):
    seams.every_host_writes_compilation_cache()
    compiler._cache_write("key", 1.5)
    assert recorded_cache_writes == [(("key", 1.5), 0)]  # JAX's writer sees the id it writes for
    assert distributed.global_state.process_id == 3  # and the host keeps its own


def test_every_host_writes_wraps_once(recorded_cache_writes):
    seams.every_host_writes_compilation_cache()
    wrapped = compiler._cache_write
    seams.every_host_writes_compilation_cache()
    assert compiler._cache_write is wrapped


def test_a_moved_cache_writer_fails_loudly(monkeypatch):
    monkeypatch.delattr(compiler, "_cache_write")
    with pytest.raises(SeamError, match=r"_cache_write .* is gone \(installed: .*jax 0\.10\.2"):
        seams.every_host_writes_compilation_cache()
    assert not hasattr(compiler, "_cache_write")


# -- Equinox's checks as NaN poisoning, and the key-value store client ---------------------------------------------


def test_equinox_checks_poison_instead_of_raising_unless_the_environment_says(monkeypatch):
    import equinox as eqx
    from equinox import _errors

    monkeypatch.setattr(_errors, "EQX_ON_ERROR", _errors.EQX_ON_ERROR)
    monkeypatch.delenv("EQX_ON_ERROR", raising=False)
    assert seams.checks_as_nan() == "nan"
    poisoned = jax.jit(lambda x: eqx.error_if(x, x > 0, "positive"))(jnp.float32(1.0))
    assert np.isnan(poisoned)
    monkeypatch.setenv("EQX_ON_ERROR", "raise")
    assert seams.checks_as_nan() == "raise"


def test_equinox_seam_fails_loudly_when_the_global_moves(monkeypatch):
    from equinox import _errors

    monkeypatch.delattr(_errors, "EQX_ON_ERROR")
    with pytest.raises(SeamError, match="EQX_ON_ERROR"):
        seams.checks_as_nan()


def test_distributed_client_is_none_without_jax_distributed_and_guarded(monkeypatch):
    assert seams.distributed_client() is None
    monkeypatch.delattr(type(distributed.global_state), "client")  # a class attribute until initialize() sets it
    with pytest.raises(SeamError, match="global_state.client is gone"):
        seams.distributed_client()


def test_install_runs_every_config_free_seam(monkeypatch):
    from equinox import _errors

    monkeypatch.setattr(_errors, "EQX_ON_ERROR", "raise")
    monkeypatch.delenv("EQX_ON_ERROR", raising=False)
    seams.install()
    assert _errors.EQX_ON_ERROR == "nan"
