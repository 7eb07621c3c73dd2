"""Every `nubis` command, option and argument says what it is for in `--help`."""

from __future__ import annotations

from typing import Any

import typer.main

from services.client import cli


def _walk(command: Any, path: str) -> list[tuple[str, Any]]:
    found = [(path, command)]
    if hasattr(command, "commands"):  # a group (typer vendors its own click)
        for name, sub in command.commands.items():
            found += _walk(sub, f"{path} {name}")
    return found


def _missing_help() -> list[str]:
    missing: list[str] = []
    for path, command in _walk(cli.with_default_help(typer.main.get_command(cli.app)), "nubis"):
        if not (command.help or command.short_help):
            missing.append(path)
        for param in command.params:
            if param.name in ("help", "install_completion", "show_completion"):
                continue
            if not getattr(param, "help", None):
                missing.append(f"{path} {param.name}")
    return missing


def test_every_command_option_and_argument_has_help() -> None:
    assert _missing_help() == []
