"""How every `nubis` command prints: rich tables for people, JSON (`-o json`) for scripts.

In JSON mode stdout carries only the JSON document; notes for people go to stderr.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text


class OutputFormat(enum.StrEnum):
    """The value of the global `-o/--output` option."""

    TABLE = "table"
    JSON = "json"


Row = Mapping[str, Any]


def message_to_row(message: Message) -> dict[str, Any]:
    """A protobuf message as a plain dict with the field names of the .proto."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@dataclass
class Output:
    """The printer of one CLI invocation."""

    format: OutputFormat = OutputFormat.TABLE
    console: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))

    @property
    def json(self) -> bool:
        return self.format is OutputFormat.JSON

    def table(self, rows: Sequence[Row], columns: Sequence[str], *, title: str | None = None,
              headers: Mapping[str, str] | None = None) -> None:
        """Print rows: a table with `columns` in order, or a JSON list of the rows."""
        if self.json:
            self.emit_json([dict(row) for row in rows])
            return
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column((headers or {}).get(column, column.upper().replace("_", " ")))
        for row in rows:
            table.add_row(*(Text(_cell(row.get(column))) for column in columns))
        self.console.print(table)

    def record(self, row: Row, *, title: str | None = None) -> None:
        """Print one object: a two-column field/value table, or a JSON object."""
        if self.json:
            self.emit_json(dict(row))
            return
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")
        for key, value in row.items():
            table.add_row(Text(key), Text(_cell(value)))
        self.console.print(table)

    def emit_json(self, data: Any) -> None:
        # Plain print, not rich: the JSON must reach scripts byte for byte.
        self.console.file.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def note(self, text: str) -> None:
        """A message for people; kept off stdout in JSON mode."""
        (self.err if self.json else self.console).print(text, soft_wrap=True)

    def error(self, text: str) -> None:
        """One error line on stderr, printed verbatim (no markup interpretation)."""
        self.err.print(text, markup=False, highlight=False, soft_wrap=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)
