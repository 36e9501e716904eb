"""Bytes per chip of a model's weights and KV cache on one host's mesh, from the model's real partition specs.

:func:`model_footprint` builds the model and one engine's KV cache abstractly (``eqx.filter_eval_shape``: shapes
only, no weights, no devices), asks haliax for each array's ``PartitionSpec`` under the trainer's
``compute_axis_mapping`` (``trainer.tensor_parallel_axes`` -> the ``model`` mesh axis), and divides each array
over a ``jax.sharding.AbstractMesh`` of ``(replica 1, data, model)`` axes, the shape ``model_loading.mesh_over``
gives a host. It runs for any ``model_axis_size`` without that many devices.

:func:`check_head_tiling` is pure Python: the head counts under which a sharding loads at all (JAX refuses uneven
shards) and under which the TPU ragged paged-attention kernel takes each shard's heads.

Leaves out: activations, compiled-program scratch, the kernel's VMEM, and the sampler's own buffers.
"""

from dataclasses import dataclass

MESH_AXES = ("replica", "data", "model")
"""Mesh axes of a host's mesh, in ``model_loading.mesh_over`` order."""

_HEAD_AXES = ("heads", "kv_head", "q_heads_per_group")


class ShardingConfigError(ValueError):
    """A sharding a user asked for cannot load or cannot run; names the field, the value and a value that works."""

    def __init__(self, field: str, value, message: str, suggested=None):
        super().__init__(message)
        self.field = field
        self.value = value
        self.suggested = suggested


class HeadTilingError(ShardingConfigError):
    """The head counts do not split over the model axis the way JAX and the TPU attention kernel need."""


@dataclass(frozen=True)
class ArrayFootprint:
    """One array of the model (or one page of one KV-cache array) and how it lies on a host's mesh."""

    name: str
    """Path in the model's pytree, e.g. ``transformer.layers.stacked.mlp.up_proj.weight``."""
    axes: tuple[str, ...]
    """haliax axis names, in array order."""
    shape: tuple[int, ...]
    """Global shape (for a KV page: the shape of one page's slice)."""
    spec: tuple
    """PartitionSpec entries per dimension: None (replicated), a mesh axis name, or a tuple of them."""
    bytes: int
    """Bytes of the whole array."""
    bytes_per_chip: int
    """Bytes one chip holds (every chip holds the same; an uneven split is counted at its padded size)."""

    @property
    def sharded(self) -> bool:
        """True when some dimension is split over a mesh axis of size > 1."""
        return self.bytes_per_chip < self.bytes


@dataclass(frozen=True)
class Indivisible:
    """A dimension whose size the mesh axes it is mapped to do not divide: JAX refuses to place such an array."""

    name: str
    """Array path."""
    axis: str
    """haliax axis name of the dimension."""
    size: int
    """Its size."""
    shards: int
    """Product of the mesh-axis sizes it is mapped to."""


@dataclass(frozen=True)
class Footprint:
    """Weights and one KV page, whole and per chip, on one host's mesh."""

    weight_bytes: int
    """All weights, in the compute dtype."""
    weight_bytes_per_chip: int
    """The most any one chip of the host's mesh holds of the weights."""
    kv_bytes_per_page: int
    """One KV page (all layers, K and V) in the cache dtype, whole."""
    kv_bytes_per_page_per_chip: int
    """The most any one chip holds of one KV page."""
    model_axis_size: int
    """Chips of the ``model`` mesh axis."""
    sharded_axes: tuple[str, ...]
    """Logical axes the mapping puts on the ``model`` axis (sorted)."""
    weights: tuple[ArrayFootprint, ...]
    """Every weight array."""
    kv_page: tuple[ArrayFootprint, ...]
    """Every KV-cache array's share of one page."""
    indivisible: tuple[Indivisible, ...]
    """Dimensions split unevenly; JAX 0.10.2 refuses these at load (``IndivisibleError``), so the run fails."""

    @property
    def weight_fraction_per_chip(self) -> float:
        """Share of the weights each chip holds: 1 / model_axis_size when all is sharded, 1 when nothing is."""
        return self.weight_bytes_per_chip / self.weight_bytes

    @property
    def kv_fraction_per_chip(self) -> float:
        """Share of the KV cache each chip holds."""
        return self.kv_bytes_per_page_per_chip / self.kv_bytes_per_page

    @property
    def replicated(self) -> tuple[str, ...]:
        """Names of the weights every chip holds whole."""
        return tuple(a.name for a in self.weights if not a.sharded)

    @property
    def replicated_weight_bytes(self) -> int:
        """Bytes of the weights every chip holds whole."""
        return sum(a.bytes for a in self.weights if not a.sharded)

    def kv_bytes_per_chip(self, pages: int) -> int:
        """KV cache bytes on one chip for an engine of ``pages`` pages (``engine.max_pages``)."""
        return pages * self.kv_bytes_per_page_per_chip


