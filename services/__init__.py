"""nubis: an OpenStack-style IaaS control plane (gRPC services, etcd state, libvirt agents)."""
