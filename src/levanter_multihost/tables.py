"""Aligned text tables, for the run's per-host table and the bench scripts. No JAX import."""

from collections.abc import Sequence
from typing import Any


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]], totals: dict[str, Any] | None = None
) -> str:
    """Right-aligned columns under a rule; ``columns`` are (key, title, format), a missing value prints ``-``;
    ``totals``, if given, is a last row under a second rule."""
    header = [title for _, title, _ in columns]

    def cells(row: dict[str, Any]) -> list[str]:
        return [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns]

    body = [cells(r) for r in rows] + ([cells(totals)] if totals is not None else [])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *body]]
    rule = "  ".join("-" * w for w in widths)
    lines.insert(1, rule)
    if totals is not None:
        lines.insert(len(lines) - 1, rule)
    return "\n".join(lines)
