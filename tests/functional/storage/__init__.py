"""Functional tests of nubis-storage: images, pools, volumes, snapshots, attachments."""
