"""The lab's server defaults: what `nubis server create NAME --wait` boots with in a lab.

The last seeding step writes them into the state dir (see
commands/server_defaults): the smallest seeded flavor (m1.tiny), the nubis
guest where the lab registered it (it says its address on the console) else
lab-hello, the private network and the default security group. Run again, it
writes them afresh from what the cloud has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nubis.compute.v1 import compute_service_pb2_grpc, flavor_pb2
from nubis.storage.v1 import image_pb2

from services.client import image_stream
from services.client.commands import server_defaults
from services.client.lab import guest_image, seed

if TYPE_CHECKING:
    from services.client.lab.components import PostStartContext

FLAVOR = "m1.tiny"
SECURITY_GROUP = "default"


def seed_defaults(ctx: PostStartContext) -> None:
    """Write the lab's server defaults and say them."""
    seeder = seed.Seeder(ctx)
    image = seeder.run("storage", image_stream.storage_stub, _image)
    flavor = seeder.run("compute", compute_service_pb2_grpc.ComputeServiceStub, _flavor)
    defaults = {"flavor": flavor or "", "image": image or "",
                "network": seed.PRIVATE_NETWORK, "security_group": SECURITY_GROUP}
    path = server_defaults.write(ctx.plan.state_dir, defaults)
    said = ", ".join(f"{key} {value}" for key, value in defaults.items() if value)
    seeder.say(f"server defaults: {said} ({path}; `nubis server create NAME --wait` "
               "boots with them)")


async def _image(s: seed.StorageStub) -> str:
    """The nubis guest if it is registered and ACTIVE, else the lab image."""
    reply = await s.ListImages(image_pb2.ListImagesRequest(
        filter=f"name={guest_image.GUEST_NAME}"))
    if any(found.state == image_pb2.Image.ACTIVE for found in reply.images):
        return guest_image.GUEST_NAME
    return seed.IMAGE_NAME


async def _flavor(s: seed.ComputeStub) -> str:
    """m1.tiny if compute has it, else the smallest flavor ("" with none)."""
    reply = await s.ListFlavors(flavor_pb2.ListFlavorsRequest(page_size=1000))
    names = [f.meta.name for f in sorted(reply.flavors, key=lambda f: (f.vcpus, f.ram_mb))]
    return FLAVOR if FLAVOR in names else (names[0] if names else "")