def model_footprint(
    model_config,
    vocab_size: int,
    axis_mapping: dict,
    model_axis_size: int,
    param_dtype,
    page_size: int,
    kv_dtype,
    *,
    data_axis_size: int = 1,
) -> Footprint:
    """Bytes of the weights and of one KV page, whole and per chip, from the model's partition specs.

    ``model_config`` is a Levanter ``LmConfig`` (``build(Vocab, key=...)`` and ``initial_cache``); ``vocab_size``
    is the Vocab the loader builds (an HF checkpoint's own size; Levanter checkpoints round it up with
    ``round_axis_for_partitioning``); ``axis_mapping`` is ``trainer.compute_axis_mapping``; ``param_dtype`` and
    ``kv_dtype`` are the compute dtype the loader casts floating weights to and the engine's cache dtype.
    ``data_axis_size`` is the host's chips / ``model_axis_size``; nothing of the model maps to it by default.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from haliax import Axis
    from levanter.inference.page_table import PageTable

    for name, value in (("trainer.model_axis_size", model_axis_size), ("data_axis_size", data_axis_size)):
        if not isinstance(value, int) or value < 1:
            raise ShardingConfigError(name, value, f"{name} is {value!r}; it must be a positive integer, e.g. 1.")
    mesh = jax.sharding.AbstractMesh((1, data_axis_size, model_axis_size), MESH_AXES)
    _check_mapping(axis_mapping)
    model = eqx.filter_eval_shape(model_config.build, Axis("vocab", vocab_size), key=jax.random.PRNGKey(0))
    param_itemsize = jnp.dtype(param_dtype).itemsize

    def itemsize(dtype) -> int:
        # the loader casts floating weights to the compute dtype (HF: load_pretrained(dtype=...);
        # Levanter checkpoints: mp.cast_to_compute); integer buffers keep theirs
        return param_itemsize if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(dtype).itemsize

    indivisible: list[Indivisible] = []
    weights = _arrays(model, axis_mapping, mesh, itemsize, indivisible)

    def cache(pages: int):
        # as InferenceEngine.from_model_with_config / _infer_max_pages_from_hbm allocate it; only the
        # spec's num_pages and page_size reach initial_cache, so one sequence of one page is enough
        table = PageTable.init(pages, 1, page_size, 1)
        return model.initial_cache(table.spec(), dtype=kv_dtype)

    # difference two page counts that every mesh axis divides, so a page axis mapped to a mesh axis stays even
    n = data_axis_size * model_axis_size
    kv_dtype_size = jnp.dtype(kv_dtype).itemsize
    small = _arrays(eqx.filter_eval_shape(cache, n), axis_mapping, mesh, lambda d: kv_dtype_size, indivisible)
    large = _arrays(eqx.filter_eval_shape(cache, 2 * n), axis_mapping, mesh, lambda d: kv_dtype_size, [])
    kv_page = tuple(_per_page(a, b, n) for a, b in zip(small, large) if b.bytes != a.bytes)

    sharded_axes = sorted(logical for logical, physical in axis_mapping.items() if "model" in _as_tuple(physical))
    return Footprint(
        weight_bytes=sum(a.bytes for a in weights),
        weight_bytes_per_chip=sum(a.bytes_per_chip for a in weights),
        kv_bytes_per_page=sum(a.bytes for a in kv_page),
        kv_bytes_per_page_per_chip=sum(a.bytes_per_chip for a in kv_page),
        model_axis_size=model_axis_size,
        sharded_axes=tuple(sharded_axes),
        weights=tuple(weights),
        kv_page=kv_page,
        indivisible=tuple(indivisible),
    )


def check_head_tiling(
    num_heads: int,
    num_kv_heads: int,
    model_axis_size: int,
    sharded_axes,
    *,
    kv_dtype_bytes: int = 2,
) -> None:
    """Raise :class:`HeadTilingError` unless the heads split over the model axis as Levanter, JAX and the TPU
    ragged paged-attention kernel need; ``sharded_axes`` is ``trainer.tensor_parallel_axes``.

    The error names the field, its value, what it breaks and a value that works: a divisor of
    ``model_axis_size`` (it then divides the host's chips too) or the axes without the offending one.
    """
    axes = sorted(set(sharded_axes))
    if kv_dtype_bytes not in (1, 2, 4):
        raise HeadTilingError(
            "engine.compute_dtype",
            kv_dtype_bytes,
            f"KV cache dtype of {kv_dtype_bytes} bytes: the TPU kernel packs 1-, 2- or 4-byte dtypes; use bfloat16.",
            2,
        )
    if model_axis_size < 1:
        raise HeadTilingError(
            "trainer.model_axis_size",
            model_axis_size,
            f"trainer.model_axis_size is {model_axis_size}; it must be >= 1, e.g. 1.",
            1,
        )
    problem = _head_problem(num_heads, num_kv_heads, model_axis_size, axes, kv_dtype_bytes)
    if problem is None:
        return
    why, culprit = problem
    if culprit is None:  # the model's own head counts: no sharding choice helps
        raise HeadTilingError("model.num_kv_heads", num_kv_heads, why, None)

    def works(size: int, candidate: list[str]) -> bool:
        return _head_problem(num_heads, num_kv_heads, size, candidate, kv_dtype_bytes) is None

    sizes = [m for m in range(model_axis_size - 1, 0, -1) if model_axis_size % m == 0 and works(m, axes)]
    # dropping the axis at fault; when the kernel refuses unsharded KV heads there is none to drop, and
    # sharding kv_head cannot help: for m in 1, 2, 4, 8 a count the kernel refuses stays refused divided by m
    alt = [a for a in axes if a != culprit] if culprit in axes else None
    alt = alt if alt is not None and works(model_axis_size, alt) else None
    fixes = [f"trainer.model_axis_size: {sizes[0]}"] if sizes else []
    fixes += [f"trainer.tensor_parallel_axes: {alt}"] if alt is not None else []
    fix = f" Set {' or '.join(fixes)}." if fixes else " No model axis size or head-axis choice fixes it."
    if sizes:
        raise HeadTilingError("trainer.model_axis_size", model_axis_size, why + fix, sizes[0])
    raise HeadTilingError("trainer.tensor_parallel_axes", axes, why + fix, alt)


def _head_problem(num_heads: int, num_kv_heads: int, m: int, axes: list[str], kv_bytes: int):
    """The first reason the heads do not tile, as (message, axis at fault), or None; the axis is None when the
    model's own head counts are at fault."""
    where = f"trainer.tensor_parallel_axes {axes} with trainer.model_axis_size {m}"
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        # levanter/layers/attention.py AttentionConfig.__post_init__ asserts it; the kernel's
        # static_validate_inputs raises "num_q_heads=... must be divisible by num_kv_heads=..."
        return (
            f"model.num_heads {num_heads} is not a multiple of model.num_kv_heads {num_kv_heads}; "
            f"num_kv_heads must divide num_heads (e.g. {_largest_divisor(num_heads, max(num_kv_heads, 1))}).",
            None,
        )
    if "kv_head" in axes and "q_heads_per_group" in axes:
        # both are dimensions of the query projection; a spec names a mesh axis once (JAX DuplicateSpecError)
        return (
            f"{where} shards kv_head and q_heads_per_group, both dimensions of the query projection, "
            "on the one model axis, which JAX refuses.",
            "q_heads_per_group",
        )
    counts = {"heads": num_heads, "kv_head": num_kv_heads, "q_heads_per_group": num_heads // num_kv_heads}
    for axis in _HEAD_AXES:
        # JAX 0.10.2 refuses uneven shards (IndivisibleError from _common_shard_shape, jax/_src/sharding.py)
        # when hax.shard device_puts the weights at load
        if axis in axes and counts[axis] % m:
            return (
                f"{where} splits {axis} ({counts[axis]}) {m} ways, which does not divide it; JAX refuses "
                "uneven shards when it places the weights.",
                axis,
            )
    # Levanter's _do_tpu_ragged_paged_attention shard_maps the kernel over kv_head: each chip gets
    # num_kv_heads / m KV heads, stored as 2x that many interleaved K/V "combined" heads, and
    # num_heads / m query heads (q's flattened head axis is named kv_head too, so they stay a whole
    # number of groups). Unsharded, each chip gets all of them.
    local_kv = num_kv_heads // (m if "kv_head" in axes else 1)
    combined = 2 * local_kv
    if not _kernel_tiles(combined, kv_bytes):
        packing = 4 // kv_bytes
        return (
            f"{where} leaves {local_kv} KV heads per chip ({combined} combined K/V heads of {kv_bytes}-byte "
            f"dtype), which the TPU ragged paged-attention kernel cannot tile: it needs the combined count to be "
            f"a multiple of {packing} whose quotient by {packing} is 1, 2, 4, 8 or a multiple of 8. Levanter then "
            "falls back to its reference attention (slow) with a warning.",
            "kv_head",
        )
    return None


def _kernel_tiles(num_combined_kv_heads: int, kv_bytes: int) -> bool:
    """``can_be_xla_fully_tiled`` in ``get_min_heads_per_blk`` (jax/experimental/pallas/ops/tpu/
    ragged_paged_attention/kernel.py), which raises "Not implemented: num_combined_kv_heads=... can not be XLA
    fully tiled"; packing is 32 bits / the dtype's bits (``get_dtype_packing``)."""
    packing = 4 // kv_bytes
    if num_combined_kv_heads % packing:
        return False
    x = num_combined_kv_heads // packing
    return x in (1, 2, 4, 8) or x % 8 == 0


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def _arrays(tree, axis_mapping, mesh, itemsize, indivisible: list) -> list[ArrayFootprint]:
    """Every array of an abstract pytree with its haliax partition spec and its bytes per chip on ``mesh``."""
    import jax
    from haliax import NamedArray
    from haliax.partitioning import pspec_for
    from jax.sharding import NamedSharding, PartitionSpec

    # the spec haliax gives each array when it shards the model (hax.shard) or a named_jit output (the cache)
    specs = pspec_for(tree, axis_mapping, preserve_existing_shardings=False)
    out: list[ArrayFootprint] = []

    def visit(path, leaf, spec):
        if isinstance(leaf, NamedArray):
            axes, array = tuple(a.name for a in leaf.axes), leaf.array
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            axes, array = tuple(f"dim{i}" for i in range(len(leaf.shape))), leaf
        else:
            return
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        shape, entries = tuple(array.shape), tuple(spec) if spec is not None else ()
        entries = entries + (None,) * (len(shape) - len(entries))
        _check_no_repeat(name, axes, entries, axis_mapping)
        factors = [_prod(mesh.shape[m] for m in _as_tuple(entry)) for entry in entries]
        uneven = [(ax, size, f) for ax, size, f in zip(axes, shape, factors) if size % f]
        if uneven:
            # JAX would raise IndivisibleError; count what a padded shard would hold and report it
            indivisible.extend(Indivisible(name, ax, size, f) for ax, size, f in uneven)
            local = tuple(-(-size // f) for size, f in zip(shape, factors))
        else:
            local = NamedSharding(mesh, PartitionSpec(*entries)).shard_shape(shape)
        size = itemsize(array.dtype)
        out.append(ArrayFootprint(name, axes, shape, entries, _prod(shape) * size, _prod(local) * size))

    jax.tree_util.tree_map_with_path(visit, tree, specs, is_leaf=lambda x: isinstance(x, NamedArray))
    return out


def _per_page(small: ArrayFootprint, large: ArrayFootprint, n: int) -> ArrayFootprint:
    """One page's share of a cache array, from the array at ``n`` and at ``2 n`` pages."""
    shape = tuple((b - a) // n if b != a else a for a, b in zip(small.shape, large.shape))
    return ArrayFootprint(
        small.name,
        small.axes,
        shape,
        small.spec,
        (large.bytes - small.bytes) // n,
        (large.bytes_per_chip - small.bytes_per_chip) // n,
    )


def _check_mapping(axis_mapping: dict) -> None:
    """Every physical axis of the mapping must exist on a host's mesh."""
    for logical, physical in axis_mapping.items():
        unknown = [p for p in _as_tuple(physical) if p not in MESH_AXES]
        if unknown:
            raise ShardingConfigError(
                "trainer.axis_resources",
                dict(axis_mapping),
                f"axis mapping sends {logical!r} to {unknown}, which a host's mesh does not have; "
                f"a host's mesh has {list(MESH_AXES)} (e.g. {logical}: model).",
            )


def _check_no_repeat(name: str, axes: tuple, entries: tuple, axis_mapping: dict) -> None:
    """A spec may name a mesh axis once (JAX ``DuplicateSpecError``, jax/_src/named_sharding.py).

    Llama's query projection is [kv_head, q_heads_per_group, head_size, embed]: sharding both head axes fails.
    """
    seen: dict[str, str] = {}
    for axis, entry in zip(axes, entries):
        for mesh_axis in _as_tuple(entry):
            if mesh_axis in seen:
                first = seen[mesh_axis]
                value = sorted(k for k, v in axis_mapping.items() if mesh_axis in _as_tuple(v))
                fixed = [a for a in value if a != axis]
                raise ShardingConfigError(
                    "trainer.tensor_parallel_axes",
                    value,
                    f"trainer.tensor_parallel_axes {value} puts both {first} and {axis} of {name} on the "
                    f"{mesh_axis!r} mesh axis, and JAX maps a mesh axis to one dimension of an array only. "
                    f"Use {fixed}.",
                    fixed,
                )
            seen[mesh_axis] = axis


def _as_tuple(physical) -> tuple:
    if physical is None:
        return ()
    return (physical,) if isinstance(physical, str) else tuple(physical)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out
