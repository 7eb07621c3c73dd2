"""Routers on network nodes: choosing the node, and sending it the router's whole desired state.

A router lives on one node whose agent reports ``network_node`` (read through
the scheduler): the UP, enabled network node hosting the fewest routers is
chosen when the router is made and recorded on it. Its ports (interfaces and
gateway) are bound to that node like any port, so their networks are
realized there (bridges, VXLAN to the other nodes) before the router is.

`realize` then sends ``network.ensure_router`` with everything the router
is: legs with their gateway addresses, the uplink with SNAT, its floating
IPs (DNAT + SNAT) and routes. The answer moves the router to ACTIVE (or
ERROR with a fault), with a compare on the revision the desired state was
read at: a change that landed meanwhile is realized again, so the node
always ends on the newest state. A router left BUILD or ERROR (its node was
away, the replica died mid-way) is realized again by the reconcile loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import floating_ip_pb2, port_pb2, router_pb2, subnet_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import peers
from services.common import errors, resources, tasks
from services.common.settings import NetworkSettings
from services.common.store import Store, Versioned
from services.common.task_sender import TaskSender
from services.network import binding, keys, port

log = structlog.get_logger(__name__)

Router = router_pb2.Router
FloatingIp = floating_ip_pb2.FloatingIp
NO_NODE = "nubis.router.no_network_node"
_REALIZE_ROUNDS = 5
# Routers one reconcile pass realizes at once.
_RECONCILE_CONCURRENCY = 4


@dataclass(frozen=True)
class Env:
    """What router and floating IP operations work with besides the request."""

    store: Store
    settings: NetworkSettings
    turns: port.Turns
    realizer: binding.Realizer
    sender: TaskSender
    clients: peers.ServiceClients


async def _network_nodes(clients: peers.ServiceClients) -> list[scheduler_pb2.Node]:
    nodes: list[scheduler_pb2.Node] = []
    token = ""
    while True:
        page = await clients.scheduler.ListNodes(scheduler_pb2.ListNodesRequest(
            filter="network_node=true state=UP disabled=false", page_token=token))
        nodes += list(page.nodes)
        token = page.next_page_token
        if not token:
            return nodes


async def choose_node(env: Env) -> str:
    """The UP, enabled network node hosting the fewest routers (by name on a tie).

    FAILED_PRECONDITION ``nubis.router.no_network_node`` when there is none.
    """
    nodes = await _network_nodes(env.clients)
    if not nodes:
        raise errors.FailedPrecondition(
            "no network node can host the router: no UP, enabled node has network_node set",
            reason=NO_NODE)
    routers, _ = await env.store.list_all(keys.ROUTERS, Router)
    hosted: dict[str, int] = {}
    for item in routers:
        hosted[item.value.node] = hosted.get(item.value.node, 0) + 1
    return min(nodes, key=lambda node: (hosted.get(node.name, 0), node.name)).name


async def bind_to_node(env: Env, port_id: str, router: Router) -> None:
    """Bind a router port to the router's node, so its network is realized there."""
    if not router.node:
        return  # not placed (the router is ERROR until it is)
    owner = (await env.store.get(keys.port(port_id), port_pb2.Port)).value.device_owner
    await binding.bind(env.store, env.realizer, port_pb2.BindPortRequest(
        id=port_id, node=router.node, device_id=router.meta.id, device_owner=owner))


def _prefixed(address: str, cidr: str) -> str:
    return f"{address}/{ipaddress.ip_network(cidr).prefixlen}"


async def _port_and_subnets(store: Store, port_id: str
                            ) -> tuple[port_pb2.Port | None, dict[str, subnet_pb2.Subnet]]:
    found = await store.find(keys.port(port_id), port_pb2.Port)
    if found is None:
        return None, {}
    subnets: dict[str, subnet_pb2.Subnet] = {}
    for fixed in found.value.fixed_ips:
        item = await store.find(keys.subnet(fixed.subnet_id), subnet_pb2.Subnet)
        if item is not None:
            subnets[fixed.subnet_id] = item.value
    return found.value, subnets


async def _interfaces(store: Store, router: Router) -> list[tasks_pb2.RouterInterface]:
    legs: list[tasks_pb2.RouterInterface] = []
    for interface in router.interfaces:
        found, subnets = await _port_and_subnets(store, interface.port_id)
        subnet = subnets.get(interface.subnet_id)
        if found is None or subnet is None:
            continue
        legs.append(tasks_pb2.RouterInterface(
            network_id=found.network_id, address=_prefixed(interface.ip_address, subnet.cidr),
            mac_address=found.mac_address, port_id=found.meta.id))
    return legs


async def _gateway(store: Store, router: Router) -> tasks_pb2.RouterGateway | None:
    gateway = router.external_gateway
    if not router.HasField("external_gateway") or not gateway.port_id:
        return None
    found, subnets = await _port_and_subnets(store, gateway.port_id)
    if found is None:
        return None
    for fixed in found.fixed_ips:
        subnet = subnets.get(fixed.subnet_id)
        if subnet is not None and ipaddress.ip_address(fixed.ip_address).version == 4:
            return tasks_pb2.RouterGateway(
                network_id=found.network_id, address=_prefixed(fixed.ip_address, subnet.cidr),
                next_hop=subnet.gateway_ip, mac_address=found.mac_address,
                enable_snat=gateway.enable_snat if gateway.HasField("enable_snat") else True,
                port_id=found.meta.id)
    return None


