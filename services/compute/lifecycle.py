"""Power verbs of instances: start, stop, soft and hard reboot, reset-state, console log.

Each verb goes through `operation.Runner.begin`: in one transaction it checks
that no operation is in flight (`nubis.instance.busy`) and that the instance's
state allows the verb (`nubis.instance.bad_state`, naming the state and the
verb), puts the instance into its task state and records the operation and an
instance action. The handler then sends one agent task to the instance's node
and records the outcome with `runner.finish`: the new state with the power
state the agent read back from libvirt.

Which states allow which verb (Nova's, where nubis has the state):

- start: STOPPED.
- stop: ACTIVE or ERROR (a broken instance's guest may still run; its fault
  stays if the stop fails).
- soft reboot: ACTIVE.
- hard reboot: ACTIVE, STOPPED or ERROR, as Nova allows a hard reboot to
  recover a guest (its domain must still be on its node; a STOPPED or shut-off
  domain is started).

A power operation that fails leaves the instance in the state it had before
with the fault recorded (Nova keeps vm_state and records the fault); if the
node says the domain is gone the instance goes to ERROR with reason
`nubis.instance.domain_missing`. Every agent task is idempotent, so an
operation adopted by another replica simply sends its task again.

ResetInstanceState (admin) only rewrites the record: state ACTIVE or ERROR,
no task, and the operation record dropped (its runner, finding it gone,
writes nothing); to ACTIVE, an instance whose failed build gave its quota
back reserves it again in the same transaction (FAILED_PRECONDITION if the
project has none left). GetConsoleLog asks the node for the domain's console tail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2, instance_verbs_pb2

from services.common import errors, quota, resources, tasks
from services.common.context import Principal
from services.common.store import Store, Txn
from services.common.task_sender import TaskSender
from services.compute import action as action_module
from services.compute import instance as instance_module
from services.compute import keys, operation
from services.compute.operation import Kind, Operation, Runner

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
State = instance_pb2.Instance.State
TaskState = instance_pb2.Instance.TaskState
PowerState = instance_pb2.Instance.PowerState
RebootType = instance_verbs_pb2.RebootInstanceRequest.RebootType

DOMAIN_MISSING = "nubis.instance.domain_missing"
NO_NODE = "nubis.instance.no_node"
RESET = "nubis.instance.reset"
QUOTA_GONE = "nubis.instance.reset_quota_exceeded"
DEFAULT_STOP_TIMEOUT = 60
"""Seconds a stop waits for the guest's clean shutdown when the request says 0 (Nova's 60)."""
MAX_STOP_TIMEOUT = 300
"""Longest wait a stop or reboot may ask for: the agent's power_off must end in its time limit."""
SOFT_REBOOT_TIMEOUT = 60
"""Seconds a soft reboot waits for the guest before the agent power-cycles it."""
FROM_STATE = "from_state"
"""Progress key holding the state the instance had when the operation began."""

# The power state of each libvirt state name the agent reports.
_POWER_STATES: dict[str, PowerState.ValueType] = {
    "running": Instance.POWER_STATE_RUNNING,
    "blocked": Instance.POWER_STATE_RUNNING,
    "paused": Instance.POWER_STATE_PAUSED,
    "shutdown": Instance.POWER_STATE_SHUTDOWN,
    "shutoff": Instance.POWER_STATE_SHUTDOWN,
    "crashed": Instance.POWER_STATE_CRASHED,
    "pmsuspended": Instance.POWER_STATE_SUSPENDED,
}

_SOFT_REBOOT_FROM = (Instance.ACTIVE,)
_HARD_REBOOT_FROM = (Instance.ACTIVE, Instance.STOPPED, Instance.ERROR)


def power_state(libvirt_state: str) -> PowerState.ValueType:
    """The instance power state of a domain's libvirt state ("running", "shutoff", ...)."""
    return _POWER_STATES.get(libvirt_state, Instance.POWER_STATE_NOSTATE)


def state_name(state: int) -> str:
    """The state's name; its number for a value no State has (a request's unknown enum)."""
    try:
        return Instance.State.Name(state)  # type: ignore[arg-type]
    except ValueError:
        return str(state)


def needs(verb: str, states: Iterable[State.ValueType]) -> Callable[[Instance], None]:
    """An `allowed` check: FailedPrecondition unless the instance is in one of `states`
    and has a node (a power verb acts on the node's domain)."""
    wanted = tuple(states)

    def check(instance: Instance) -> None:
        if instance.state not in wanted:
            raise operation.bad_state(instance, verb, " or ".join(state_name(s) for s in wanted))
        if not instance.node:
            raise errors.FailedPrecondition(
                f"instance {instance.meta.id} was never placed on a node; {verb} needs one",
                reason=NO_NODE, metadata={"id": instance.meta.id})

    return check


