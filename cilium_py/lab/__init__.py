"""The local lab: a node network namespace with pods as namespaces, on one machine."""
