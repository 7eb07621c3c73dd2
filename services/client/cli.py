"""The `nubis` command line: global options, one sub-app per area, clean one-line errors.

Each area lives in `services/client/commands/<area>.py` as a typer app and is
registered below with one `add_typer` line. The global options (`-o`, `-c`,
`--debug`, `--cloud`) are accepted after the command too (`nubis node list -o
json`, as in openstackclient and kubectl): `run` moves them to the front.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
import structlog
import typer
import typer.main
from typer._click.exceptions import ClickException
from typer._completion_shared import get_completion_script

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
app.command("logout")(auth.logout)
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


class Shell(enum.StrEnum):
    """Shells `nubis completion` writes a script for."""

    BASH = "bash"
    ZSH = "zsh"
    FISH = "fish"


@app.command("completion")
def completion(shell: Annotated[Shell, typer.Argument(help="The shell to complete in.")]) -> None:
    """Print the shell completion script: `source <(nubis completion bash)` in ~/.bashrc,
    or `nubis completion zsh > "${fpath[1]}/_nubis"`."""
    typer.echo(get_completion_script(prog_name="nubis", complete_var="_NUBIS_COMPLETE",
                                     shell=shell.value))


@app.callback()
def _global_options(
    ctx: typer.Context,
    identity: Annotated[str | None, typer.Option(
        "--identity", envvar="NUBIS_IDENTITY_ADDR", metavar="HOST:PORT",
        help="Identity service address (default: the lab's, then ~/.config/nubis).",
    )] = None,
    output: Annotated[OutputFormat, typer.Option(
        "-o", "--output", envvar="NUBIS_OUTPUT", case_sensitive=False,
        help="Output format: table for people, json or yaml for scripts (errors too).",
    )] = OutputFormat.TABLE,
    column: Annotated[list[str] | None, typer.Option(
        "-c", "--column", metavar="COLUMN",
        help="Print only this column (or field); repeat for more, in order.",
    )] = None,
    debug: Annotated[bool, typer.Option(
        "--debug", help="On an error, also print the gRPC code, details and trailers.",
    )] = False,
    cloud: Annotated[str | None, typer.Option(
        "--cloud", envvar="NUBIS_CLOUD", metavar="NAME",
        help="Named cloud of clouds.yaml in the user's config dir (identity, CA, credentials).",
    )] = None,
    lab_dir: Annotated[Path, typer.Option(
        "--lab-dir", envvar="NUBIS_LAB_DIR",
        help="Lab state directory, where lab credentials and endpoints are found.",
    )] = Path(cli_context.DEFAULT_LAB_DIR),
) -> None:
    del debug  # read by `run`, which prints the errors
    ctx.obj = cli_context.CliContext(output=Output(format=output, columns=tuple(column or ())),
                                     identity=identity, lab_dir=lab_dir, cloud=cloud)


# Help of the arguments and options that name the same thing throughout, for those whose
# declaration gives none: a resource argument is a name or an id everywhere.
_RESOURCE_WORDS = {
    "project": "Project", "user": "User", "image": "Image", "volume": "Volume",
    "snapshot": "Snapshot", "pool": "Storage pool", "network": "Network", "subnet": "Subnet",
    "port": "Port", "router": "Router", "group": "Security group", "flavor": "Flavor",
    "keypair": "Key pair", "server": "Server",
}
_PARAMETER_HELP = {
    **{name: f"{word} name or id." for name, word in _RESOURCE_WORDS.items()},
    "floating_ip": "Floating IP id or address.",
    "rule": "Security group rule id.",
    "consumer_id": "Consumer (instance) id.",
    "name": "Name (unique in the project where the kind needs it).",
    "description": "Free text describing it.",
    "enabled": "Enable (or disable) it.",
    "email": "Email address.",
    "default_project": "Project name or id the user logs in to by default.",
    "role": "Role: reader, member, admin or cloud-admin.",
    "provider_type": "How the network is carried: vxlan, vlan or flat.",
    "device_id": "Id of the device (server, router) the port is for.",
    "device_owner": "Kind of device owning the port (compute:nova, network:router_interface).",
    "direction": "Traffic the rule lets through: ingress or egress.",
    "ether_type": "IPv4 or IPv6.",
    "snat": "Translate the router's outgoing traffic to its gateway address.",
    "zone": "Availability zone to boot in (default: any).",
}


def with_default_help(command: Any) -> Any:
    """`command` and its sub-commands, their unexplained parameters given the help of
    _PARAMETER_HELP (typer vendors its own click, so the tree is walked untyped)."""
    for param in command.params:
        if hasattr(param, "help") and not param.help and param.name in _PARAMETER_HELP:
            param.help = _PARAMETER_HELP[param.name]
    for sub in getattr(command, "commands", {}).values():
        with_default_help(sub)
    return command


# Global options a person may give after the command; True: the option takes a value.
_GLOBAL_OPTIONS = {"-o": True, "--output": True, "-c": True, "--column": True,
                   "--debug": False, "--cloud": True}


def hoist_global_options(argv: Sequence[str]) -> list[str]:
    """`argv` with the global options found anywhere (before `--`) moved to the front."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            rest += argv[index:]
            break
        name = arg.split("=", 1)[0]
        if name in _GLOBAL_OPTIONS:
            takes = _GLOBAL_OPTIONS[name] and "=" not in arg
            front += argv[index:index + 1 + int(takes)]
            index += 1 + int(takes)
            continue
        if arg[:2] in ("-o", "-c") and len(arg) > 2 and not arg.startswith("--"):
            front.append(arg)  # -ojson
        else:
            rest.append(arg)
        index += 1
    return front + rest