async def floating_ips_of(store: Store, router_id: str) -> list[Versioned[FloatingIp]]:
    """The floating IPs the router carries (associated through it)."""
    items, _ = await store.list_all(keys.FLOATING_IPS, FloatingIp)
    return [item for item in items if item.value.router_id == router_id]


async def desired_state(store: Store, router: Router) -> tasks_pb2.EnsureRouterRequest:
    """Everything the router's node must hold of it."""
    request = tasks_pb2.EnsureRouterRequest(router_id=router.meta.id,
                                            interfaces=await _interfaces(store, router))
    gateway = await _gateway(store, router)
    if gateway is not None:
        request.gateway.CopyFrom(gateway)
        for item in await floating_ips_of(store, router.meta.id):
            fip = item.value
            if fip.port_id and fip.fixed_ip_address:
                request.floating_ips.add(floating_ip_address=fip.floating_ip_address,
                                         fixed_ip_address=fip.fixed_ip_address,
                                         floating_ip_id=fip.meta.id)
    for route in router.routes:
        request.routes.add(destination=route.destination, nexthop=route.nexthop)
    return request


def _is_up(router: Router) -> bool:
    return router.admin_state_up if router.HasField("admin_state_up") else True


async def _send(env: Env, router: Router) -> tuple[Router.State.ValueType,
                                                   resource_pb2.Fault | None]:
    operation = tasks.new_operation_id()
    if not router.node:
        return Router.ERROR, resource_pb2.Fault(
            reason=NO_NODE, message="the router has no network node", time=resources.now())
    try:
        if _is_up(router):
            request = await desired_state(env.store, router)
            await env.sender.send(router.node, tasks.ENSURE_ROUTER, request,
                                  operation_id=operation)
            return Router.ACTIVE, None
        await env.sender.send(router.node, tasks.REMOVE_ROUTER,
                              tasks_pb2.RemoveRouterRequest(router_id=router.meta.id),
                              operation_id=operation)
        return Router.DOWN, None
    except errors.NubisError as exc:
        log.warning("router not realized", router_id=router.meta.id, node=router.node,
                    reason=exc.reason, error=exc.message, operation_id=operation)
        return Router.ERROR, resource_pb2.Fault(reason=exc.reason, message=exc.message,
                                                time=resources.now())


async def realize(env: Env, router_id: str) -> None:
    """Bring the router's node to the router's newest state and record the outcome."""
    for _ in range(_REALIZE_ROUNDS):
        found = await env.store.find(keys.router(router_id), Router)
        if found is None:
            return
        state, fault = await _send(env, found.value)
        record = Router()
        record.CopyFrom(found.value)
        record.state = state
        record.ClearField("fault")
        if fault is not None:
            record.fault.CopyFrom(fault)
        try:
            await env.store.replace(keys.router(router_id), record,
                                    expect_revision=found.mod_revision)
        except (errors.Conflict, errors.NotFound):
            continue  # changed while it was sent: send the newer state
        await _mark_floating_ips(env.store, router_id, state == Router.ACTIVE)
        return


async def _mark_floating_ips(store: Store, router_id: str, realized: bool) -> None:
    """Associated floating IPs of the router go ACTIVE once it is realized (DOWN otherwise)."""
    for item in await floating_ips_of(store, router_id):
        wanted = FloatingIp.ACTIVE if realized and item.value.port_id else FloatingIp.DOWN

        def mutate(fip: FloatingIp, state: FloatingIp.State.ValueType = wanted
                   ) -> FloatingIp | None:
            if fip.state == state or fip.router_id != router_id:
                return None
            fip.state = state
            return fip

        try:
            await store.update(item.key, FloatingIp, mutate)
        except errors.NotFound:
            continue


async def realize_all(env: Env, router_ids: Iterable[str]) -> None:
    for router_id in dict.fromkeys(router_id for router_id in router_ids if router_id):
        await realize(env, router_id)


async def remove(env: Env, router_id: str, node: str) -> None:
    """Tear the router down on its node (best effort: a node that is gone has nothing)."""
    try:
        await env.sender.send(node, tasks.REMOVE_ROUTER,
                              tasks_pb2.RemoveRouterRequest(router_id=router_id),
                              operation_id=tasks.new_operation_id())
    except errors.NubisError as exc:
        log.warning("router not removed from its node", router_id=router_id, node=node,
                    reason=exc.reason, error=exc.message)


async def reconcile_once(env: Env) -> int:
    """Realize every router still BUILD or in ERROR (a node that was away, a replica that died).

    Returns how many it tried.
    """
    items, _ = await env.store.list_all(keys.ROUTERS, Router)
    behind = [item.value.meta.id for item in items
              if item.value.state in (Router.BUILD, Router.ERROR)]
    gate = asyncio.Semaphore(_RECONCILE_CONCURRENCY)

    async def one(router_id: str) -> None:
        async with gate:
            await realize(env, router_id)

    await asyncio.gather(*(one(router_id) for router_id in behind))
    return len(behind)


async def reconcile_loop(env: Env) -> None:
    """Forever: a reconcile pass, then `realize_interval` seconds (supervised by the service)."""
    while True:
        await reconcile_once(env)
        await asyncio.sleep(env.settings.realize_interval)
