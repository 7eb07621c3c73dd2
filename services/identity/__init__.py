"""nubis-identity: projects, users, roles, signed tokens, service catalog and quotas."""
