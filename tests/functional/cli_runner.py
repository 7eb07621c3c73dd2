"""The `nubis` command line run in-process against real servers, as one caller.

Each command runs the real CLI (`services.client.cli.run`) in a worker thread
with its own event loop, as the console script would, while the servers keep
serving on the test's loop; stdout and stderr come from pytest's capture, less
the log lines the in-process servers print meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from services.client import cli

# A server's log line: console format (a timestamp first) or one JSON object per line.
# The CLI's own JSON is indented, so none of its lines looks like either.
_LOG_LINE = re.compile(r'^(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d|\{".*\}$)')


@dataclass
class Nubis:
    """`nubis ...` with one token and the services' addresses."""

    capsys: pytest.CaptureFixture[str]
    lab_dir: Path

    @classmethod
    def configure(cls, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                  lab_dir: Path, token: str, **addresses: str) -> Nubis:
        """A runner whose commands send `token` and dial `addresses` (identity=, network=...)."""
        monkeypatch.setenv("XDG_CONFIG_HOME", str(lab_dir))
        monkeypatch.setenv("COLUMNS", "200")
        for service, address in addresses.items():
            monkeypatch.setenv(f"NUBIS_{service.upper()}_ADDR", address)
        return cls(capsys, lab_dir).as_token(token, lab_dir)

    def as_token(self, token: str, lab_dir: Path) -> Nubis:
        """The same CLI sending another token (its credentials kept in `lab_dir`)."""
        lab_dir.mkdir(parents=True, exist_ok=True)
        (lab_dir / "credentials.json").write_text(json.dumps({"token": token}))
        return Nubis(self.capsys, lab_dir)

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of one command."""
        self.capsys.readouterr()
        code = await asyncio.to_thread(cli.run, cli.app,
                                       ["--lab-dir", str(self.lab_dir), *argv])
        out, err = self.capsys.readouterr()
        return code, _without_logs(out), _without_logs(err)

    async def json(self, *argv: str) -> Any:
        """The JSON a command prints with `-o json`; the command must succeed."""
        code, out, err = await self("-o", "json", *argv)
        assert code == 0, err
        return json.loads(out)

    async def fails(self, *argv: str) -> str:
        """The one error line of a command that must fail."""
        code, out, err = await self(*argv)
        assert code == 1, out + err
        assert "Traceback" not in err
        return err.strip()


def _without_logs(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not _LOG_LINE.match(line))
