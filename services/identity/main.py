"""The nubis-identity process: projects, users, roles, tokens, catalog and quotas."""

from __future__ import annotations

import asyncio

from nubis.identity.v1 import identity_pb2_grpc

from services.common import auth, catalog, server
from services.common.settings import Settings, load_settings
from services.common.store import Store
from services.identity import policy, servicer, throttle, token, user


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Wire the identity service: signing key, verifier, servicer, policy, catalog entry."""
    key = await token.active_key(store, settings.auth)
    verifier = auth.TokenVerifier(store, resync_interval=settings.auth.revocation_resync)
    await verifier.start()
    verifier.add_public_key(key.kid, key.public_pem())
    issuer = token.Issuer(
        store=store,
        settings=settings.auth,
        hasher=user.PasswordHasher(settings.auth),
        throttle=throttle.LoginThrottle(store, settings.auth.max_failures,
                                        settings.auth.throttle_seconds),
    )
    handler = servicer.IdentityServicer(store, settings, issuer, verifier)
    return server.ServiceParts(
        registrations=[server.Registration(
            policy.SERVICE, handler, identity_pb2_grpc.add_IdentityServiceServicer_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, policy.TABLE),
        public_methods=policy.PUBLIC_METHODS,
        background=[
            *verifier.tasks,  # started above; a failed watch ends the service
            catalog.keep_server_registered(store, "identity", policy.SERVICE,
                                           ttl=settings.catalog_ttl),
        ],
        on_stop=[verifier.stop],
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("identity", build, settings, settings.identity))


if __name__ == "__main__":
    main()
