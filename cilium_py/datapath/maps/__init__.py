"""One module per BPF map: the ctypes mirror of its key and value (checked against the C
layout by tests/bpf/test_layout.py) and a wrapper in domain terms that hides byte order."""
