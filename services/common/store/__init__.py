"""The etcd store: the only code in nubis that talks to etcd."""
