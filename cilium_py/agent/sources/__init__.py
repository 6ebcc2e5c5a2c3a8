"""Sources turn the outside world (a manifests directory, later the Kubernetes API) into
typed objects in the agent's store."""
