"""How every `nubis` command prints: rich tables for people, JSON or YAML for scripts.

In JSON and YAML mode stdout carries only the document; notes for people go to
stderr, and so does an error, as a document too (code, reason, message, field
violations). `-c COLUMN` (repeatable) keeps only those columns or fields. Table
cells show enum values without their type prefix (`UP`, not `NODE_STATE_UP`).
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table
from rich.text import Text


class OutputFormat(enum.StrEnum):
    """The value of the global `-o/--output` option."""

    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


Row = Mapping[str, Any]


def message_to_row(message: Message) -> dict[str, Any]:
    """A protobuf message as a plain dict with the field names of the .proto."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@dataclass
class Output:
    """The printer of one CLI invocation."""

    format: OutputFormat = OutputFormat.TABLE
    columns: Sequence[str] = ()
    """`-c`: the only columns (fields of a record) to print, in this order; empty: all."""
    console: Console = field(default_factory=Console)
    err: Console = field(default_factory=lambda: Console(stderr=True))

    @property
    def json(self) -> bool:
        """Machine-readable output (JSON or YAML): nothing but the document on stdout."""
        return self.format is not OutputFormat.TABLE

    def _pick(self, row: Row) -> dict[str, Any]:
        if not self.columns:
            return dict(row)
        return {column: row.get(column) for column in self.columns}

    def table(self, rows: Sequence[Row], columns: Sequence[str], *, title: str | None = None,
              headers: Mapping[str, str] | None = None) -> None:
        """Print rows: a table with `columns` in order, or a JSON list of the rows."""
        if self.json:
            self.emit_json([self._pick(row) for row in rows])
            return
        table = Table(title=title, title_justify="left")
        columns = self.columns or columns
        for column in columns:
            table.add_column((headers or {}).get(column, column.upper().replace("_", " ")))
        for row in rows:
            table.add_row(*(Text(_cell(row.get(column))) for column in columns))
        self.console.print(table)

    def record(self, row: Row, *, title: str | None = None) -> None:
        """Print one object: a two-column field/value table, or a JSON object."""
        if self.json:
            self.emit_json(self._pick(row))
            return
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in self._pick(row).items():
            table.add_row(Text(key), Text(_cell(value)))
        self.console.print(table)

    def emit_json(self, data: Any) -> None:
        """`data` as the JSON (or, with `-o yaml`, YAML) document on stdout."""
        # Plain write, not rich: the document must reach scripts byte for byte.
        self.console.file.write(self._document(data, sort_keys=not self.columns))

    def _document(self, data: Any, *, sort_keys: bool = True) -> str:
        """Keys sorted (a stable document), but in `-c` order when columns were picked."""
        if self.format is OutputFormat.YAML:
            plain = json.loads(json.dumps(data, default=str))
            return str(yaml.safe_dump(plain, sort_keys=sort_keys, default_flow_style=False))
        return json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n"

    def note(self, text: str) -> None:
        """A message for people; kept off stdout in JSON mode."""
        (self.err if self.json else self.console).print(text, soft_wrap=True)

    def error(self, text: str, document: Mapping[str, Any] | None = None) -> None:
        """One error line on stderr, printed verbatim (no markup interpretation); with
        `-o json|yaml` and a `document`, that document instead, under an "error" key."""
        if self.json and document is not None:
            self.err.file.write(self._document({"error": dict(document)}))
            return
        self.err.print(text, markup=False, highlight=False, soft_wrap=True)


# An enum value as protobuf names it: TYPE_PREFIX_VALUE (NODE_STATE_UP, POWER_STATE_RUNNING).
_ENUM_PREFIXES = re.compile(
    r"^(?:NODE_STATE|POWER_STATE|TASK_STATE|STATE|DISK_FORMAT|VISIBILITY|DIRECTION|ETHER_TYPE|"
    r"EVENT_TYPE|PROVIDER_TYPE|KEY_TYPE|POLICY|STATUS|KIND|TYPE|ROLE|MODE)_(?=[A-Z0-9])")


def enum_label(value: str) -> str:
    """`NODE_STATE_UP` -> `UP`: the value of a proto enum as a person reads it."""
    if value.isupper() and value.replace("_", "").isalnum():
        return _ENUM_PREFIXES.sub("", value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, str):
        return enum_label(value)
    return str(value)
