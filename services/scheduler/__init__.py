"""nubis-scheduler: nodes, inventories, atomic placement claims, filters, weighers and server groups."""
