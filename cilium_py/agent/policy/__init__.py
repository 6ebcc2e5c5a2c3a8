"""Policy: resolved rules to per-endpoint policy-map state, and writing that state."""
