"""IPAM: fixed IPs and MACs that can never be given twice, however many replicas race.

Every allocated address is the key ``network/ipam/<subnet>/<address>`` and
every MAC ``network/macs/<mac>`` (DESIGN.md §3). `allocate` runs inside the
transaction of whatever holds the address (a port, a floating IP, a router
gateway): it reads the key, which makes the commit compare it absent, and
writes it with the holder. Two transactions that picked the same address
cannot both commit; the loser's body runs again on the fresh values, sees
the address taken and picks another. `release` deletes the key in the
holder's own delete transaction, so the address is free the moment the
holder is gone.

Choosing a free address stays cheap under many concurrent clients: a
transaction reads a few random addresses of the pools at once (one round
trip; on a pool that is mostly free the first one nearly always is) and only
when all of them are taken — the pool is nearly full — lists the subnet's
allocations once to pick among what is left. A pool with nothing left is
RESOURCE_EXHAUSTED ``nubis.ipam.exhausted``.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from dataclasses import dataclass, field

from nubis.network.v1 import ipam_pb2, network_pb2, subnet_pb2

from services.common import errors
from services.common.store import Store, Txn
from services.network import keys, validation

EXHAUSTED = "nubis.ipam.exhausted"
ADDRESS_IN_USE = "nubis.ipam.address_in_use"
MAC_IN_USE = "nubis.ipam.mac_in_use"
ROUTER_INTERFACE = "network:router_interface"
# Scans of a nearly full subnet one allocation makes before it reports the race as a conflict.
_SCANS = 8
_MAC_ATTEMPTS = 16
# A scan leaving at most this many free addresses reads every one of them at once.
_READ_ALL = 64
# A subnet's taken fraction is estimated from its first guesses' fates, starting as if
# this many had been found free (one early collision on a mostly free pool is chance).
_PRIOR_FREE = 32.0
# Guesses the estimate weighs: past this many, older ones count half.
_GUESSES_KEPT = 1024.0
# Guesses are read first, not taken blind, once a transaction making that many on the
# subnet would more likely than not find one taken (and run again).
_RERUN_ODDS = 0.5
# The random guesses of this process: seeded once from the OS (so replicas guess apart),
# not per create (a seed reads os.urandom and hashes it).
RNG = random.Random()


def _pools(subnet: subnet_pb2.Subnet) -> list[validation.Pool]:
    return list(_parsed_pools(tuple((pool.start, pool.end) for pool in subnet.allocation_pools)))


@functools.lru_cache(maxsize=1024)
def _parsed_pools(ranges: tuple[tuple[str, str], ...]) -> tuple[validation.Pool, ...]:
    """Pools parsed once per distinct text (every create of a subnet parses the same)."""
    return tuple(validation.Pool(int(ipaddress.ip_address(start)), int(ipaddress.ip_address(end)))
                 for start, end in ranges)


def _reserved(subnet: subnet_pb2.Subnet) -> frozenset[int]:
    """Addresses of the subnet no holder may take: its gateway and its DHCP server's."""
    return _parsed_reserved(subnet.gateway_ip, subnet.dhcp_address)


@functools.lru_cache(maxsize=1024)
def _parsed_reserved(*texts: str) -> frozenset[int]:
    return frozenset(int(ipaddress.ip_address(text)) for text in texts if text)


def pool_size(subnet: subnet_pb2.Subnet) -> int:
    """Addresses in the subnet's allocation pools."""
    return sum(pool.size for pool in _pools(subnet))


def _random_address(pools: list[validation.Pool], total: int, rng: random.Random) -> int:
    offset = rng.randrange(total)
    for pool in pools:
        if offset < pool.size:
            return pool.first + offset
        offset -= pool.size
    raise AssertionError("offset beyond the pools")


def exhausted(subnet: subnet_pb2.Subnet) -> errors.ResourceExhausted:
    return errors.ResourceExhausted(
        f"no free address left in subnet {subnet.meta.id} ({subnet.cidr})", reason=EXHAUSTED,
        metadata={"subnet_id": subnet.meta.id, "network_id": subnet.network_id})


