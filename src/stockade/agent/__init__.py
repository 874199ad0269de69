"""The node agent: state, store, reconciliation, the local API and what hangs off them."""
