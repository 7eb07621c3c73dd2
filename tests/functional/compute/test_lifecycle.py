"""Power verbs through a real compute service and real agents: the domain's state, asked of
the node's libvirt, follows each verb; wrong states and a verb in flight are refused."""

from __future__ import annotations

import grpc
import pytest
from nubis.compute.v1 import instance_action_pb2, instance_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V

from services.compute import keys
from services.compute.operation import Operation
from tests.functional.compute.power_harness import (
    GHOST,
    NODES,
    PowerCloud,
    quiet_cloud,
    reason_of,
)

__all__ = ["quiet_cloud"]

Instance = instance_pb2.Instance
SOFT = V.RebootInstanceRequest.REBOOT_TYPE_SOFT
HARD = V.RebootInstanceRequest.REBOOT_TYPE_HARD
NODE = NODES[0]


async def _actions(cloud: PowerCloud, instance_id: str) -> list[instance_action_pb2.InstanceAction]:
    reply = await cloud.stub().ListInstanceActions(
        instance_action_pb2.ListInstanceActionsRequest(instance_id=instance_id),
        metadata=cloud.as_("a_member"))
    return list(reply.actions)


async def test_stop_then_start_power_the_domain_off_and_on(quiet_cloud: PowerCloud) -> None:
    cloud, stub = quiet_cloud, quiet_cloud.stub()
    made = await cloud.instance(NODE)
    stopping = await stub.StopInstance(V.StopInstanceRequest(id=made.meta.id, timeout_seconds=5),
                                       metadata=cloud.as_("a_member"))
    assert stopping.task_state == Instance.TASK_STATE_POWERING_OFF
    assert not stopping.node, "the node is shown to operators only"
    stopped = await cloud.settled(made.meta.id)
    assert (stopped.state, stopped.power_state) == (Instance.STOPPED,
                                                    Instance.POWER_STATE_SHUTDOWN)
    domain = await cloud.domain(NODE, made.meta.id)
    assert domain is not None and domain.state == "shutoff"

    starting = await stub.StartInstance(V.StartInstanceRequest(id=made.meta.id),
                                        metadata=cloud.as_("a_member"))
    assert starting.task_state == Instance.TASK_STATE_POWERING_ON
    started = await cloud.settled(made.meta.id)
    assert (started.state, started.power_state) == (Instance.ACTIVE,
                                                    Instance.POWER_STATE_RUNNING)
    domain = await cloud.domain(NODE, made.meta.id)
    assert domain is not None and domain.state == "running"
    assert await cloud.store.find(keys.operation(made.meta.id), Operation) is None

    actions = await _actions(cloud, made.meta.id)
    assert [(a.action, a.state) for a in actions] == [
        ("start", instance_action_pb2.InstanceAction.SUCCEEDED),
        ("stop", instance_action_pb2.InstanceAction.SUCCEEDED)]
    assert [event.name for event in actions[1].events] == ["compute_stop_instance"]


@pytest.mark.parametrize(("kind", "task_state"), [
    (SOFT, Instance.TASK_STATE_REBOOTING), (HARD, Instance.TASK_STATE_REBOOTING_HARD)])
async def test_reboot_ends_active_with_the_domain_running(
        quiet_cloud: PowerCloud, kind: int, task_state: int) -> None:
    cloud = quiet_cloud
    made = await cloud.instance(NODE)
    rebooting = await cloud.stub().RebootInstance(
        V.RebootInstanceRequest(id=made.meta.id, type=kind),  # type: ignore[arg-type]
        metadata=cloud.as_("a_member"))
    assert (rebooting.state, rebooting.task_state) == (Instance.REBOOTING, task_state)
    done = await cloud.settled(made.meta.id)
    assert (done.state, done.power_state) == (Instance.ACTIVE, Instance.POWER_STATE_RUNNING)
    domain = await cloud.domain(NODE, made.meta.id)
    assert domain is not None and domain.state == "running"


