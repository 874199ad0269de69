"""The MicroService dependency operator: a graph of services in, NetworkPolicies out.

`service.py` (pure) reads and validates MicroService objects, `render.py` (pure)
turns the graph into NetworkPolicy manifests, findings and summaries. The
offline `stockade operator render` and the live operator call the same functions.
"""
