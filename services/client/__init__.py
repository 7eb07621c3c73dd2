"""The Python SDK and the nubis command-line interface."""
