"""The keys of a nested config dataclass, and the closest ones to a key the command line got wrong. No JAX."""

import dataclasses
import difflib
import re


def with_closest_keys(message: str, known: list[str]) -> str:
    """``message`` and, for each unknown key in it, the closest of the ``known`` keys."""
    unknown = re.findall(r"`([\w.]+)`", message) + re.findall(r"--([\w.]+)", message)
    hints = []
    for key in dict.fromkeys(unknown):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            close = close or difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=3)
            hints.append(f"`{key}`: did you mean {' or '.join(close)}?" if close else f"`{key}` is not a key.")
    return f"{message}. {' '.join(hints)}" if hints else message


def keys(config, prefix: str = "") -> list[str]:
    """Every key of ``config``, nested ones dotted (``engine.max_seqs``)."""
    found = []
    for f in dataclasses.fields(config):
        found.append(prefix + f.name)
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found += keys(value, f"{prefix}{f.name}.")
    return found
