"""nubis-storage: images, storage pools, volumes, snapshots and attachments."""
