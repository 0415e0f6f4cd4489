"""Markdown tables, as ``compare`` and ``status`` print them."""
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
