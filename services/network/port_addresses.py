"""A port's MAC and fixed IPs, chosen and held inside the transaction that creates it.

The create-if-absent keys themselves are `ipam`'s; this module decides what a
port asks for (the subnets it names, else one address per subnet of its
network) and what it tries first: a random MAC and one random address per
subnet (`guesses`), which a create on a mostly free pool need not even read
first (`Guesses.blind`): it takes them as absent, the commit compares them
absent, and a guess that was taken makes the commit run again on the fresh
values, which then show it taken, so the rerun reads other candidates.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from google.protobuf import message
from nubis.network.v1 import ipam_pb2, port_pb2, subnet_pb2

from services.common import errors
from services.common.store import Txn
from services.network import ipam, keys, validation
from services.network import subnet as subnet_module
from services.network.port_turns import Creation

Port = port_pb2.Port


async def _subnets(txn: Txn, subnet_ids: list[str]) -> dict[str, subnet_pb2.Subnet]:
    found = await txn.get_many([(keys.subnet(sid), subnet_pb2.Subnet) for sid in subnet_ids])
    return {sid: item.value for sid, item in zip(subnet_ids, found, strict=True)
            if item is not None}


def _requested(given: Port, subnets: dict[str, subnet_pb2.Subnet]) -> list[tuple[str, str, str]]:
    """(subnet id, wanted address, field) per address the port gets."""
    if not given.fixed_ips:
        ordered = sorted(subnets.values(), key=lambda subnet: (subnet.ip_version, subnet.cidr))
        return [(subnet.meta.id, "", "port.fixed_ips") for subnet in ordered]
    chosen = []
    for index, fixed in enumerate(given.fixed_ips):
        where = f"port.fixed_ips[{index}]"
        subnet_id = fixed.subnet_id
        if not subnet_id:
            subnet_id = _subnet_of(fixed.ip_address, subnets, where)
        elif subnet_id not in subnets:
            raise errors.InvalidArgument(
                f"subnet {subnet_id} is not a subnet of network {given.network_id}",
                violations=[errors.FieldViolation(f"{where}.subnet_id",
                                                  "not a subnet of the port's network")])
        chosen.append((subnet_id, fixed.ip_address, f"{where}.ip_address"))
    return chosen


def _subnet_of(address: str, subnets: dict[str, subnet_pb2.Subnet], where: str) -> str:
    value = ipaddress.ip_address(address)
    for subnet in subnets.values():
        if value in ipaddress.ip_network(subnet.cidr):
            return subnet.meta.id
    raise errors.InvalidArgument(
        f"{address} is in no subnet of the network",
        violations=[errors.FieldViolation(f"{where}.ip_address", "in no subnet of the network")])


Reads = list[tuple[str, type[message.Message]]]


@dataclass
class Guesses:
    """A random MAC and one random address per subnet, to read (or take blind) before trying."""

    mac: str
    picks: dict[str, list[int]]
    mac_read: Reads
    ip_reads: dict[str, Reads]

    @property
    def reads(self) -> Reads:
        return [*self.mac_read, *(read for reads in self.ip_reads.values() for read in reads)]

    def blind(self, txn: Txn, given: Port, hints: ipam.Hints, batch: int = 1) -> Reads:
        """Take the guesses as absent in `txn`; those to read instead: a MAC the caller
        named (likelier taken than a random one) and the addresses of subnets crowded for
        a transaction of `batch` creates."""
        rest = list(self.mac_read) if given.mac_address else []
        for key, _ in [] if given.mac_address else self.mac_read:
            txn.assume(key, None, 0)
        for subnet_id, reads in self.ip_reads.items():
            if hints.crowded(subnet_id, batch):
                rest += reads
                continue
            for key, _ in reads:
                txn.assume(key, None, 0)
        return rest


def guesses(creation: Creation, given: Port, subnets: dict[str, subnet_pb2.Subnet],
            rng: random.Random) -> Guesses:
    """What a create tries first (`hold_addresses`); read `reads` in one round trip first,
    or take them as absent (`Guesses.blind`)."""
    mac_guess = validation.normal_mac(given.mac_address) if given.mac_address \
        else ipam.random_mac(creation.settings.mac_prefix, rng)
    picks: dict[str, list[int]] = {}
    ip_reads: dict[str, Reads] = {}
    for subnet_id, wanted, _ in _requested(given, subnets):
        if not wanted and subnet_id not in picks and subnet_id in subnets:
            picks[subnet_id] = ipam.random_candidates(subnets[subnet_id], 1, rng)
            ip_reads[subnet_id] = [(ipam.key_of(subnets[subnet_id], value), ipam_pb2.IpAllocation)
                                   for value in picks[subnet_id]]
    return Guesses(mac_guess, picks, [(keys.mac(mac_guess), ipam_pb2.MacAllocation)], ip_reads)


async def hold_addresses(txn: Txn, creation: Creation, made: Port, given: Port,
                         subnet_ids: list[str], tried: list[tuple[str, int]],
                         guessed: Guesses | None = None) -> None:
    """The MAC and the fixed IPs, all held in `txn` (reset on each rerun of the body).

    A random MAC and one random address per subnet are read in one round trip
    first (or were, by the caller: `guessed`); on a mostly free pool that is all
    it takes.
    """
    del made.fixed_ips[:]
    subnets = await _subnets(txn, subnet_ids)
    if any(subnet_module.deleting(subnet) for subnet in subnets.values()):
        raise errors.FailedPrecondition("a subnet of the network is being deleted",
                                        reason="nubis.subnet.deleting")
    requested = _requested(given, subnets)
    rng = ipam.RNG
    if guessed is None:
        guessed = guesses(creation, given, subnets, rng)
        await txn.get_many(guessed.reads)
    made.mac_address = await ipam.allocate_mac(
        txn, ipam_pb2.MacAllocation(port_id=made.meta.id, network_id=made.network_id),
        prefix=creation.settings.mac_prefix, wanted=guessed.mac if given.mac_address else "",
        guess=guessed.mac, field="port.mac_address", rng=rng)
    holder = ipam_pb2.IpAllocation(port_id=made.meta.id, owner=made.device_owner or "port",
                                   project_id=made.meta.project_id)
    picks = dict(guessed.picks)
    for subnet_id, wanted, where in requested:
        address = await ipam.allocate(
            txn, creation.store, subnets[subnet_id], holder, wanted=wanted, field=where,
            candidates=creation.settings.ipam_candidates, rng=rng,
            first=picks.pop(subnet_id, []), hints=creation.turns.ipam_hints, held=tried)
        made.fixed_ips.add(subnet_id=subnet_id, ip_address=address)
