"""Lines and tables of the `status` commands, drawn with rich when it is installed.

rich comes with the `report` extra, which a daemon installed alone does not have; its `status`
command then prints the same lines and tables as plain aligned text. Text is never parsed as
markup, so a model or agent name with brackets in it prints as it is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import TYPE_CHECKING, TextIO, TypeAlias

if TYPE_CHECKING:
    from rich.console import Console

Styled: TypeAlias = tuple[str, str]
"""Text and the rich style to draw it in (`"bold"`, `"red"`); plain text leaves the style out."""
Part: TypeAlias = str | Styled

COLUMN_GAP = "  "


@dataclass(frozen=True, slots=True)
class Column:
    """A table column; `no_wrap` keeps rich from wrapping its cells on a narrow terminal."""

    header: str
    no_wrap: bool = False


@dataclass(slots=True)
class TextTable:
    """A titled table of text cells; a cell may hold several lines."""

    title: str
    columns: tuple[Column, ...]
    rows: list[tuple[Part, ...]] = field(default_factory=list)

    @classmethod
    def of(cls, title: str, *columns: str | Column) -> TextTable:
        """A table with these columns, given as headers or as `Column`s."""
        return cls(title, tuple(c if isinstance(c, Column) else Column(c) for c in columns))

    def add_row(self, *cells: Part) -> None:
        """Append a row: one cell per column."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(cells)


def _text(part: Part) -> str:
    return part if isinstance(part, str) else part[0]


def plain_table(table: TextTable) -> list[str]:
    """The table as lines of plain text: title, headers, a rule, then the rows, left-aligned."""
    grid = [[column.header for column in table.columns]]
    grid += [[_text(cell) for cell in row] for row in table.rows]
    split = [[cell.splitlines() or [""] for cell in row] for row in grid]
    widths = [max(len(line) for row in split for line in row[i]) for i in range(len(grid[0]))]
    lines = [table.title]
    for number, row in enumerate(split):
        for parts in zip_longest(*row, fillvalue=""):
            cells = (part.ljust(width) for part, width in zip(parts, widths, strict=True))
            lines.append(COLUMN_GAP.join(cells).rstrip())
        if number == 0:
            lines.append(COLUMN_GAP.join("-" * width for width in widths))
    return lines


class Screen:
    """Where a `status` command writes: rich's console, or plain text when rich is missing.

    `plain=True` forces plain text; `console` draws on a rich console of the caller's (a demo's).
    `file` defaults to the `sys.stdout` of the moment of writing.
    """

    def __init__(
        self, file: TextIO | None = None, *, plain: bool = False, console: Console | None = None
    ) -> None:
        self._file = file
        self._console = console
        if not plain and console is None:
            try:
                from rich.console import Console
            except ImportError:
                pass
            else:
                self._console = Console(file=file)

    @property
    def plain(self) -> bool:
        """True when this screen writes plain text."""
        return self._console is None

    def line(self, *parts: Part) -> None:
        """Write one line made of `parts`."""
        if self._console is None:
            self._write("".join(_text(part) for part in parts))
            return
        from rich.text import Text

        self._console.print(Text.assemble(*parts))

    def table(self, table: TextTable) -> None:
        """Write a table under its title."""
        if self._console is None:
            self._write("\n".join(plain_table(table)))
            return
        from rich.table import Table
        from rich.text import Text

        drawn = Table(title=Text(table.title), title_justify="left")
        for column in table.columns:
            drawn.add_column(Text(column.header), no_wrap=column.no_wrap)
        for row in table.rows:
            drawn.add_row(*(Text.assemble(cell) for cell in row))
        self._console.print(drawn)

    def _write(self, text: str) -> None:
        print(text, file=self._file or sys.stdout)
