"""Services and their load-balancing state: from Service and EndpointSlice objects to the lb maps."""
