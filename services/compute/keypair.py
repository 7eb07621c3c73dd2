"""Key pairs (Nova's): SSH public keys a user injects into the instances they boot.

A key pair is ``compute/keypairs/<id>``; it belongs to the user who made it and
to the project that user made it in, and its name is unique per user (as in
Nova) through ``compute/keypair-names/<user>/<name>`` (holding the id), written
in the same transaction. Only its user (in that project) and cloud-admins see
it; everyone else gets NOT_FOUND.

A create either imports an OpenSSH public key (Ed25519, RSA of 1024 bits or
more, or ECDSA on NIST P-256/384/521) or, given none, generates an Ed25519 pair
and returns the private key once, in the create's answer: it is never stored.
The fingerprint is OpenSSH's SHA256 one, as `ssh-keygen -l` prints it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Iterable

from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import compute_service_pb2, keypair_pb2

from services.common import errors, filtering, pages, policy, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.compute import keys

KeyPair = keypair_pb2.KeyPair
KeyType = KeyPair.KeyType

CREATE_METHOD = resources.method(compute_service_pb2.DESCRIPTOR, "ComputeService",
                                 "CreateKeyPair")
PAGE_LISTING = "keypairs"
UPDATABLE = ("description", "labels")
NAME_TAKEN = "nubis.keypair.name_taken"
BAD_KEY = "nubis.keypair.bad_public_key"
# An OpenSSH public key line: a 16384-bit RSA key is ~2.8 KiB of base64.
MAX_PUBLIC_KEY = 16384
MAX_COMMENT = 255
MIN_RSA_BITS = 1024  # what OpenSSH itself refuses below (RequiredRSASize)
GENERATED_COMMENT = "generated-by-nubis"


# --- keys -------------------------------------------------------------------------------
# `cryptography` (some 13 MiB resident) is imported by the calls that read or make a key,
# not with the module: most compute processes never handle one.

def fingerprint(public_key: str) -> str:
    """OpenSSH's fingerprint of a public key line: ``SHA256:`` and the unpadded base64 digest."""
    blob = base64.b64decode(public_key.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _bad_key(description: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"invalid public_key: {description}", reason=BAD_KEY,
        violations=[errors.FieldViolation("key_pair.public_key", description)])


def normalized_public_key(text: str) -> str:
    """The key line as stored: ``<type> <base64>[ <comment>]``, or INVALID_ARGUMENT."""
    line = text.strip()
    if len(line) > MAX_PUBLIC_KEY or "\n" in line or "\r" in line:
        raise _bad_key(f"one OpenSSH public key line of at most {MAX_PUBLIC_KEY} characters")
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise _bad_key("expected '<type> <base64> [comment]', e.g. 'ssh-ed25519 AAAA... me@host'")
    from cryptography import exceptions
    from cryptography.hazmat.primitives import serialization

    try:
        loaded = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (ValueError, TypeError, binascii.Error, UnicodeError,
            exceptions.UnsupportedAlgorithm) as exc:
        raise _bad_key(f"not an OpenSSH public key ({type(exc).__name__})") from None
    _check_algorithm(loaded)
    canonical = loaded.public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH).decode()
    comment = parts[2].strip() if len(parts) == 3 else ""
    if len(comment) > MAX_COMMENT or any(ord(ch) < 0x20 or ch == "\x7f" for ch in comment):
        raise _bad_key(f"the comment is at most {MAX_COMMENT} printable characters")
    return f"{canonical} {comment}" if comment else canonical


def _check_algorithm(loaded: object) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(loaded, ed25519.Ed25519PublicKey):
        return
    if isinstance(loaded, rsa.RSAPublicKey):
        if loaded.key_size < MIN_RSA_BITS:
            raise _bad_key(f"an RSA key needs at least {MIN_RSA_BITS} bits")
        return
    if isinstance(loaded, ec.EllipticCurvePublicKey) and isinstance(
            loaded.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)):
        return
    raise _bad_key("only ssh-ed25519, ssh-rsa and ecdsa-sha2-nistp256/384/521 keys are accepted")


def generate() -> tuple[str, str]:
    """A new Ed25519 pair: (public key line, OpenSSH private key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
    secret = private.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()).decode()
    return f"{public} {GENERATED_COMMENT}", secret


# --- reading and visibility -------------------------------------------------------------

def _owned(caller: Principal | None, pair: keypair_pb2.KeyPair) -> bool:
    """A key pair is its user's, in the project it was made in; cloud-admins see all."""
    if caller is None or policy.is_cloud_admin(caller):
        return True
    return pair.user_id == caller.user_id and pair.meta.project_id == caller.project_id


def _not_found(id_or_name: str, field: str = "id") -> errors.NotFound:
    return errors.NotFound(f"key pair {id_or_name} not found",
                           metadata={"key_pair": id_or_name, "field": field})


def _with_revision(found: Versioned[keypair_pb2.KeyPair]) -> keypair_pb2.KeyPair:
    pair = found.value
    pair.meta.revision = found.mod_revision
    return pair


