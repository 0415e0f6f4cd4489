"""Markdown tables, as ``compare`` and ``status`` print them, and the counts they give."""
from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table. A ``|`` in a cell (a run's path, an image folder's name) is escaped and a
    line break made a space, so that every value stays in its own column."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(_cell(c) for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _cell(value: object) -> str:
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def in_millions(count: float) -> str:
    """A count of multiply-adds in millions: whole, as papers give them (528), or two digits for a network
    below ten million (0.46), which a whole number would give as 0."""
    m = count / 1e6
    return f"{m:.0f}" if m >= 10 else f"{m:.2g}"
