"""nubis-scheduler: nodes, placement claims, filters, weighers and server groups."""
