"""Flavors (Nova's): the cloud-wide sizes instances boot with, their access and their traits.

A flavor is ``compute/flavors/<id>``; its name is unique cloud-wide through
``compute/flavor-names/<name>`` (holding the id), read and written in the same
transaction as the flavor, so two racing creates of one name cannot both win.
Sizes never change once made: an instance copies them when it boots, which is
also why deleting a flavor is allowed while instances still use it.

Public flavors are visible to every project; a private one only to the projects
in its access list (changed one project at a time by `change_access`), and to
cloud-admins and other nubis services. Extra specs ``trait:<NAME>=required`` /
``forbidden`` are the source of `required_traits` / `forbidden_traits`, as in Nova.

`seed_defaults` writes Nova's classic m1.* set once per cloud, guarded by the
``compute/default-flavors`` marker: an operator who deletes one never sees it again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from google.protobuf import wrappers_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import compute_service_pb2, flavor_pb2

from services.common import errors, filtering, pages, policy, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.compute import keys

Flavor = flavor_pb2.Flavor
State = Flavor.State

CREATE_METHOD = resources.method(compute_service_pb2.DESCRIPTOR, "ComputeService", "CreateFlavor")
PAGE_LISTING = "flavors"
UPDATABLE = ("name", "description", "labels", "state", "is_public", "extra_specs")
SIZES = ("vcpus", "ram_mb", "disk_gb", "ephemeral_gb", "swap_mb")

DISABLED = "nubis.flavor.disabled"
NAME_TAKEN = "nubis.flavor.name_taken"
PUBLIC = "nubis.flavor.public"
IMMUTABLE = "nubis.flavor.immutable"

# Bounds on what one flavor may ask for: large enough for any real host, small
# enough that sums of them never overflow a placement record.
MAX_VCPUS = 4096
MIN_RAM_MB = 64
MAX_RAM_MB = 64 << 20  # 64 TiB
MAX_DISK_GB = 1 << 20  # 1 PiB
MAX_SWAP_MB = 1 << 24
MAX_EXTRA_SPECS = 128
MAX_ACCESS = 1024
MAX_DESCRIPTION = 1024
TRAIT_PREFIX = "trait:"
REQUIRED = "required"
FORBIDDEN = "forbidden"
_SPEC_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}$")
# Placement's trait syntax (the scheduler checks traits with the same pattern).
_TRAIT = re.compile(r"^[A-Z][A-Z0-9_]{0,254}$")

# Nova's classic defaults: (name, vcpus, ram_mb, disk_gb).
DEFAULTS: tuple[tuple[str, int, int, int], ...] = (
    ("m1.tiny", 1, 512, 1),
    ("m1.small", 1, 2048, 20),
    ("m1.medium", 2, 4096, 40),
    ("m1.large", 4, 8192, 80),
    ("m1.xlarge", 8, 16384, 160),
)


# --- reading and visibility -------------------------------------------------------------

def sees_all(caller: Principal | None) -> bool:
    """Cloud-admins and other nubis services see every flavor (None: no authentication)."""
    return caller is None or policy.is_cloud_admin(caller) or policy.is_service(caller)


def visible_to(flavor: flavor_pb2.Flavor, project_id: str) -> bool:
    """Whether `project_id` may see (and boot with) `flavor`."""
    return flavor.is_public or (bool(project_id) and project_id in flavor.access_project_ids)


def _visible(caller: Principal | None, flavor: flavor_pb2.Flavor) -> bool:
    return sees_all(caller) or (caller is not None and visible_to(flavor, caller.project_id))


def _not_found(flavor_id: str, field: str = "id") -> errors.NotFound:
    return errors.NotFound(f"flavor {flavor_id} not found",
                           metadata={"flavor_id": flavor_id, "field": field})


def _with_revision(found: Versioned[flavor_pb2.Flavor]) -> flavor_pb2.Flavor:
    flavor = found.value
    flavor.meta.revision = found.mod_revision
    return flavor


async def fetch(store: Store, flavor_id: str, field: str = "id") -> flavor_pb2.Flavor:
    """The flavor record (meta.revision set), whoever asks; NotFound if absent."""
    resources.check_id(flavor_id, field)
    found = await store.find(keys.flavor(flavor_id), flavor_pb2.Flavor)
    if found is None:
        raise _not_found(flavor_id, field)
    return _with_revision(found)


async def get(store: Store, caller: Principal | None, flavor_id: str) -> flavor_pb2.Flavor:
    """The flavor if `caller` may see it; NotFound otherwise (existence never leaks)."""
    flavor = await fetch(store, flavor_id)
    if not _visible(caller, flavor):
        raise _not_found(flavor_id)
    return flavor


async def usable(store: Store, project_id: str, flavor_id: str) -> flavor_pb2.Flavor:
    """The flavor an instance of `project_id` boots (or resizes) with.

    NotFound if it is missing or private without access for the project;
    FailedPrecondition `nubis.flavor.disabled` if an operator disabled it.
    """
    return check_usable(await fetch(store, flavor_id, "flavor_id"), project_id)


def check_usable(flavor: flavor_pb2.Flavor | None, project_id: str,
                 flavor_id: str = "") -> flavor_pb2.Flavor:
    """`flavor` (as read; None: absent) if an instance of `project_id` may boot it; the
    errors of `usable` otherwise."""
    if flavor is None or not visible_to(flavor, project_id):
        raise _not_found(flavor_id or (flavor.meta.id if flavor else ""), "flavor_id")
    if flavor.state == State.DISABLED:
        raise errors.FailedPrecondition(
            f"flavor {flavor.meta.name} ({flavor.meta.id}) is DISABLED: new instances and "
            "resizes may not use it", reason=DISABLED,
            metadata={"flavor_id": flavor.meta.id, "name": flavor.meta.name})
    return flavor


# --- checks -----------------------------------------------------------------------------

def _check_text(found: errors.ViolationCollector, field: str, value: str, limit: int) -> None:
    if len(value) > limit or any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        found.add(field, f"at most {limit} characters, no control characters")


def _check_sizes(found: errors.ViolationCollector, flavor: flavor_pb2.Flavor) -> None:
    bounds = {"vcpus": (1, MAX_VCPUS), "ram_mb": (MIN_RAM_MB, MAX_RAM_MB),
              "disk_gb": (0, MAX_DISK_GB), "ephemeral_gb": (0, MAX_DISK_GB),
              "swap_mb": (0, MAX_SWAP_MB)}
    for field, (low, high) in bounds.items():
        if not low <= getattr(flavor, field) <= high:
            found.add(f"flavor.{field}", f"must be {low} to {high}")


def _check_fields(found: errors.ViolationCollector, flavor: flavor_pb2.Flavor,
                  chosen: Iterable[str]) -> None:
    """Check the caller-settable fields named by `chosen` (bare names, `meta.` dropped)."""
    chosen = set(chosen)
    if "name" in chosen:
        resources.check_name(found, "flavor.meta.name", flavor.meta.name)
    if "description" in chosen:
        _check_text(found, "flavor.meta.description", flavor.meta.description, MAX_DESCRIPTION)
    if "labels" in chosen:
        resources.check_labels(found, "flavor.meta.labels", dict(flavor.meta.labels))
    if "state" in chosen and flavor.state not in (State.ACTIVE, State.DISABLED):
        found.add("flavor.state", "ACTIVE or DISABLED")
    if "extra_specs" in chosen:
        check_extra_specs(found, flavor.extra_specs)


def check_extra_specs(found: errors.ViolationCollector, specs: Mapping[str, str]) -> None:
    """Keys of ``[A-Za-z0-9_.:-]``; ``trait:<NAME>`` takes `required` or `forbidden`."""
    if len(specs) > MAX_EXTRA_SPECS:
        found.add("flavor.extra_specs", f"at most {MAX_EXTRA_SPECS} extra specs")
    for key, value in specs.items():
        field = f"flavor.extra_specs.{key[:64]}"
        if not _SPEC_KEY.fullmatch(key):
            found.add(field, "keys are 1-255 of [A-Za-z0-9_.:-], starting alphanumeric")
            continue
        _check_text(found, field, value, 255)
        if key.startswith(TRAIT_PREFIX):
            if not _TRAIT.fullmatch(key[len(TRAIT_PREFIX):]):
                found.add(field, "trait names are upper-case letters, digits and '_'")
            if value not in (REQUIRED, FORBIDDEN):
                found.add(field, f"a trait is {REQUIRED!r} or {FORBIDDEN!r}")


def _check_traits(found: errors.ViolationCollector, field: str, traits: Iterable[str]) -> None:
    for index, trait in enumerate(traits):
        if not _TRAIT.fullmatch(trait):
            found.add(f"flavor.{field}[{index}]", "upper-case letters, digits and '_'")


def _with_traits(flavor: flavor_pb2.Flavor) -> None:
    """Derive required/forbidden traits from the extra specs (their one source)."""
    required = sorted(key[len(TRAIT_PREFIX):] for key, value in flavor.extra_specs.items()
                      if key.startswith(TRAIT_PREFIX) and value == REQUIRED)
    forbidden = sorted(key[len(TRAIT_PREFIX):] for key, value in flavor.extra_specs.items()
                       if key.startswith(TRAIT_PREFIX) and value == FORBIDDEN)
    del flavor.required_traits[:]
    flavor.required_traits.extend(required)
    del flavor.forbidden_traits[:]
    flavor.forbidden_traits.extend(forbidden)


def _specs_of(sent: flavor_pb2.Flavor) -> dict[str, str]:
    """Extra specs of a create: the sent ones plus ``trait:`` entries for the sent trait lists."""
    specs = dict(sent.extra_specs)
    found = errors.ViolationCollector()
    for field, value in (("required_traits", REQUIRED), ("forbidden_traits", FORBIDDEN)):
        for trait in getattr(sent, field):
            earlier = specs.setdefault(f"{TRAIT_PREFIX}{trait}", value)
            if earlier != value:
                found.add(f"flavor.{field}", f"{trait} is both required and forbidden")
    found.check("invalid flavor")
    return specs


# --- create -----------------------------------------------------------------------------

def _new_flavor(sent: flavor_pb2.Flavor) -> flavor_pb2.Flavor:
    found = errors.ViolationCollector()
    _check_fields(found, sent, [field for field in UPDATABLE if field != "state"])
    if sent.state not in (State.STATE_UNSPECIFIED, State.ACTIVE, State.DISABLED):
        found.add("flavor.state", "ACTIVE (the default) or DISABLED")
    _check_sizes(found, sent)
    _check_traits(found, "required_traits", sent.required_traits)
    _check_traits(found, "forbidden_traits", sent.forbidden_traits)
    if sent.meta.id and not resources.is_uuid(sent.meta.id):
        found.add("flavor.meta.id", "a UUID, or empty for a new one")
    if sent.meta.project_id:
        found.add("flavor.meta.project_id", "flavors are cloud-wide: leave it empty")
    found.check("invalid flavor")
    meta = resources.fresh_meta(sent.meta)
    if sent.meta.id:
        meta.id = sent.meta.id
    flavor = flavor_pb2.Flavor(
        meta=meta, state=sent.state or State.ACTIVE, vcpus=sent.vcpus, ram_mb=sent.ram_mb,
        disk_gb=sent.disk_gb, ephemeral_gb=sent.ephemeral_gb, swap_mb=sent.swap_mb,
        is_public=sent.is_public, extra_specs=_specs_of(sent))
    spec_check = errors.ViolationCollector()
    check_extra_specs(spec_check, flavor.extra_specs)
    spec_check.check("invalid flavor")
    _with_traits(flavor)
    return flavor


def _name_taken(name: str) -> errors.AlreadyExists:
    return errors.AlreadyExists(f"a flavor named {name!r} already exists", reason=NAME_TAKEN,
                                metadata={"name": name})


async def _claim_name(txn: Txn, name: str, flavor_id: str) -> None:
    """Inside `txn`: the name index entry for `flavor_id`, or AlreadyExists if another holds it."""
    index = await txn.get(keys.flavor_name(name), resource_pb2.ResourceMeta)
    if index is not None and index.value.id != flavor_id:
        raise _name_taken(name)
    # A put after an absent read: the commit still requires the key to be free.
    txn.put(keys.flavor_name(name), resource_pb2.ResourceMeta(id=flavor_id, name=name))


async def create(store: Store, caller: Principal | None,
                 request: flavor_pb2.CreateFlavorRequest) -> flavor_pb2.Flavor:
    """A new flavor; with a request_id, a retry returns the first one."""
    flavor = _new_flavor(request.flavor)
    idempotency = requests.prepare(store, resources.scope(caller), CREATE_METHOD, request,
                                   request.request_id, validate_only=request.validate_only)

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        if await txn.get(keys.flavor(flavor.meta.id), flavor_pb2.Flavor) is not None:
            raise errors.AlreadyExists(f"flavor {flavor.meta.id} already exists",
                                       metadata={"flavor_id": flavor.meta.id})
        await _claim_name(txn, flavor.meta.name, flavor.meta.id)
        txn.put(keys.flavor(flavor.meta.id), flavor)
        await requests.remember(txn, idempotency, flavor.meta.id)
        return flavor.meta.id

    if request.validate_only:
        await _dry_run(store, flavor)
        flavor.meta.id = ""
        return flavor
    made = await store.atomic(body)
    return await fetch(store, made)


async def _dry_run(store: Store, flavor: flavor_pb2.Flavor) -> None:
    """What a create would refuse beyond the request itself: a taken name or id."""
    if await store.find(keys.flavor_name(flavor.meta.name), resource_pb2.ResourceMeta):
        raise _name_taken(flavor.meta.name)
    if await store.find(keys.flavor(flavor.meta.id), flavor_pb2.Flavor):
        raise errors.AlreadyExists(f"flavor {flavor.meta.id} already exists",
                                   metadata={"flavor_id": flavor.meta.id})


# --- update -----------------------------------------------------------------------------

def _check_mask(paths: Iterable[str]) -> list[str]:
    paths = list(paths)
    immutable = [path for path in paths if path in SIZES]
    if immutable:
        raise errors.InvalidArgument(
            f"flavor sizes never change ({', '.join(immutable)}): create another flavor",
            reason=IMMUTABLE,
            violations=[errors.FieldViolation("update_mask", f"{path} is immutable")
                        for path in immutable])
    return resources.check_mask(paths, UPDATABLE)


def _check_revision(revision: int, field: str) -> None:
    if revision < 0:
        raise errors.InvalidArgument("revision must not be negative", violations=[
            errors.FieldViolation(field, "must not be negative")])


def _apply(flavor: flavor_pb2.Flavor, sent: flavor_pb2.Flavor, chosen: Iterable[str]) -> None:
    for path in chosen:
        if path in ("name", "description"):
            setattr(flavor.meta, path, getattr(sent.meta, path))
        elif path == "labels":
            flavor.meta.labels.clear()
            flavor.meta.labels.update(sent.meta.labels)
        elif path == "extra_specs":
            flavor.extra_specs.clear()
            flavor.extra_specs.update(sent.extra_specs)
            _with_traits(flavor)
        else:
            setattr(flavor, path, getattr(sent, path))


async def update(store: Store, caller: Principal | None,
                 request: flavor_pb2.UpdateFlavorRequest) -> flavor_pb2.Flavor:
    """Change the masked fields; a non-zero meta.revision must still be the flavor's."""
    sent = request.flavor
    flavor_id = resources.check_id(sent.meta.id, "flavor.meta.id")
    chosen = _check_mask(request.update_mask.paths)
    found = errors.ViolationCollector()
    _check_fields(found, sent, chosen)
    found.check("invalid flavor")
    _check_revision(sent.meta.revision, "flavor.meta.revision")

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.flavor(flavor_id), flavor_pb2.Flavor)
        if current is None or not _visible(caller, current.value):
            raise _not_found(flavor_id)
        if sent.meta.revision and sent.meta.revision != current.mod_revision:
            raise errors.Conflict(f"flavor {flavor_id} changed since revision "
                                  f"{sent.meta.revision}", metadata={"flavor_id": flavor_id})
        flavor = current.value
        old_name = flavor.meta.name
        _apply(flavor, sent, chosen)
        if flavor.meta.name != old_name:
            await _claim_name(txn, flavor.meta.name, flavor_id)
            txn.delete(keys.flavor_name(old_name))
        flavor.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.flavor(flavor_id), flavor)

    await store.atomic(body)
    return await fetch(store, flavor_id)


