"""Sources turn the outside world (a manifests directory, or a cluster's API server through
list+watch) into typed objects in the agent's store; everything after the store is shared."""
