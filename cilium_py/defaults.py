"""Default paths and sizes, named after Cilium's options where one exists."""

import os

BPF_ROOT = "/sys/fs/bpf/ciliumpy"  # one directory per node under it: bpffs is not per netns
RUN_DIR = "/var/run/ciliumpy"      # one directory per node under it: API and monitor sockets
NODE_NAME = "default"

CT_GLOBAL_TCP_MAX = 524288  # --bpf-ct-global-tcp-max
CT_GLOBAL_ANY_MAX = 262144  # --bpf-ct-global-any-max
CT_TIMEOUT_REGULAR_TCP = 8000
CT_TIMEOUT_REGULAR_TCP_SYN = 60
CT_TIMEOUT_REGULAR_TCP_FIN = 10
CT_TIMEOUT_REGULAR_ANY = 60
POLICY_MAP_MAX = 16384       # --bpf-policy-map-max: policy entries per endpoint
POLICY_MAP_ENDPOINTS = 64    # endpoints the shared policy map holds at full budget
CT_GC_INTERVAL = 10.0  # seconds between conntrack GC passes

EVENTS_RINGBUF_PAGES = 256  # 1 MiB ring buffer
MONITOR_AGGREGATION = "medium"

# Where `make setup` builds the real peers of tools/go.mod (kube-apiserver, etcd, kubectl...):
# a cache outside the clone, kept between clones.
TOOLS_CACHE = os.environ.get("CILIUMPY_TOOLS", "/var/cache/ciliumpy")
TOOLS_BIN = os.path.join(TOOLS_CACHE, "bin")
