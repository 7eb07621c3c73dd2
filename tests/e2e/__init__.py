"""End-to-end tests: the lab and real QEMU guests."""
