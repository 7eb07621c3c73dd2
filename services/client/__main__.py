"""`python -m services.client` runs the `nubis` CLI."""

from services.client.cli import main

main()