# --- delete and access ------------------------------------------------------------------

async def delete(store: Store, caller: Principal | None, flavor_id: str,
                 revision: int = 0) -> None:
    """Delete the flavor and its name; instances booted from it keep their copy of it."""
    resources.check_id(flavor_id)
    _check_revision(revision, "revision")

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.flavor(flavor_id), flavor_pb2.Flavor)
        if current is None or not _visible(caller, current.value):
            raise _not_found(flavor_id)
        if revision and revision != current.mod_revision:
            raise errors.Conflict(f"flavor {flavor_id} changed since revision {revision}",
                                  metadata={"flavor_id": flavor_id})
        txn.delete(keys.flavor(flavor_id))
        index = await txn.get(keys.flavor_name(current.value.meta.name),
                              resource_pb2.ResourceMeta)
        if index is not None and index.value.id == flavor_id:
            txn.delete(keys.flavor_name(current.value.meta.name))

    await store.atomic(body)


async def change_access(store: Store, caller: Principal | None,
                        request: flavor_pb2.FlavorAccessRequest, *,
                        add: bool) -> flavor_pb2.Flavor:
    """Let one more project use a private flavor, or stop letting one."""
    flavor_id = resources.check_id(request.flavor_id, "flavor_id")
    project_id = resources.check_id(request.project_id, "project_id")

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.flavor(flavor_id), flavor_pb2.Flavor)
        if current is None or not _visible(caller, current.value):
            raise _not_found(flavor_id, "flavor_id")
        flavor = current.value
        if flavor.is_public:
            raise errors.FailedPrecondition(
                f"flavor {flavor_id} is public: every project may use it already",
                reason=PUBLIC, metadata={"flavor_id": flavor_id})
        projects = list(flavor.access_project_ids)
        if add:
            if project_id in projects:
                return
            if len(projects) >= MAX_ACCESS:
                raise errors.ResourceExhausted(
                    f"a flavor is shared with at most {MAX_ACCESS} projects",
                    reason="nubis.flavor.too_many_projects", metadata={"flavor_id": flavor_id})
            projects.append(project_id)
        elif project_id not in projects:
            raise errors.NotFound(f"project {project_id} has no access to flavor {flavor_id}",
                                  metadata={"flavor_id": flavor_id, "project_id": project_id})
        else:
            projects.remove(project_id)
        del flavor.access_project_ids[:]
        flavor.access_project_ids.extend(sorted(projects))
        flavor.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.flavor(flavor_id), flavor)

    await store.atomic(body)
    return await fetch(store, flavor_id)


