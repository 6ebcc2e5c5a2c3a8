"""The per-node agent: endpoints, conntrack GC, event relay."""