async def _resolve(store: Store, caller: Principal | None, id_or_name: str) -> str:
    """The id of a key pair named by id, or by name among the caller's own."""
    if resources.is_uuid(id_or_name):
        return id_or_name
    if caller is not None and resources.is_name(id_or_name):
        index = await store.find(keys.keypair_name(caller.user_id, id_or_name),
                                 resource_pb2.ResourceMeta)
        if index is not None:
            return index.value.id
    if not id_or_name:
        raise errors.InvalidArgument("id is required (a key pair id or name)", violations=[
            errors.FieldViolation("id", "a key pair id or name")])
    raise _not_found(id_or_name)


async def get(store: Store, caller: Principal | None, id_or_name: str) -> keypair_pb2.KeyPair:
    """The key pair if it is the caller's (or the caller is a cloud-admin); else NotFound."""
    pair_id = await _resolve(store, caller, id_or_name)
    found = await store.find(keys.keypair(pair_id), keypair_pb2.KeyPair)
    if found is None or not _owned(caller, found.value):
        raise _not_found(id_or_name)
    return _with_revision(found)


async def for_boot(store: Store, user_id: str, project_id: str,
                   name: str) -> keypair_pb2.KeyPair:
    """The key pair `name` of the user booting an instance in `project_id`; NotFound if none."""
    index = None
    if resources.is_name(name):
        index = await store.find(keys.keypair_name(user_id, name), resource_pb2.ResourceMeta)
    found = None if index is None else await store.find(keys.keypair(index.value.id),
                                                        keypair_pb2.KeyPair)
    if found is None or found.value.meta.project_id != project_id:
        raise errors.NotFound(f"key pair {name!r} not found", metadata={
            "key_name": name, "field": "key_name"})
    return _with_revision(found)


# --- create -----------------------------------------------------------------------------

def _check_meta(found: errors.ViolationCollector, pair: keypair_pb2.KeyPair,
                chosen: Iterable[str]) -> None:
    chosen = set(chosen)
    if "name" in chosen:
        resources.check_name(found, "key_pair.meta.name", pair.meta.name)
        if resources.is_uuid(pair.meta.name):
            # Get and Delete take an id or a name: a name shaped like an id would be ambiguous.
            found.add("key_pair.meta.name", "must not look like a UUID")
    if "description" in chosen:
        text = pair.meta.description
        if len(text) > 1024 or any(ord(ch) < 0x20 or ch == "\x7f" for ch in text):
            found.add("key_pair.meta.description", "at most 1024 characters, no control chars")
    if "labels" in chosen:
        resources.check_labels(found, "key_pair.meta.labels", dict(pair.meta.labels))


def _new_pair(caller: Principal | None, sent: keypair_pb2.KeyPair) -> tuple[
        keypair_pb2.KeyPair, str]:
    """The record to write and the private key to hand back ("" for an imported key)."""
    found = errors.ViolationCollector()
    _check_meta(found, sent, ("name", *UPDATABLE))
    if sent.key_type not in (KeyType.KEY_TYPE_UNSPECIFIED, KeyType.KEY_TYPE_SSH):
        found.add("key_pair.key_type", "only SSH key pairs are supported")
    if caller is None or not caller.user_id:
        found.add("key_pair", "a key pair belongs to a user: call with a user's token")
    found.check("invalid key pair")
    assert caller is not None
    private_key = ""
    if sent.public_key:
        public_key = normalized_public_key(sent.public_key)
    else:
        public_key, private_key = generate()
    pair = keypair_pb2.KeyPair(
        meta=resources.fresh_meta(sent.meta, caller.project_id), state=KeyPair.ACTIVE,
        public_key=public_key, fingerprint=fingerprint(public_key),
        key_type=KeyType.KEY_TYPE_SSH, user_id=caller.user_id)
    return pair, private_key


def _name_taken(name: str) -> errors.AlreadyExists:
    return errors.AlreadyExists(f"you already have a key pair named {name!r}",
                                reason=NAME_TAKEN, metadata={"name": name})


async def create(store: Store, caller: Principal | None,
                 request: keypair_pb2.CreateKeyPairRequest,
                 ) -> keypair_pb2.CreateKeyPairResponse:
    """Import or generate a key pair of the caller; a retry with its request_id gets the first.

    A replayed create answers the stored pair without the private key: that
    was only ever in the first answer.
    """
    pair, private_key = _new_pair(caller, request.key_pair)
    name_key = keys.keypair_name(pair.user_id, pair.meta.name)
    if request.validate_only:
        requests.prepare(store, resources.scope(caller), CREATE_METHOD, request,
                         request.request_id, validate_only=True)
        if await store.find(name_key, resource_pb2.ResourceMeta) is not None:
            raise _name_taken(pair.meta.name)
        pair.meta.id = ""
        return keypair_pb2.CreateKeyPairResponse(key_pair=pair)
    idempotency = requests.prepare(store, resources.scope(caller), CREATE_METHOD, request,
                                   request.request_id)

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        if await txn.get(name_key, resource_pb2.ResourceMeta) is not None:
            raise _name_taken(pair.meta.name)
        txn.put(name_key, resource_pb2.ResourceMeta(id=pair.meta.id, name=pair.meta.name))
        txn.put(keys.keypair(pair.meta.id), pair)
        await requests.remember(txn, idempotency, pair.meta.id)
        return pair.meta.id

    made = await store.atomic(body)
    stored = await store.get(keys.keypair(made), keypair_pb2.KeyPair)
    return keypair_pb2.CreateKeyPairResponse(
        key_pair=_with_revision(stored), private_key=private_key if made == pair.meta.id else "")