def entering(state: State.ValueType, task_state: TaskState.ValueType,
             progress: MutableMapping[str, str]) -> Callable[[Instance], None]:
    """A `mutate` for begin: the verb's state and task state; the state left is kept in
    `progress` (the operation's parameters) for a failure to go back to."""

    def mutate(instance: Instance) -> None:
        progress[FROM_STATE] = state_name(instance.state)
        instance.state = state
        instance.task_state = task_state

    return mutate


def _instance_id(value: str) -> str:
    return resources.check_id(value, "id")


async def _begin(runner: Runner, principal: Principal, instance_id: str, kind: int, *,
                 action: str, allowed: Callable[[Instance], None],
                 mutate: Callable[[Instance], None], params: Operation) -> Instance:
    """The operation begun, and the instance as the caller may see it."""
    written = await runner.begin(principal, instance_id, kind, action=action, allowed=allowed,
                                 mutate=mutate, params=params)
    return instance_module.shown(written, principal)


async def start(runner: Runner, principal: Principal,
                request: instance_verbs_pb2.StartInstanceRequest) -> Instance:
    """Power on a STOPPED instance (asynchronous)."""
    instance_id = _instance_id(request.id)
    params = Operation()
    return await _begin(
        runner, principal, instance_id, Kind.START, action="start",
        allowed=needs("start", (Instance.STOPPED,)),
        mutate=entering(Instance.STOPPED, Instance.TASK_STATE_POWERING_ON, params.progress),
        params=params)


def stop_timeout(timeout_seconds: int) -> int:
    """The guest shutdown wait of a stop: 0 means the default; more than the maximum or
    less than 0 is INVALID_ARGUMENT."""
    if timeout_seconds == 0:
        return DEFAULT_STOP_TIMEOUT
    if not 0 < timeout_seconds <= MAX_STOP_TIMEOUT:
        raise errors.InvalidArgument(
            f"timeout_seconds must be 0..{MAX_STOP_TIMEOUT}, not {timeout_seconds}",
            violations=[errors.FieldViolation(
                "timeout_seconds", f"must be 0 (default {DEFAULT_STOP_TIMEOUT}) "
                f"to {MAX_STOP_TIMEOUT}")])
    return timeout_seconds


async def stop(runner: Runner, principal: Principal,
               request: instance_verbs_pb2.StopInstanceRequest) -> Instance:
    """Power off an ACTIVE instance: ACPI shutdown, forced after the timeout (asynchronous)."""
    instance_id = _instance_id(request.id)
    params = Operation(timeout_seconds=stop_timeout(request.timeout_seconds))
    return await _begin(
        runner, principal, instance_id, Kind.STOP, action="stop",
        allowed=needs("stop", (Instance.ACTIVE, Instance.ERROR)),
        mutate=entering(Instance.ACTIVE, Instance.TASK_STATE_POWERING_OFF, params.progress),
        params=params)


async def reboot(runner: Runner, principal: Principal,
                 request: instance_verbs_pb2.RebootInstanceRequest) -> Instance:
    """Reboot an instance, soft (ACPI, hard after a timeout) or hard (asynchronous)."""
    instance_id = _instance_id(request.id)
    if request.type not in RebootType.values():
        raise errors.InvalidArgument(
            f"reboot type {request.type} is not SOFT or HARD",
            violations=[errors.FieldViolation("type", "must be REBOOT_TYPE_SOFT or _HARD")])
    hard = request.type == instance_verbs_pb2.RebootInstanceRequest.REBOOT_TYPE_HARD
    kind, verb, states, task_state = (
        (Kind.REBOOT_HARD, "hard reboot", _HARD_REBOOT_FROM, Instance.TASK_STATE_REBOOTING_HARD)
        if hard else (Kind.REBOOT, "reboot", _SOFT_REBOOT_FROM, Instance.TASK_STATE_REBOOTING))
    params = Operation(timeout_seconds=SOFT_REBOOT_TIMEOUT)
    return await _begin(
        runner, principal, instance_id, kind, action="reboot", allowed=needs(verb, states),
        mutate=entering(Instance.REBOOTING, task_state, params.progress), params=params)


# --- the handlers --------------------------------------------------------------


def _from_state(op: Operation, default: State.ValueType) -> State.ValueType:
    name = op.progress.get(FROM_STATE, "")
    try:
        return Instance.State.Value(name) if name else default
    except ValueError:
        return default