def _hold(txn: Txn, subnet: subnet_pb2.Subnet, value: int, holder: ipam_pb2.IpAllocation) -> str:
    text = validation.address(value, subnet.ip_version or 4)
    record = ipam_pb2.IpAllocation()
    record.CopyFrom(holder)
    record.subnet_id, record.network_id, record.ip_address = \
        subnet.meta.id, subnet.network_id, text
    txn.put(keys.fixed_ip(subnet.meta.id, text), record)
    return text


def random_candidates(subnet: subnet_pb2.Subnet, count: int, rng: random.Random) -> list[int]:
    """Up to `count` random pool addresses of `subnet` (not its gateway or DHCP address)."""
    pools = _pools(subnet)
    total = sum(pool.size for pool in pools)
    if total == 0:
        return []
    kept = _reserved(subnet)
    return list(dict.fromkeys(value for value in (
        _random_address(pools, total, rng) for _ in range(count)) if value not in kept))


def key_of(subnet: subnet_pb2.Subnet, value: int) -> str:
    """The IPAM key of address `value` of `subnet`."""
    return keys.fixed_ip(subnet.meta.id, validation.address(value, subnet.ip_version or 4))


@dataclass
class Hints:
    """One replica's IPAM memory: what its creates are trying now, what its last scans left.

    Only hints: every choice is still compared in the transaction. They keep
    concurrent creates of one replica off each other's addresses and spare a
    nearly full subnet a scan per attempt.
    """

    trying: dict[str, set[int]] = field(default_factory=dict)
    free: dict[str, list[int]] = field(default_factory=dict)
    # Per subnet: first guesses seen, and how many of them were found taken.
    guessed: dict[str, list[float]] = field(default_factory=dict)

    def crowded(self, subnet_id: str, guesses: int = 1) -> bool:
        """A transaction making `guesses` guesses on this subnet would more likely than not
        find one taken: read them before trying them."""
        seen = self.guessed.get(subnet_id)
        if seen is None:
            return False
        taken = seen[1] / (seen[0] + _PRIOR_FREE)
        return 1.0 - (1.0 - taken) ** guesses > _RERUN_ODDS

    def guess_seen(self, subnet_id: str, taken: bool) -> None:
        """A first guess on the subnet was found free or taken."""
        seen = self.guessed.setdefault(subnet_id, [0.0, 0.0])
        seen[0] += 1.0
        seen[1] += taken
        if seen[0] > _GUESSES_KEPT:
            seen[0] /= 2.0
            seen[1] /= 2.0

    def take(self, subnet_id: str, value: int) -> None:
        self.trying.setdefault(subnet_id, set()).add(value)
        left = self.free.get(subnet_id)
        if left is not None and value in left:
            left.remove(value)

    def done(self, held: list[tuple[str, int]]) -> None:
        """The transaction that tried these ended (committed or not)."""
        for subnet_id, value in held:
            trying = self.trying.get(subnet_id)
            if trying is not None:
                trying.discard(value)
                if not trying:
                    del self.trying[subnet_id]


async def allocate(
    txn: Txn, store: Store, subnet: subnet_pb2.Subnet, holder: ipam_pb2.IpAllocation, *,
    wanted: str = "", field: str = "ip_address", candidates: int = 3,
    rng: random.Random | None = None, first: list[int] | None = None,
    hints: Hints | None = None, held: list[tuple[str, int]] | None = None,
) -> str:
    """Hold an address of `subnet` for `holder` in `txn` and return it.

    `wanted` is honoured (any host address of the CIDR but the gateway and the
    DHCP server's) or ALREADY_EXISTS ``nubis.ipam.address_in_use``; otherwise a
    free pool address is chosen: `first` (addresses the caller already read in
    `txn`), then `candidates` random ones at once, then from what the last scan
    of the subnet's allocations left, then from a new scan. `store` serves the
    scan of a nearly full pool. With `hints`, the addresses tried are recorded
    in `held` for the caller to hand back (`Hints.done`) once its transaction ended.
    """
    if wanted:
        return await _allocate_wanted(txn, subnet, holder, wanted, field)
    if not subnet.allocation_pools:
        raise exhausted(subnet)
    chooser = _Chooser(txn, store, subnet, holder, hints or Hints(),
                       held if held is not None else [], rng or RNG)
    if first:
        found = await chooser.first_of(first)
        chooser.hints.guess_seen(subnet.meta.id, taken=found is None)
        if found is not None:
            return found
    found = await chooser.first_of(random_candidates(subnet, candidates, chooser.rng))
    if found is not None:
        return found
    return await chooser.from_scans(candidates)


