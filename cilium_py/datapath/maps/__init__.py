"""One module per BPF map: the ctypes mirror of its key and value, and a wrapper in domain
terms. `open_all(root)` opens every map of one node's datapath."""
