"""Markdown, LaTeX and HTML tables, as ``compare`` and ``status`` print them, and the counts they give."""
from __future__ import annotations

import html
import re
from typing import Iterable, Sequence

# What LaTeX reads as markup in text, spelled so that it prints as itself.
LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "−": r"$-$"}
NUMERIC = re.compile(r"[-+−±\d.,\[\] ]*")  # a cell of numbers (an error, an interval, a count) or "-"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table. A ``|`` in a cell (a run's path, an image folder's name) is escaped and a
    line break made a space, so that every value stays in its own column."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(_cell(c) for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _cell(value: object) -> str:
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def latex_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a LaTeX ``tabular`` in booktabs rules (``\\usepackage{booktabs}``): every cell's text escaped
    (a setting's ``_``, an error's ``±``), columns of numbers set right, the others left."""
    rows = [[" ".join(str(c).splitlines()) for c in r] for r in rows]
    align = "".join("r" if rows and all(NUMERIC.fullmatch(r[i]) for r in rows) else "l" for i in range(len(header)))

    def line(cells: Sequence[str]) -> str:
        return " & ".join("".join(LATEX_ESCAPES.get(ch, ch) for ch in str(c)) for c in cells) + r" \\"
    return [rf"\begin{{tabular}}{{{align}}}", r"\toprule", line(header), r"\midrule", *(line(r) for r in rows),
            r"\bottomrule", r"\end{tabular}"]


def html_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An HTML table, every cell's text escaped."""
    def line(cells: Sequence[object], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells) + "</tr>"
    return "<table>\n" + "\n".join([line(header, "th"), *(line(r, "td") for r in rows)]) + "\n</table>"


def in_millions(count: float) -> str:
    """A count of multiply-adds in millions: whole, as papers give them (528), or two digits for a network
    below ten million (0.46), which a whole number would give as 0."""
    m = count / 1e6
    return f"{m:.0f}" if m >= 10 else f"{m:.2g}"
