"""nubis-agent: the per-node Celery worker; the only code that touches libvirt."""
