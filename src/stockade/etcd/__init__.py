"""etcd as the agent's datastore (``stockade agent --datastore etcd``): a client of
etcd's v3 JSON gateway over httpx (client.py), list-then-watch of a key prefix
(watch.py), and the agent's feed and writes (datastore.py). Imported only on that
path."""