# --- list -------------------------------------------------------------------------------

FILTER_KEYS: filtering.Keys = {
    "name": None, "state": frozenset(filtering.enum_names(State.DESCRIPTOR)),
    "is_public": frozenset({"true", "false"}), "vcpus": None, "ram_mb": None, "disk_gb": None,
}


def _fields(flavor: flavor_pb2.Flavor) -> dict[str, str]:
    return {"name": flavor.meta.name,
            "state": filtering.enum_name(State.DESCRIPTOR, flavor.state),
            "is_public": "true" if flavor.is_public else "false",
            "vcpus": str(flavor.vcpus), "ram_mb": str(flavor.ram_mb),
            "disk_gb": str(flavor.disk_gb)}


async def list_flavors(
    store: Store, caller: Principal | None, request: flavor_pb2.ListFlavorsRequest,
) -> tuple[list[flavor_pb2.Flavor], str]:
    """Flavors the caller may use (every one only for a cloud-admin asking), by id."""
    size = pages.page_size(request.page_size)
    every = caller is None or policy.list_scope(
        caller, all_projects=request.all_projects) is None
    wanted = filtering.parse(request.filter, FILTER_KEYS)
    items, _ = await store.list_all(keys.FLAVORS, flavor_pb2.Flavor)
    shown = [_with_revision(item) for item in items
             if (every or (caller is not None and visible_to(item.value, caller.project_id)))
             and wanted.matches(_fields(item.value), item.value.meta.labels)]
    return pages.page_of(shown, lambda flavor: flavor.meta.id, size=size,
                         page_token=request.page_token, listing=PAGE_LISTING,
                         well_formed=resources.is_uuid)


