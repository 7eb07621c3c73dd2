"""Connection settings of service-to-service calls: identity's address, the credential, retries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.settings import Settings, TlsSettings


@dataclass(frozen=True)
class ServiceCredential:
    """The user a service logs in as (it holds the cloud-wide `service` role)."""

    user: str
    """Name of the service user."""
    password: str = field(repr=False)
    """Its password; kept out of repr so it never reaches a log line."""
    project: str
    """Project (id or name) the tokens are scoped to."""


@dataclass(frozen=True)
class ClientSettings:
    """How one process reaches the other nubis services.

    Identity's address is the only one configured: every other service is
    found in identity's catalog (ListEndpoints) and spread over its replicas.
    """

    identity_address: str
    """host:port of identity: where tokens and the catalog come from."""
    credential: ServiceCredential | None
    """Who calls; None: no service credential is configured, so only public
    calls (Authenticate) can be made."""
    tls: TlsSettings | None = None
    """Transport security of every channel (None or disabled: plaintext)."""
    attempts: int = 5
    """Attempts of a retryable call that keeps failing with UNAVAILABLE, the
    first included; each goes to the next replica."""
    initial_backoff: float = 0.1
    """Seconds before the first retry; each wait is jittered between half and all of its bound."""
    max_backoff: float = 2.0
    """Upper bound in seconds of the wait between two attempts."""
    backoff_multiplier: float = 2.0
    """Growth of the wait bound from one retry to the next."""
    renew_fraction: float = 0.25
    """A token is renewed once less than this fraction of its lifetime is left,
    so calls never carry one that is about to expire."""
    catalog_max_age: float = 30.0
    """Seconds a service's endpoints are trusted before identity is asked
    again (sooner when a call finds one unavailable or none is known)."""
    suspect_seconds: float = 5.0
    """Seconds an endpoint that answered UNAVAILABLE is tried only after the others."""
    endpoints: Mapping[str, str] = field(default_factory=dict)
    """Services reached at a given address instead of the catalog's (service name ->
    host:port): the CLI's NUBIS_<SERVICE>_ADDR overrides. Empty for services."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientSettings:
        """The client settings of a process: identity's advertised address, service_auth, TLS.

        Adjust the retry fields with dataclasses.replace.
        """
        password = settings.service_auth.secret()
        credential = None
        if password is not None:
            credential = ServiceCredential(settings.service_auth.user, password,
                                           settings.service_auth.project)
        return cls(identity_address=settings.identity.advertised_address(),
                   credential=credential, tls=settings.tls)
