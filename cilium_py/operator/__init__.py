"""The operator: what no single node may decide for the cluster. Today the CustomResource
Definitions it installs (`crds`, generated from `schemas`); identity GC, cluster-pool IPAM and
the leader lease build on them."""
