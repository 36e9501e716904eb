"""The key-value store that everything crossing hosts goes through: the part of JAX's distributed client used,
and an in-memory stand-in for a single process (and the tests). No JAX import."""

import threading
from typing import Protocol


class KeyValueClient(Protocol):
    """The part of JAX's ``DistributedRuntimeClient`` used here."""

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None: ...

    def key_value_try_get_bytes(self, key: str) -> bytes: ...

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes: ...

    def key_value_delete(self, key: str) -> None: ...


class InMemoryKeyValue:
    """A single-process stand-in for the JAX key-value store (one host, no ``jax.distributed``)."""

    def __init__(self):
        self.store: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def key_value_set_bytes(self, key: str, value: bytes, allow_overwrite: bool = False) -> None:
        with self.lock:
            if key in self.store and not allow_overwrite:
                raise RuntimeError(f"ALREADY_EXISTS: key {key} already set")
            self.store[key] = bytes(value)

    def key_value_try_get_bytes(self, key: str) -> bytes:
        with self.lock:
            if key not in self.store:
                raise RuntimeError(f"NOT_FOUND: key {key}")
            return self.store[key]

    def blocking_key_value_get_bytes(self, key: str, timeout_in_ms: int) -> bytes:
        return self.key_value_try_get_bytes(key)

    def key_value_delete(self, key: str) -> None:
        with self.lock:
            self.store.pop(key, None)