# --- the default set --------------------------------------------------------------------

def _default(name: str, vcpus: int, ram_mb: int, disk_gb: int) -> flavor_pb2.Flavor:
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name=name))
    return flavor_pb2.Flavor(meta=meta, state=State.ACTIVE, vcpus=vcpus, ram_mb=ram_mb,
                             disk_gb=disk_gb, is_public=True)


async def seed_defaults(store: Store) -> None:
    """Write the default flavors once per cloud, in one transaction with the marker.

    Racing replicas agree: each body reads the marker, and only one commit can
    write it. A name an operator already took keeps its flavor.
    """
    async def body(txn: Txn) -> None:
        if await txn.get(keys.DEFAULT_FLAVORS, wrappers_pb2.StringValue) is not None:
            return
        written = []
        for name, vcpus, ram_mb, disk_gb in DEFAULTS:
            if await txn.get(keys.flavor_name(name), resource_pb2.ResourceMeta) is not None:
                continue
            flavor = _default(name, vcpus, ram_mb, disk_gb)
            txn.put(keys.flavor(flavor.meta.id), flavor)
            txn.put(keys.flavor_name(name), resource_pb2.ResourceMeta(id=flavor.meta.id,
                                                                      name=name))
            written.append(name)
        txn.put(keys.DEFAULT_FLAVORS, wrappers_pb2.StringValue(value=" ".join(written)))

    await store.atomic(body)