# --- update and delete ------------------------------------------------------------------

def _check_revision(revision: int, field: str) -> None:
    if revision < 0:
        raise errors.InvalidArgument("revision must not be negative", violations=[
            errors.FieldViolation(field, "must not be negative")])


async def _owned_in(txn: Txn, caller: Principal | None, pair_id: str, shown: str,
                    revision: int) -> keypair_pb2.KeyPair:
    current = await txn.get(keys.keypair(pair_id), keypair_pb2.KeyPair)
    if current is None or not _owned(caller, current.value):
        raise _not_found(shown)
    if revision and revision != current.mod_revision:
        raise errors.Conflict(f"key pair {shown} changed since revision {revision}",
                              metadata={"key_pair": shown})
    return current.value


async def update(store: Store, caller: Principal | None,
                 request: keypair_pb2.UpdateKeyPairRequest) -> keypair_pb2.KeyPair:
    """Change the description or labels (the key and its name never change)."""
    sent = request.key_pair
    chosen = resources.check_mask(request.update_mask.paths, UPDATABLE)
    found = errors.ViolationCollector()
    _check_meta(found, sent, chosen)
    found.check("invalid key pair")
    _check_revision(sent.meta.revision, "key_pair.meta.revision")
    pair_id = await _resolve(store, caller, sent.meta.id)

    async def body(txn: Txn) -> None:
        pair = await _owned_in(txn, caller, pair_id, sent.meta.id, sent.meta.revision)
        if "description" in chosen:
            pair.meta.description = sent.meta.description
        if "labels" in chosen:
            pair.meta.labels.clear()
            pair.meta.labels.update(sent.meta.labels)
        pair.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.keypair(pair_id), pair)

    await store.atomic(body)
    return await get(store, caller, pair_id)


async def delete(store: Store, caller: Principal | None, id_or_name: str,
                 revision: int = 0) -> None:
    """Delete the key pair and its name; instances booted with it keep the key."""
    _check_revision(revision, "revision")
    pair_id = await _resolve(store, caller, id_or_name)

    async def body(txn: Txn) -> None:
        pair = await _owned_in(txn, caller, pair_id, id_or_name, revision)
        txn.delete(keys.keypair(pair_id))
        name_key = keys.keypair_name(pair.user_id, pair.meta.name)
        index = await txn.get(name_key, resource_pb2.ResourceMeta)
        if index is not None and index.value.id == pair_id:
            txn.delete(name_key)

    await store.atomic(body)


# --- list -------------------------------------------------------------------------------

FILTER_KEYS: filtering.Keys = {
    "name": None, "user_id": None,
    "key_type": frozenset(filtering.enum_names(KeyType.DESCRIPTOR)),
}


def _fields(pair: keypair_pb2.KeyPair) -> dict[str, str]:
    return {"name": pair.meta.name, "user_id": pair.user_id,
            "key_type": filtering.enum_name(KeyType.DESCRIPTOR, pair.key_type)}


async def _own(store: Store, caller: Principal) -> list[Versioned[keypair_pb2.KeyPair]]:
    """The caller's key pairs, found through the user's name index."""
    prefix = keys.keypair_name(caller.user_id, "")
    index, _ = await store.list_all(prefix, resource_pb2.ResourceMeta)
    found = await asyncio.gather(*(store.find(keys.keypair(item.value.id), keypair_pb2.KeyPair)
                                   for item in index))
    return [item for item in found if item is not None and _owned(caller, item.value)]


async def list_keypairs(
    store: Store, caller: Principal | None, request: keypair_pb2.ListKeyPairsRequest,
) -> tuple[list[keypair_pb2.KeyPair], str]:
    """The caller's key pairs (every user's for a cloud-admin asking), by id."""
    size = pages.page_size(request.page_size)
    every = caller is None or policy.list_scope(
        caller, all_projects=request.all_projects) is None
    wanted = filtering.parse(request.filter, FILTER_KEYS)
    if every or caller is None:
        items, _ = await store.list_all(keys.KEYPAIRS, keypair_pb2.KeyPair)
    else:
        items = await _own(store, caller)
    shown = sorted((_with_revision(item) for item in items
                    if wanted.matches(_fields(item.value), item.value.meta.labels)),
                   key=lambda pair: pair.meta.id)
    return pages.page_of(shown, lambda pair: pair.meta.id, size=size,
                         page_token=request.page_token, listing=PAGE_LISTING,
                         well_formed=resources.is_uuid)
