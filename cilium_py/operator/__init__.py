"""The operator: what no single node may decide (CRD installation, pod CIDRs per node,
identity garbage collection), done by one leader per cluster."""
