"""Key pairs through a real compute service: import, generation, fingerprints, isolation.

The starting state is the world of the authorization tests: project A's admin,
member and reader (three users of one project), project B's admin, and a
cloud-admin. A key pair is its user's: the others of its project see it no more
than another project does.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.protobuf import empty_pb2, field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import keypair_pb2

from services.common import errors
from services.compute import keypair
from tests.functional.compute.flavor_harness import ComputeWorld, compute, reason_of

__all__ = ["compute"]

K = keypair_pb2


def _name(prefix: str = "k") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _create(compute: ComputeWorld, caller: str = "a_member", *, name: str = "",
                  public_key: str = "", **request: Any) -> K.CreateKeyPairResponse:
    reply: K.CreateKeyPairResponse = await compute.stub.CreateKeyPair(K.CreateKeyPairRequest(
        key_pair=K.KeyPair(meta=resource_pb2.ResourceMeta(name=name or _name()),
                           public_key=public_key), **request), metadata=compute.as_(caller))
    return reply


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _openssh(public: Any) -> str:
    line: bytes = public.public_bytes(serialization.Encoding.OpenSSH,
                                      serialization.PublicFormat.OpenSSH)
    return line.decode()


def _keygen_fingerprint(public_key: str, directory: Path) -> str:
    path = directory / f"{uuid.uuid4().hex[:8]}.pub"
    path.write_text(public_key + "\n")
    shown = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)], check=True,
                           capture_output=True, text=True).stdout
    return shown.split()[1]


async def test_generated_private_key_matches_the_stored_public_key(
        compute: ComputeWorld, tmp_path: Path) -> None:
    made = await _create(compute)
    assert made.private_key.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(made.private_key.encode(), password=None)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    stored = await compute.stub.GetKeyPair(K.GetKeyPairRequest(id=made.key_pair.meta.id),
                                           metadata=compute.as_("a_member"))
    assert stored.public_key.split()[:2] == _openssh(private.public_key()).split()
    assert stored.fingerprint == _keygen_fingerprint(stored.public_key, tmp_path)
    assert stored.user_id == compute.world.users["a_member"]
    assert stored.meta.project_id == compute.world.project_a
    assert stored.key_type == K.KeyPair.KEY_TYPE_SSH and stored.state == K.KeyPair.ACTIVE
    # The private key is in no stored record.
    # Empty keeps every field as an unknown one: any record reads, and writes back as stored.
    items, _ = await compute.store.list_all("", empty_pb2.Empty)
    secret = made.private_key.splitlines()[1].encode()
    assert not [item.key for item in items if secret in item.value.SerializeToString()]


async def test_a_retried_create_does_not_hand_out_the_private_key_again(
        compute: ComputeWorld) -> None:
    request_id = str(uuid.uuid4())
    name = _name()
    first = await _create(compute, name=name, request_id=request_id)
    second = await _create(compute, name=name, request_id=request_id)
    assert first.private_key and not second.private_key
    assert second.key_pair.meta.id == first.key_pair.meta.id
    dry = await _create(compute, name=_name(), validate_only=True)
    assert dry.key_pair.meta.id == "" and not dry.private_key


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "ecdsa"])
async def test_imported_keys_keep_their_comment_and_get_ssh_keygen_fingerprints(
        compute: ComputeWorld, tmp_path: Path, kind: str) -> None:
    private: Any
    if kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif kind == "rsa":
        private = rsa.generate_private_key(65537, 2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    line = f"{_openssh(private.public_key())} someone@example"
    made = await _create(compute, public_key=f"  {line}\n")
    assert made.key_pair.public_key == line and not made.private_key
    assert made.key_pair.fingerprint == _keygen_fingerprint(line, tmp_path)


@pytest.mark.parametrize("public_key", [
    "ssh-ed25519",
    "ssh-ed25519 not-base64!",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA== truncated",
    "-----BEGIN PUBLIC KEY-----",
    "ssh-dss AAAAB3NzaC1kc3MAAACBAP8=",
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\nb",
])
async def test_bad_public_keys_are_invalid_argument(compute: ComputeWorld,
                                                    public_key: str) -> None:
    refused = await _error(_create(compute, public_key=public_key))
    assert (refused.code(), reason_of(refused)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                    keypair.BAD_KEY)


def _ssh_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _weak_rsa_line(bits: int = 768) -> str:
    """An ssh-rsa line of a `bits`-bit modulus (too short for cryptography to generate)."""
    modulus = (1 << (bits - 1)) | 0xF1
    blob = b"".join(_ssh_string(part) for part in (
        b"ssh-rsa", (65537).to_bytes(3, "big"), b"\x00" + modulus.to_bytes(bits // 8, "big")))
    return f"ssh-rsa {base64.b64encode(blob).decode()}"


async def test_short_rsa_keys_are_refused(compute: ComputeWorld) -> None:
    refused = await _error(_create(compute, public_key=_weak_rsa_line()))
    assert reason_of(refused) == keypair.BAD_KEY


async def test_names_are_unique_per_user_not_per_project(compute: ComputeWorld) -> None:
    name = _name()
    results = await asyncio.gather(*(_create(compute, name=name) for _ in range(3)),
                                   return_exceptions=True)
    lost = [item for item in results if isinstance(item, grpc.aio.AioRpcError)]
    assert len(lost) == 2
    assert {(exc.code(), reason_of(exc)) for exc in lost} == {
        (grpc.StatusCode.ALREADY_EXISTS, keypair.NAME_TAKEN)}
    # Another user of the same project may use the name too.
    await _create(compute, "a_admin", name=name)


async def test_key_pairs_are_their_users_alone(compute: ComputeWorld) -> None:
    made = (await _create(compute)).key_pair
    by_id = K.GetKeyPairRequest(id=made.meta.id)
    by_name = K.GetKeyPairRequest(id=made.meta.name)
    assert (await compute.stub.GetKeyPair(by_name, metadata=compute.as_("a_member"))
            ).meta.id == made.meta.id
    for caller in ("a_admin", "a_reader", "b_admin"):
        for request in (by_id, by_name):
            hidden = await _error(compute.stub.GetKeyPair(request, metadata=compute.as_(caller)))
            assert hidden.code() == grpc.StatusCode.NOT_FOUND
        listed = await compute.stub.ListKeyPairs(K.ListKeyPairsRequest(),
                                                 metadata=compute.as_(caller))
        assert made.meta.id not in {item.meta.id for item in listed.key_pairs}
    gone = await _error(compute.stub.DeleteKeyPair(K.DeleteKeyPairRequest(id=made.meta.id),
                                                   metadata=compute.as_("a_admin")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    own = await compute.stub.ListKeyPairs(K.ListKeyPairsRequest(filter=f"name={made.meta.name}"),
                                          metadata=compute.as_("a_member"))
    assert [item.meta.id for item in own.key_pairs] == [made.meta.id]
    every = await compute.stub.ListKeyPairs(K.ListKeyPairsRequest(all_projects=True,
                                                                  page_size=1000),
                                            metadata=compute.as_("cloud_admin"))
    assert made.meta.id in {item.meta.id for item in every.key_pairs}
    denied = await _error(compute.stub.ListKeyPairs(K.ListKeyPairsRequest(all_projects=True),
                                                    metadata=compute.as_("a_member")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_update_changes_labels_only_and_delete_frees_the_name(
        compute: ComputeWorld) -> None:
    member = compute.as_("a_member")
    made = (await _create(compute)).key_pair
    changed = await compute.stub.UpdateKeyPair(K.UpdateKeyPairRequest(
        key_pair=K.KeyPair(meta=resource_pb2.ResourceMeta(
            id=made.meta.id, description="laptop", labels={"owner": "ops"},
            revision=made.meta.revision)),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.description", "meta.labels"])),
        metadata=member)
    assert (changed.meta.description, dict(changed.meta.labels)) == ("laptop", {"owner": "ops"})
    assert changed.public_key == made.public_key
    renamed = await _error(compute.stub.UpdateKeyPair(K.UpdateKeyPairRequest(
        key_pair=K.KeyPair(meta=resource_pb2.ResourceMeta(id=made.meta.id, name="other")),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.name"])), metadata=member))
    assert renamed.code() == grpc.StatusCode.INVALID_ARGUMENT
    stale = await _error(compute.stub.DeleteKeyPair(K.DeleteKeyPairRequest(
        id=made.meta.name, revision=made.meta.revision), metadata=member))
    assert stale.code() == grpc.StatusCode.ABORTED
    await compute.stub.DeleteKeyPair(K.DeleteKeyPairRequest(id=made.meta.name), metadata=member)
    again = await _create(compute, name=made.meta.name)
    assert again.key_pair.meta.id != made.meta.id


async def test_for_boot_finds_the_users_key_in_its_project(compute: ComputeWorld) -> None:
    world = compute.world
    made = (await _create(compute)).key_pair
    user = world.users["a_member"]
    found = await keypair.for_boot(compute.store, user, world.project_a, made.meta.name)
    assert found.public_key == made.public_key
    for user_id, project_id, name in ((world.users["a_admin"], world.project_a, made.meta.name),
                                      (user, world.project_b, made.meta.name),
                                      (user, world.project_a, "no-such-key")):
        with pytest.raises(errors.NotFound) as missing:
            await keypair.for_boot(compute.store, user_id, project_id, name)
        assert missing.value.metadata["key_name"] == name
