"""The CNI plugin: container runtimes hand stockade their containers' network namespaces."""
