"""ciliumpy: a Cilium-style eBPF datapath driven by a Python control plane."""

__version__ = "0.1.0"
