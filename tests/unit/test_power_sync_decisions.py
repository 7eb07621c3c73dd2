"""What the power sync writes for each record and domain: Nova's sync_power_states table."""

from __future__ import annotations

import uuid

import pytest
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2

from services.compute.power_sync import corrected

Instance = instance_pb2.Instance
NODE = "node-1"
RUNNING, SHUTDOWN = Instance.POWER_STATE_RUNNING, Instance.POWER_STATE_SHUTDOWN
NOSTATE, PAUSED = Instance.POWER_STATE_NOSTATE, Instance.POWER_STATE_PAUSED


def _record(state: int, power: int = RUNNING, task_id: str = "") -> Instance:
    made = Instance(meta=resource_pb2.ResourceMeta(id=str(uuid.uuid4())), node=NODE,
                    task_id=task_id)
    made.state = state  # type: ignore[assignment]
    made.power_state = power  # type: ignore[assignment]
    return made


def _domain(record: Instance, state: str) -> tasks_pb2.DomainStatus:
    return tasks_pb2.DomainStatus(name=f"instance-{record.meta.id}", uuid=record.meta.id,
                                  state=state, instance_id=record.meta.id)


@pytest.mark.parametrize(("state", "power", "libvirt", "expected"), [
    (Instance.ACTIVE, RUNNING, "shutoff", (Instance.STOPPED, SHUTDOWN, "stopped")),
    (Instance.ACTIVE, RUNNING, "crashed", (Instance.STOPPED, Instance.POWER_STATE_CRASHED,
                                           "stopped")),
    (Instance.ACTIVE, RUNNING, "paused", (Instance.ACTIVE, PAUSED, "power_state")),
    (Instance.STOPPED, SHUTDOWN, "running", (Instance.STOPPED, RUNNING, "power_state")),
    (Instance.ERROR, NOSTATE, "running", (Instance.ERROR, RUNNING, "power_state")),
    (Instance.ACTIVE, RUNNING, None, (Instance.ERROR, NOSTATE, "domain_missing")),
    (Instance.STOPPED, SHUTDOWN, None, (Instance.ERROR, NOSTATE, "domain_missing")),
    (Instance.ERROR, RUNNING, None, (Instance.ERROR, NOSTATE, "power_state")),
    (Instance.VERIFY_RESIZE, RUNNING, None, (Instance.VERIFY_RESIZE, NOSTATE, "power_state")),
])
def test_each_record_is_corrected_to_its_domain(state: int, power: int, libvirt: str | None,
                                                expected: tuple[int, int, str]) -> None:
    record = _record(state, power)
    fix = corrected(record, None if libvirt is None else _domain(record, libvirt), NODE)
    assert fix is not None
    fixed, change = fix
    assert (fixed.state, fixed.power_state, change) == expected
    if change == "domain_missing":
        assert fixed.fault.reason == "nubis.instance.domain_missing"
        assert f"is gone from node {NODE}" in fixed.fault.message


@pytest.mark.parametrize("record", [
    _record(Instance.ACTIVE, RUNNING, task_id="op-1"),  # an operation in flight owns it
    _record(Instance.BUILDING, NOSTATE),
    _record(Instance.DELETING, RUNNING),
    _record(Instance.REBOOTING, RUNNING),
])
def test_busy_and_transient_records_are_left_alone(record: Instance) -> None:
    assert corrected(record, None, NODE) is None
    assert corrected(record, _domain(record, "shutoff"), NODE) is None


def test_a_record_that_tells_the_truth_is_not_written() -> None:
    record = _record(Instance.ACTIVE, RUNNING)
    assert corrected(record, _domain(record, "running"), NODE) is None
    kept = _record(Instance.ERROR, NOSTATE)
    kept.fault.reason = "nubis.build.failed"
    assert corrected(kept, None, NODE) is None