@dataclass
class _Chooser:
    """One allocation's search for a free address of one subnet."""

    txn: Txn
    store: Store
    subnet: subnet_pb2.Subnet
    holder: ipam_pb2.IpAllocation
    hints: Hints
    held: list[tuple[str, int]]
    rng: random.Random

    @property
    def busy(self) -> set[int]:
        """Addresses the replica's other creates are trying now (not this one's own: a
        rerun tries its earlier guesses again, on fresh values)."""
        trying = self.hints.trying.get(self.subnet.meta.id, set())
        mine = {value for subnet_id, value in self.held if subnet_id == self.subnet.meta.id}
        return trying - mine if mine else trying

    async def first_of(self, values: list[int], *, skip_busy: bool = True) -> str | None:
        kept, busy = _reserved(self.subnet), self.busy
        values = [value for value in values
                  if value not in kept and not (skip_busy and value in busy)]
        chosen = await _first_free(self.txn, self.subnet, values)
        if chosen is None:
            return None
        self.hints.take(self.subnet.meta.id, chosen)
        self.held.append((self.subnet.meta.id, chosen))
        return _hold(self.txn, self.subnet, chosen, self.holder)

    async def from_scans(self, candidates: int) -> str:
        """A pick among what the last scan left (or a new scan found); none left: exhausted."""
        subnet_id = self.subnet.meta.id
        for scan in range(_SCANS):
            left = self.hints.free.get(subnet_id) if not scan else None
            if not left:
                left = await _free_addresses(self.store, self.subnet, _pools(self.subnet),
                                             _reserved(self.subnet))
                if not left:
                    raise exhausted(self.subnet)
                self.hints.free[subnet_id] = left
            if len(left) <= _READ_ALL:
                # Few left: read them all. None free as this transaction sees them (its own
                # writes included, a batch of creates holding the rest) is exhaustion.
                found = await self.first_of(self.rng.sample(left, len(left)), skip_busy=False)
                if found is None and scan:
                    raise exhausted(self.subnet)
            else:
                idle = [value for value in left if value not in self.busy] or left
                found = await self.first_of(self.rng.sample(idle, min(len(idle), candidates)),
                                            skip_busy=False)
            if found is not None:
                return found
        raise errors.Conflict(f"addresses of subnet {subnet_id} kept being taken; retry",
                              metadata={"subnet_id": subnet_id})


async def _first_free(txn: Txn, subnet: subnet_pb2.Subnet, values: list[int]) -> int | None:
    """The first of `values` whose key is absent, all read in one round trip."""
    found = await txn.get_many([(key_of(subnet, value), ipam_pb2.IpAllocation)
                                for value in values])
    for value, item in zip(values, found, strict=True):
        if item is None:
            return value
    return None


async def _free_addresses(store: Store, subnet: subnet_pb2.Subnet,
                          pools: list[validation.Pool], kept: frozenset[int]) -> list[int]:
    used = {int(ipaddress.ip_address(alloc.ip_address))
            for alloc in await allocations(store, subnet.meta.id)}
    return [value for pool in pools for value in range(pool.first, pool.last + 1)
            if value not in used and value not in kept]