async def test_hard_reboot_starts_a_stopped_instance(quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    made = await cloud.instance(NODE, state=Instance.STOPPED)
    await cloud.stub().RebootInstance(V.RebootInstanceRequest(id=made.meta.id, type=HARD),
                                      metadata=cloud.as_("a_member"))
    done = await cloud.settled(made.meta.id)
    assert (done.state, done.power_state) == (Instance.ACTIVE, Instance.POWER_STATE_RUNNING)
    domain = await cloud.domain(NODE, made.meta.id)
    assert domain is not None and domain.state == "running"


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_verbs_refuse_the_wrong_state_naming_it(quiet_cloud: PowerCloud) -> None:
    cloud, stub, member = quiet_cloud, quiet_cloud.stub(), quiet_cloud.as_("a_member")
    active = await cloud.instance(NODE)
    stopped = await cloud.instance(NODE, state=Instance.STOPPED)
    building = await cloud.instance(NODE, state=Instance.BUILDING, spawn=False)
    cases = [
        (stub.StartInstance(V.StartInstanceRequest(id=active.meta.id), metadata=member),
         "instance is ACTIVE; start needs STOPPED"),
        (stub.StopInstance(V.StopInstanceRequest(id=stopped.meta.id), metadata=member),
         "instance is STOPPED; stop needs ACTIVE or ERROR"),
        (stub.RebootInstance(V.RebootInstanceRequest(id=stopped.meta.id, type=SOFT),
                             metadata=member), "instance is STOPPED; reboot needs ACTIVE"),
        (stub.RebootInstance(V.RebootInstanceRequest(id=building.meta.id, type=HARD),
                             metadata=member),
         "instance is BUILDING; hard reboot needs ACTIVE or STOPPED or ERROR"),
    ]
    for call, message in cases:
        error = await _refused(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(error) == "nubis.instance.bad_state"
        assert error.details() == message
    for found in (active, stopped, building):  # nothing was recorded
        assert (await cloud.get(found.meta.id)).state == found.state
        assert not await _actions(cloud, found.meta.id)
    error = await _refused(stub.StopInstance(
        V.StopInstanceRequest(id=active.meta.id, timeout_seconds=301), metadata=member))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_verb_in_flight_makes_others_busy_until_reset(quiet_cloud: PowerCloud) -> None:
    cloud, stub, member = quiet_cloud, quiet_cloud.stub(), quiet_cloud.as_("a_member")
    made = await cloud.instance(GHOST, spawn=False)  # no agent answers there: stays in flight
    await stub.StopInstance(V.StopInstanceRequest(id=made.meta.id), metadata=member)
    for call in (stub.RebootInstance(V.RebootInstanceRequest(id=made.meta.id, type=HARD),
                                     metadata=member),
                 stub.StopInstance(V.StopInstanceRequest(id=made.meta.id), metadata=member)):
        error = await _refused(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(error) == "nubis.instance.busy"

    reset = await stub.ResetInstanceState(
        V.ResetInstanceStateRequest(id=made.meta.id, state=Instance.ERROR),
        metadata=cloud.as_("cloud_admin"))
    assert (reset.state, reset.task_state, reset.task_id) == (
        Instance.ERROR, Instance.TASK_STATE_UNSPECIFIED, "")
    assert await cloud.store.find(keys.operation(made.meta.id), Operation) is None
    [stop] = await _actions(cloud, made.meta.id)
    assert stop.state == instance_action_pb2.InstanceAction.FAILED
    assert "reset to ERROR" in stop.message
    # Idle again: a hard reboot (allowed from ERROR) is accepted.
    again = await stub.RebootInstance(V.RebootInstanceRequest(id=made.meta.id, type=HARD),
                                      metadata=member)
    assert again.task_state == Instance.TASK_STATE_REBOOTING_HARD


async def test_reset_state_touches_nothing_on_the_node(quiet_cloud: PowerCloud) -> None:
    cloud, stub, admin = quiet_cloud, quiet_cloud.stub(), quiet_cloud.as_("cloud_admin")
    made = await cloud.instance(NODE)
    reset = await stub.ResetInstanceState(
        V.ResetInstanceStateRequest(id=made.meta.id, state=Instance.ERROR), metadata=admin)
    assert reset.state == Instance.ERROR
    domain = await cloud.domain(NODE, made.meta.id)
    assert domain is not None and domain.state == "running"
    error = await _refused(stub.ResetInstanceState(
        V.ResetInstanceStateRequest(id=made.meta.id, state=Instance.STOPPED), metadata=admin))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    back = await stub.ResetInstanceState(
        V.ResetInstanceStateRequest(id=made.meta.id, state=Instance.ACTIVE), metadata=admin)
    assert back.state == Instance.ACTIVE and not back.HasField("fault")


async def test_a_power_verb_on_a_vanished_domain_ends_in_error(quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    made = await cloud.instance(NODE, spawn=False)  # recorded ACTIVE, no domain on the node
    await cloud.stub().StopInstance(V.StopInstanceRequest(id=made.meta.id),
                                    metadata=cloud.as_("a_member"))
    failed = await cloud.settled(made.meta.id)
    assert failed.state == Instance.ERROR
    assert failed.fault.reason == "nubis.instance.domain_missing"
    assert f"is gone from node {NODE}" in failed.fault.message
    [stop] = await _actions(cloud, made.meta.id)
    assert stop.state == instance_action_pb2.InstanceAction.FAILED


async def test_console_log_is_the_tail_the_node_keeps(quiet_cloud: PowerCloud) -> None:
    cloud, stub = quiet_cloud, quiet_cloud.stub()
    made = await cloud.instance(NODE)
    log = cloud.console_dir(NODE) / f"instance-{made.meta.id}.log"
    log.write_text("".join(f"boot line {n}\n" for n in range(1, 6)))
    reply = await stub.GetConsoleLog(V.GetConsoleLogRequest(id=made.meta.id, tail_lines=2),
                                     metadata=cloud.as_("a_reader"))
    assert reply.output == "boot line 4\nboot line 5\n" and not reply.truncated

    unplaced = await cloud.instance("", state=Instance.BUILDING, spawn=False)
    error = await _refused(stub.GetConsoleLog(V.GetConsoleLogRequest(id=unplaced.meta.id),
                                              metadata=cloud.as_("a_reader")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    error = await _refused(stub.GetConsoleLog(V.GetConsoleLogRequest(id=made.meta.id),
                                              metadata=cloud.as_("b_admin")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_hard_reboot_recovers_an_error_instance_and_clears_its_fault(
        quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    made = await cloud.instance(NODE, state=Instance.ERROR)
    found = await cloud.store.get(keys.instance(made.meta.id), Instance)
    found.value.fault.reason, found.value.fault.message = "nubis.test.broken", "it broke"
    await cloud.store.replace(keys.instance(made.meta.id), found.value,
                              expect_revision=found.mod_revision)
    error = await _refused(cloud.stub().RebootInstance(
        V.RebootInstanceRequest(id=made.meta.id, type=SOFT), metadata=cloud.as_("a_member")))
    assert reason_of(error) == "nubis.instance.bad_state"
    await cloud.stub().RebootInstance(V.RebootInstanceRequest(id=made.meta.id, type=HARD),
                                      metadata=cloud.as_("a_member"))
    done = await cloud.settled(made.meta.id)
    assert (done.state, done.power_state) == (Instance.ACTIVE, Instance.POWER_STATE_RUNNING)
    assert not done.HasField("fault")


async def test_an_error_instance_whose_guest_runs_can_be_stopped(
        quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    made = await cloud.instance(NODE, state=Instance.ERROR)
    await cloud.stub().StopInstance(V.StopInstanceRequest(id=made.meta.id, timeout_seconds=5),
                                    metadata=cloud.as_("a_member"))
    done = await cloud.settled(made.meta.id)
    assert (done.state, done.power_state) == (Instance.STOPPED, Instance.POWER_STATE_SHUTDOWN)
    domain = await cloud.domain(NODE, made.meta.id)
    assert domain is not None and domain.state == "shutoff"
