"""What every `nubis` command knows about its invocation: the output format, and where the
cloud is and who calls it (services.client.sdk.config, which the SDK reads the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import typer

from services.client.output import Output
from services.client.sdk.config import (
    CLOUDS_FILE,
    CREDENTIALS_FILE,
    DEFAULT_LAB_DIR,
    LAB_CONFIG_FILE,
    CloudConfig,
    default_lab_dir,
    user_config_dir,
)

__all__ = ["CLOUDS_FILE", "CREDENTIALS_FILE", "DEFAULT_LAB_DIR", "LAB_CONFIG_FILE", "CliContext",
           "default_lab_dir", "get", "user_config_dir"]


@dataclass
class CliContext(CloudConfig):
    """Shared by the sub-commands through `typer.Context.obj`."""

    output: Output = field(default_factory=Output)


def get(ctx: typer.Context) -> CliContext:
    """The CliContext of this invocation (a default one when a sub-app runs on its own)."""
    root = ctx.find_root()
    if not isinstance(root.obj, CliContext):
        root.obj = CliContext()
    return root.obj
