"""Tables of already formatted cells, as plain text or Markdown: the one table formatter of
the project (profile, the latency table, the demo, the benchmark report, bench/matrix.py).

Plain text: columns as wide as their widest cell (header included), two spaces apart, cells
right-aligned (numbers line up), a dashed rule under the header::

    width  median ms  p90 ms
    -----  ---------  ------
    0.35x       2.63    2.75

Markdown: ``| a | b |`` rows with an alignment row (``---:`` right, ``---`` left).

``align``: one character per column, ``"r"`` (default) or ``"l"``; imports nothing of
slimops.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

__all__ = ["markdown_table", "text_table"]


def _checked(header: Sequence[str], rows: Sequence[Sequence[str]],
             align: Optional[str]) -> tuple:
    header = [str(h) for h in header]
    cells = [[str(c) for c in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells for {len(header)} columns")
    align = "r" * len(header) if align is None else align
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align must be one 'l' or 'r' per column ({len(header)}), "
                         f"got {align!r}")
    return header, cells, align


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]],
               align: Optional[str] = None) -> str:
    """The header, a dashed rule and the rows, columns two spaces apart (no trailing
    newline)."""
    header, cells, align = _checked(header, rows, align)
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(header)]

    def line(row: List[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(row, widths, align))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)]
                     + [line(r) for r in cells])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Optional[str] = None) -> str:
    """A Markdown (GitHub) table: header, alignment row, rows (no trailing newline)."""
    header, cells, align = _checked(header, rows, align)

    def line(row: List[str]) -> str:
        return "| " + " | ".join(row) + " |"

    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([line(header), rule] + [line(r) for r in cells])
