"""The embedded all-in-one lab: etcd, Redis, every service and N agents on one machine."""