def _gone_fault(op: Operation, verb: str, exc: errors.NubisError) -> resource_pb2.Fault:
    name = instance_module.domain_name(op.instance_id)
    return resource_pb2.Fault(
        reason=DOMAIN_MISSING,
        message=f"{verb} failed: domain {name} is gone from node {op.node} ({exc.message})",
        time=resources.now())


def _failed_fault(op: Operation, verb: str, exc: errors.NubisError) -> resource_pb2.Fault:
    return resource_pb2.Fault(
        reason=exc.reason,
        message=f"{verb} failed on node {op.node}: {exc.message}",
        time=resources.now())


def _not_an_outcome(exc: errors.NubisError) -> bool:
    """Not the node's answer: the broker, result store or etcd is out of reach (the runner
    runs the operation again later), or the operation was taken over (it stops here)."""
    return isinstance(exc, operation.Superseded) or (
        isinstance(exc, errors.Unavailable) and "node" not in exc.metadata)


class PowerHandler:
    """One power verb: the agent task(s) it sends and the state it ends in."""

    def __init__(self, verb: str, event: str, done: State.ValueType,
                 default_from: State.ValueType) -> None:
        self.verb = verb
        self.event = event
        self.done = done
        self.default_from = default_from

    async def act(self, runner: Runner, op: Operation) -> tasks_pb2.DomainStatus:
        raise NotImplementedError

    async def run(self, runner: Runner, op: Operation) -> None:
        await runner.step(op, op.step, event=self.event)
        try:
            status = await self.act(runner, op)
        except errors.NubisError as exc:
            if _not_an_outcome(exc):
                raise
            log.warning("power operation failed", operation_id=op.id, verb=self.verb,
                        instance_id=op.instance_id, node=op.node, reason=exc.reason,
                        error=exc.message)
            if isinstance(exc, errors.NotFound):
                await self._record_gone(runner, op, _gone_fault(op, self.verb, exc))
            else:
                await self.fail(runner, op, _failed_fault(op, self.verb, exc))
            return
        powered = power_state(status.state)

        def succeeded(instance: Instance) -> None:
            instance.state = self.done
            instance.power_state = powered
            instance.ClearField("fault")  # an earlier failure's fault no longer applies

        await runner.finish(op, succeeded)

    async def _record_gone(self, runner: Runner, op: Operation,
                           fault: resource_pb2.Fault) -> None:
        def gone(instance: Instance) -> None:
            instance.state = Instance.ERROR
            instance.power_state = Instance.POWER_STATE_NOSTATE

        await runner.finish(op, gone, fault=fault)

    async def fail(self, runner: Runner, op: Operation, fault: resource_pb2.Fault) -> None:
        before = _from_state(op, self.default_from)

        def back(instance: Instance) -> None:
            instance.state = before

        await runner.finish(op, back, fault=fault)


class StartHandler(PowerHandler):
    def __init__(self) -> None:
        super().__init__("start", "compute_start_instance", Instance.ACTIVE, Instance.STOPPED)

    async def act(self, runner: Runner, op: Operation) -> tasks_pb2.DomainStatus:
        name = instance_module.domain_name(op.instance_id)
        return await runner.send(op, tasks.POWER_ON, tasks_pb2.DomainRequest(name=name))


class StopHandler(PowerHandler):
    def __init__(self) -> None:
        super().__init__("stop", "compute_stop_instance", Instance.STOPPED, Instance.ACTIVE)

    async def act(self, runner: Runner, op: Operation) -> tasks_pb2.DomainStatus:
        name = instance_module.domain_name(op.instance_id)
        timeout = op.timeout_seconds or DEFAULT_STOP_TIMEOUT
        return await runner.send(op, tasks.POWER_OFF,
                                 tasks_pb2.PowerOffRequest(name=name, timeout_seconds=timeout))


class RebootHandler(PowerHandler):
    """Soft or hard reboot; a domain that is not running afterwards (a hard reboot of a
    stopped guest) is powered on, so a reboot always ends with the guest running."""

    def __init__(self, hard: bool) -> None:
        super().__init__("hard reboot" if hard else "reboot", "compute_reboot_instance",
                         Instance.ACTIVE, Instance.ACTIVE)
        self.hard = hard

    async def act(self, runner: Runner, op: Operation) -> tasks_pb2.DomainStatus:
        name = instance_module.domain_name(op.instance_id)
        status = await runner.send(op, tasks.REBOOT, tasks_pb2.RebootRequest(
            name=name, hard=self.hard, timeout_seconds=op.timeout_seconds or SOFT_REBOOT_TIMEOUT))
        if power_state(status.state) != Instance.POWER_STATE_RUNNING:
            status = await runner.send(op, tasks.POWER_ON, tasks_pb2.DomainRequest(name=name))
        return status


