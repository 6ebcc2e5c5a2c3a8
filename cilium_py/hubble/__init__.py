"""Hubble: flows from datapath events, served over Cilium's Observer gRPC API.

One module per pipeline stage: `parser` (event -> Flow), `ring` (recent flows),
`filters` (FlowFilter matching), `observer` (the gRPC server), `metrics` (Prometheus).
`api/` holds stubs generated from hubble/proto by `make proto`; never edit them.
"""
