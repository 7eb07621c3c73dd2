"""The `nubis` command line: global options, one sub-app per area, clean one-line errors.

Each area lives in `services/client/commands/<area>.py` as a typer app and is
registered below with one `add_typer` line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import grpc
import typer

from services.client import cli_context, rpc_errors
from services.client.commands import (
    auth,
    flavor,
    identity,
    image,
    keypair,
    lab,
    network,
    node,
    router,
    scheduler,
    security_group,
    server,
    volume,
)
from services.client.output import Output, OutputFormat
from services.common import errors

app = typer.Typer(
    name="nubis",
    help="Operate a nubis cloud: identity, compute, storage, network, and local labs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.add_typer(lab.app, name="lab")
app.add_typer(identity.project_app, name="project")
app.add_typer(identity.user_app, name="user")
app.add_typer(identity.role_app, name="role")
app.add_typer(identity.quota_app, name="quota")
app.add_typer(identity.catalog_app, name="catalog")
app.add_typer(auth.token_app, name="token")
app.command("login")(auth.login)
app.add_typer(node.app, name="node")
app.add_typer(scheduler.server_group_app, name="server-group")
app.add_typer(scheduler.allocation_app, name="allocation")
app.add_typer(image.app, name="image")
app.add_typer(volume.volume_app, name="volume")
app.add_typer(volume.snapshot_app, name="snapshot")
app.add_typer(volume.pool_app, name="pool")
app.add_typer(network.network_app, name="network")
app.add_typer(network.subnet_app, name="subnet")
app.add_typer(network.port_app, name="port")
app.add_typer(router.router_app, name="router")
app.add_typer(router.floating_ip_app, name="floating-ip")
app.add_typer(security_group.group_app, name="security-group")
app.add_typer(security_group.rule_app, name="security-group-rule")
app.add_typer(flavor.app, name="flavor")
app.add_typer(keypair.app, name="keypair")
app.add_typer(server.app, name="server")


@app.callback()
def _global_options(
    ctx: typer.Context,
    identity: Annotated[str | None, typer.Option(
        "--identity", envvar="NUBIS_IDENTITY_ADDR", metavar="HOST:PORT",
        help="Identity service address (default: the lab's, then ~/.config/nubis).",
    )] = None,
    output: Annotated[OutputFormat, typer.Option(
        "-o", "--output", envvar="NUBIS_OUTPUT", case_sensitive=False, help="Output format.",
    )] = OutputFormat.TABLE,
    lab_dir: Annotated[Path, typer.Option(
        "--lab-dir", envvar="NUBIS_LAB_DIR",
        help="Lab state directory, where lab credentials and endpoints are found.",
    )] = Path(cli_context.DEFAULT_LAB_DIR),
) -> None:
    ctx.obj = cli_context.CliContext(output=Output(format=output), identity=identity,
                                     lab_dir=lab_dir)


def run(application: typer.Typer, argv: list[str] | None = None) -> int:
    """Run a typer app the way `nubis` does; errors become one line on stderr and exit code 1."""
    printer = Output()
    try:
        application(args=argv, prog_name="nubis")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except grpc.RpcError as exc:
        printer.error(f"error: {rpc_errors.describe_rpc_error(exc)}")
        return 1
    except errors.NubisError as exc:
        printer.error(f"error: {rpc_errors.describe_domain_error(exc)}")
        return 1
    except KeyboardInterrupt:
        printer.error("error: interrupted")
        return 130
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `nubis` console script."""
    sys.exit(run(app, argv))


if __name__ == "__main__":
    main()