def register(runner: Runner) -> None:
    """The handlers of the power verbs, for `runner` to run (and adopt)."""
    runner.register(Kind.START, StartHandler())
    runner.register(Kind.STOP, StopHandler())
    runner.register(Kind.REBOOT, RebootHandler(hard=False))
    runner.register(Kind.REBOOT_HARD, RebootHandler(hard=True))


# --- reset-state ---------------------------------------------------------------

_RESETTABLE = (Instance.ACTIVE, Instance.ERROR)


async def _reclaim_quota(txn: Txn, instance: Instance) -> None:
    """An instance whose failed build gave its quota back holds it again once ACTIVE."""
    if not instance.quota_released:
        return
    try:
        await quota.reserve(txn, instance.meta.project_id, instance_module.usage(instance))
    except errors.ResourceExhausted as exc:
        raise errors.FailedPrecondition(
            f"reset to ACTIVE takes the instance's quota back and the project has none left: "
            f"{exc.message}", reason=QUOTA_GONE, metadata=exc.metadata) from None
    instance.quota_released = False


async def reset_state(store: Store, principal: Principal,
                      request: instance_verbs_pb2.ResetInstanceStateRequest) -> Instance:
    """Force the record to ACTIVE or ERROR with no task in flight (admin, Nova's reset-state).

    The operation in flight, if any, is dropped with its record: the replica
    running it finds the record gone and writes no outcome; its instance action
    ends FAILED saying it was reset. Nothing is sent to the node.
    """
    instance_id = _instance_id(request.id)
    if request.state not in _RESETTABLE:
        raise errors.InvalidArgument(
            f"state must be ACTIVE or ERROR, not {state_name(request.state)}",
            violations=[errors.FieldViolation("state", "must be ACTIVE or ERROR")])

    await instance_module.visible(store, principal, instance_id)

    async def body(txn: Txn) -> Instance:
        instance = (await instance_module.in_txn(txn, instance_id)).value
        op = await txn.get(keys.operation(instance_id), Operation)
        if op is not None:
            txn.delete(keys.operation(instance_id))
            await action_module.finish(txn, instance_id, op.value.action_id, operation.fault(
                RESET, f"state reset to {state_name(request.state)} by an administrator"))
        instance.state = request.state
        instance.task_state = Instance.TASK_STATE_UNSPECIFIED
        instance.task_id = ""
        if request.state == Instance.ACTIVE:
            instance.ClearField("fault")
            await _reclaim_quota(txn, instance)
        instance_module.put(txn, instance)
        return instance

    written = await store.atomic(body)
    log.info("instance state reset", instance_id=instance_id, state=state_name(request.state))
    return instance_module.shown(written, principal)


# --- console log ---------------------------------------------------------------

MAX_CONSOLE_BYTES = 1 << 20


async def console_log(store: Store, sender: TaskSender, principal: Principal,
                      request: instance_verbs_pb2.GetConsoleLogRequest,
                      ) -> instance_verbs_pb2.GetConsoleLogResponse:
    """The tail of the instance's serial console, read on its node (synchronous)."""
    instance_id = _instance_id(request.id)
    if request.tail_lines < 0:
        raise errors.InvalidArgument(
            "tail_lines must not be negative",
            violations=[errors.FieldViolation("tail_lines", "must be 0 (all) or more")])
    instance = (await instance_module.visible(store, principal, instance_id)).value
    if not instance.node:
        raise errors.FailedPrecondition(
            f"instance {instance_id} is {state_name(instance.state)} and on no node; "
            "it has no console yet", reason=NO_NODE, metadata={"id": instance_id})
    name = instance_module.domain_name(instance_id)
    try:
        found = await sender.send(
            instance.node, tasks.CONSOLE_LOG,
            tasks_pb2.ConsoleLogRequest(name=name, tail_lines=request.tail_lines,
                                        max_bytes=MAX_CONSOLE_BYTES),
            operation_id=tasks.new_operation_id())
    except errors.NotFound as exc:
        raise errors.FailedPrecondition(
            f"instance {instance_id} has no domain on its node: {exc.message}",
            reason=DOMAIN_MISSING, metadata={"id": instance_id}) from exc
    return instance_verbs_pb2.GetConsoleLogResponse(output=found.output,
                                                    truncated=found.truncated)
