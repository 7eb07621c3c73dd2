"""nubis-compute: flavors, instances, instance actions and the boot workflow."""
