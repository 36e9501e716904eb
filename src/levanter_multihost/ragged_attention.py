"""Knobs of the TPU ragged paged-attention kernel used by Levanter's paged decode.

Covers the configuration only for now; applying it to Levanter's kernel call is the seam described in
docs/tpu.md.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class RaggedAttentionConfig:
    enabled: bool = True
    """Use the TPU ragged Pallas kernel when on TPU. False forces Levanter's reference implementation."""
    q_block_size: int | None = None
    """Queries per kernel block (Pallas ``num_queries_per_block``); None keeps the kernel's default."""
    kv_block_pages: int | None = None
    """KV pages per kernel block (Pallas ``num_kv_pages_per_block``); None keeps the kernel's default."""
    vmem_limit_bytes: int | None = None
    """Scoped VMEM limit for the kernel; None keeps the kernel's default."""