async def _allocate_wanted(txn: Txn, subnet: subnet_pb2.Subnet,
                           holder: ipam_pb2.IpAllocation, wanted: str, field: str) -> str:
    violations = errors.ViolationCollector()
    parsed = validation.parse_address(violations, field, wanted)
    violations.check("invalid fixed IP")
    assert parsed is not None
    cidr = ipaddress.ip_network(subnet.cidr)
    value = int(parsed)
    if parsed.version != cidr.version or parsed not in cidr \
            or value not in validation.host_range(cidr):
        violations.add(field, f"{wanted} is not a host address of subnet {subnet.cidr}")
    elif value in _reserved(subnet) and not _router_gateway(subnet, holder, value):
        violations.add(field, f"{wanted} is the subnet's gateway or DHCP address")
    violations.check("invalid fixed IP")
    text = validation.address(value, cidr.version)
    taken = await txn.get(keys.fixed_ip(subnet.meta.id, text), ipam_pb2.IpAllocation)
    if taken is not None:
        raise errors.AlreadyExists(
            f"{text} is already allocated in subnet {subnet.meta.id}", reason=ADDRESS_IN_USE,
            metadata={"subnet_id": subnet.meta.id, "ip_address": text})
    return _hold(txn, subnet, value, holder)


def _router_gateway(subnet: subnet_pb2.Subnet, holder: ipam_pb2.IpAllocation,
                    value: int) -> bool:
    """A router's interface on the subnet takes its gateway address (the one holder that may)."""
    return holder.owner == ROUTER_INTERFACE and bool(subnet.gateway_ip) \
        and value == int(ipaddress.ip_address(subnet.gateway_ip))


def release(txn: Txn, subnet_id: str, address: str) -> None:
    """Free `address` of `subnet_id` in `txn` (the holder's own delete transaction)."""
    txn.delete(keys.fixed_ip(subnet_id, address))


async def allocations(store: Store, subnet_id: str) -> list[ipam_pb2.IpAllocation]:
    """Every address held in the subnet, read from the keys themselves."""
    items, _ = await store.list_all(keys.subnet_ips(subnet_id), ipam_pb2.IpAllocation)
    return [item.value for item in items]


def random_mac(prefix: str, rng: random.Random) -> str:
    return prefix + "".join(f":{rng.randrange(256):02x}" for _ in range(3))


async def allocate_mac(txn: Txn, holder: ipam_pb2.MacAllocation, *, prefix: str,
                       wanted: str = "", field: str = "mac_address", guess: str = "",
                       rng: random.Random | None = None) -> str:
    """Hold a MAC for a port in `txn`: `wanted` (ALREADY_EXISTS if held) or a random one.

    `guess` is a random MAC the caller already read in `txn`, tried first.
    """
    rng = rng or RNG
    if wanted:
        violations = errors.ViolationCollector()
        mac = validation.check_mac(violations, field, wanted)
        violations.check("invalid MAC address")
        if await txn.get(keys.mac(mac), ipam_pb2.MacAllocation) is not None:
            raise errors.AlreadyExists(f"MAC {mac} is already in use", reason=MAC_IN_USE,
                                       metadata={"mac_address": mac})
        return _hold_mac(txn, holder, mac)
    for attempt in range(_MAC_ATTEMPTS):
        mac = guess if guess and not attempt else random_mac(prefix, rng)
        if await txn.get(keys.mac(mac), ipam_pb2.MacAllocation) is None:
            return _hold_mac(txn, holder, mac)
    raise errors.Conflict("no free MAC address found; retry")


def _hold_mac(txn: Txn, holder: ipam_pb2.MacAllocation, mac: str) -> str:
    record = ipam_pb2.MacAllocation()
    record.CopyFrom(holder)
    record.mac_address = mac
    txn.put(keys.mac(mac), record)
    return mac


def release_mac(txn: Txn, mac: str) -> None:
    txn.delete(keys.mac(mac))


async def availability(store: Store, net: network_pb2.Network) -> network_pb2.NetworkIpAvailability:
    """Used and total addresses per subnet of `net`, counted from the IPAM keys themselves."""
    reply = network_pb2.NetworkIpAvailability(network_id=net.meta.id, network_name=net.meta.name)
    for subnet_id in net.subnet_ids:
        found = await store.find(keys.subnet(subnet_id), subnet_pb2.Subnet)
        if found is None:
            continue
        subnet = found.value
        used = len(await allocations(store, subnet_id))
        reply.subnets.add(subnet_id=subnet_id, cidr=subnet.cidr, ip_version=subnet.ip_version,
                          total_ips=pool_size(subnet), used_ips=used)
        reply.total_ips += pool_size(subnet)
        reply.used_ips += used
    return reply
