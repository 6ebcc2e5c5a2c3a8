"""Talking to the Kubernetes API: the resource table (`resources`) and a thin client on
JSON documents (`client`). Shared by the agent's Kubernetes source and status writers, the
operator and the lab; importing this package loads nothing heavy."""
