"""Names the CNI plugin and the agent agree on for one attachment (pure, no imports).

The plugin (``cni/plugin.py``) sends them and the agent (``agent/cni_ops.py``)
stores under them, so they are part of the agent's protocol. This module
imports nothing: the plugin runs once per container event and stays light.
"""


def attachment_id(network: str, container_id: str, ifname: str) -> str:
    """The primary key the CNI spec tells plugins to store state under."""
    return f"{network}/{container_id}/{ifname}"


def ipam_owner(container_id: str, ifname: str) -> str:
    """The agent's IPAM owner of an attachment's address."""
    return f"{container_id}/{ifname}"
