"""The agent's side of Kubernetes mode: what it writes to the API server and what it takes
from there beyond the store the Kubernetes source fills. One concern per module:

* `identities`: cluster-wide identities as CiliumIdentity objects (a drop-in for the
  file-backed allocator of agent/identity.py);
* `endpoints`: one CiliumEndpoint per local pod, from the control plane's endpoint state;
* `remote`: other nodes' CiliumEndpoints and the API server's own addresses in the ipcache;
* `policystatus`: the `Valid` condition of CiliumNetworkPolicies and their clusterwide kind;
* `node`: this node's CiliumNode (addresses; the pod CIDR the operator allocated);
* `wiring`: how the daemon builds and reports them.
"""