def _error_format(front: Sequence[str]) -> OutputFormat:
    value = os.environ.get("NUBIS_OUTPUT", "")
    for index, arg in enumerate(front):
        if arg in ("-o", "--output") and index + 1 < len(front):
            value = front[index + 1]
        elif arg.startswith(("--output=", "-o")):
            value = arg.split("=", 1)[1] if "=" in arg else arg[2:]
    try:
        return OutputFormat(value.lower())
    except ValueError:
        return OutputFormat.TABLE


def _run_command(command: Any, args: list[str], printer: Output) -> int:
    """Run `command`: a usage error (a bad flag, a missing argument) is one line on stderr
    naming the command's --help (a document with `-o json|yaml`), with click's exit code (2)."""
    try:
        result = command(args=args, prog_name="nubis", standalone_mode=False)
    except ClickException as exc:
        message = exc.format_message().rstrip(".")
        if not message:  # `nubis` alone (or a group alone): its help was the answer
            return exc.exit_code
        context = getattr(exc, "ctx", None)
        path = context.command_path if context is not None else "nubis <command>"
        fix = f"see `{path} --help`"
        printer.error(f"error: {message}; {fix}", {
            "code": "INVALID_ARGUMENT", "reason": "nubis.cli.usage", "message": message,
            "field_violations": [], "fix": fix})
        return exc.exit_code
    except typer.Abort:
        printer.error("error: aborted", {"code": "CANCELLED", "reason": "nubis.cli.aborted",
                                         "message": "aborted", "field_violations": [],
                                         "fix": ""})
        return 1
    return result if isinstance(result, int) else 0


def run(application: typer.Typer, argv: list[str] | None = None) -> int:
    """Run a typer app the way `nubis` does; errors become one line on stderr (a document
    with `-o json|yaml`) and exit code 1; `--debug` adds the gRPC details."""
    args = hoist_global_options(sys.argv[1:] if argv is None else argv)
    printer = Output(format=_error_format(args))
    try:
        command = with_default_help(typer.main.get_command(application))
        return _run_command(command, args, printer)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except grpc.RpcError as exc:  # a raw stub's (image upload and download)
        if "--debug" in args:
            printer.error(rpc_errors.debug_details(exc))
        printer.error(f"error: {rpc_errors.describe_failure(exc)}",
                      rpc_errors.failure_document(exc))
        return 1
    except errors.NubisError as exc:  # the SDK's errors, and the CLI's own
        call = rpc_errors.rpc_error_of(exc)
        if call is not None and "--debug" in args:
            printer.error(rpc_errors.debug_details(call))
        printer.error(f"error: {rpc_errors.describe_error(exc)}", rpc_errors.error_document(exc))
        return 1
    except KeyboardInterrupt:
        printer.error("error: interrupted")
        return 130
    return 0


def quiet_logs(argv: Sequence[str]) -> None:
    """The SDK's log lines (a call retried on another replica) are for `--debug` only, and
    then on stderr: stdout is the command's output."""
    level = logging.INFO if "--debug" in argv else logging.WARNING
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `nubis` console script."""
    quiet_logs(sys.argv[1:] if argv is None else argv)
    sys.exit(run(app, argv))


if __name__ == "__main__":
    main()
