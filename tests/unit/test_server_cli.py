"""The pure parts of `nubis server|flavor|keypair`: names of --count servers, what --wait
prints and decides, and the arguments refused before any call is made."""

from __future__ import annotations

import io

import pytest
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2
from rich.console import Console

from services.client import cli
from services.client.commands import server, server_wait
from services.client.output import Output, OutputFormat

Instance = instance_pb2.Instance


def _server(name: str, state: Instance.State.ValueType,
            task_state: Instance.TaskState.ValueType = Instance.TASK_STATE_UNSPECIFIED,
            task_id: str = "",
            fault: tuple[str, str] = ("", "")) -> instance_pb2.Instance:
    return Instance(meta=resource_pb2.ResourceMeta(id=f"id-{name}", name=name), state=state,
                    task_state=task_state, task_id=task_id,
                    fault=resource_pb2.Fault(reason=fault[0], message=fault[1]))


def test_count_makes_numbered_names_and_one_server_keeps_its_name() -> None:
    assert server.names_for("web", 1) == ["web"]
    assert server.names_for("web", 3) == ["web-1", "web-2", "web-3"]


def test_a_server_settles_in_a_final_state_with_nothing_in_flight() -> None:
    assert not server_wait.settled(_server("a", Instance.BUILDING, Instance.TASK_STATE_SPAWNING,
                                           "op"))
    assert not server_wait.settled(_server("a", Instance.ACTIVE, Instance.TASK_STATE_POWERING_OFF,
                                           "op"))  # a stop just accepted
    assert server_wait.settled(_server("a", Instance.ACTIVE))
    assert server_wait.settled(_server("a", Instance.VERIFY_RESIZE))
    assert server_wait.settled(server_wait.deleted(_server("a", Instance.DELETING,
                                                           Instance.TASK_STATE_DELETING, "op")))
    assert not server_wait.settled(_server("a", Instance.DELETING, Instance.TASK_STATE_DELETING,
                                           "op"))


def test_progress_names_the_state_and_step_or_counts_them() -> None:
    one = _server("demo", Instance.BUILDING, Instance.TASK_STATE_BLOCK_DEVICE_MAPPING, "op")
    assert server_wait.progress_line([one], 1.25) == (
        "server demo (id-demo): BUILDING (block_device_mapping)  1.2s")
    many = [_server("w-1", Instance.ACTIVE),
            _server("w-2", Instance.BUILDING, Instance.TASK_STATE_SPAWNING, "op"),
            _server("w-3", Instance.BUILDING, Instance.TASK_STATE_SPAWNING, "op")]
    assert server_wait.progress_line(many, 3.0) == (
        "1/3 servers settled: 1 ACTIVE, 2 BUILDING (spawning)  3.0s")


def test_the_final_line_carries_the_fault_of_an_error() -> None:
    assert server_wait.final_line(_server("demo", Instance.ACTIVE), 2.0) == (
        "server demo (id-demo): ACTIVE after 2.0s")
    failed = _server("demo", Instance.ERROR,
                     fault=("nubis.compute.spawn_failed", "spawning on node-1 failed: bad image"))
    assert server_wait.final_line(failed, 2.0) == (
        "server demo (id-demo): ERROR after 2.0s: spawning on node-1 failed: bad image "
        "(nubis.compute.spawn_failed)")


def test_error_or_another_state_with_a_fault_is_a_failure() -> None:
    active = frozenset({Instance.ACTIVE})
    assert server_wait.failure(_server("a", Instance.ACTIVE), active) is None
    assert server_wait.failure(_server("a", Instance.ERROR, fault=("r", "m")), None) == (
        "server a (id-a) went to ERROR: m (r)")
    # A start that failed leaves the server STOPPED with the reason recorded.
    stuck = _server("a", Instance.STOPPED, fault=("nubis.x", "power on failed"))
    assert server_wait.failure(stuck, active) == (
        "server a (id-a) is STOPPED, not ACTIVE: power on failed (nubis.x)")
    assert server_wait.failure(_server("a", Instance.STOPPED), active) is None
    with pytest.raises(Exception, match="went to ERROR: m") as caught:
        server_wait.check([_server("a", Instance.ACTIVE),
                           _server("b", Instance.ERROR, fault=("r", "m"))], active)
    assert "server a" not in str(caught.value)


def test_rows_show_states_and_addresses_as_operators_read_them() -> None:
    instance = _server("demo", Instance.BUILDING, Instance.TASK_STATE_NETWORKING, "op")
    instance.power_state = Instance.POWER_STATE_RUNNING
    instance.flavor.name = "m1.tiny"
    instance.addresses.add(network_name="private", ip_address="10.0.0.5")
    found = server.row(instance)
    assert (found["state"], found["task_state"], found["power_state"]) == (
        "BUILDING", "networking", "running")
    assert (found["flavor"], found["addresses"], found["name"]) == (
        "m1.tiny", ["private=10.0.0.5"], "demo")


def test_progress_is_drawn_only_on_a_terminal() -> None:
    sink = io.StringIO()
    piped = Output(format=OutputFormat.TABLE, console=Console(file=sink, force_terminal=False))
    with server_wait._progress(piped) as show:
        show("server demo: BUILDING")
    assert sink.getvalue() == ""
    for format_ in OutputFormat:  # -o json|yaml: drawn on stderr, stdout keeps the document
        out, err = io.StringIO(), io.StringIO()
        terminal = Output(format=format_, console=Console(file=out, force_terminal=True),
                          err=Console(file=err, force_terminal=True))
        with server_wait._progress(terminal) as show:
            show("server demo: BUILDING (spawning)")
        drawn = out if format_ is OutputFormat.TABLE else err
        assert "server demo: BUILDING (spawning)" in drawn.getvalue()
        assert (err if format_ is OutputFormat.TABLE else out).getvalue() == ""


@pytest.mark.parametrize("argv", [
    ["server", "create", "x", "--flavor", "f", "--image", "i", "--count", "0"],
    ["server", "add-port", "x"],  # neither --port nor --network
    ["flavor", "create", "f", "--vcpus", "0", "--ram", "512"],
    ["flavor", "create", "f", "--vcpus", "1", "--ram", "8"],
])
def test_bad_arguments_are_refused_before_any_call(argv: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # No service listens anywhere: a call made would fail with UNAVAILABLE and exit 1.
    assert cli.run(cli.app, ["--identity", "127.0.0.1:1", *argv]) == 2
    assert "Traceback" not in capsys.readouterr().err
