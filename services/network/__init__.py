"""nubis-network: networks, subnets, IPAM, ports, routers, floating IPs and security groups."""
