"""Kubernetes as a datastore: a thin client of the API (client.py), list-then-watch
(reflector.py) and the agent's feed from it (datastore.py).

Imported only on the Kubernetes code path: the CLI and the CNI plugin never pay
for httpx or lightkube.
"""
