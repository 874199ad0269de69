"""Network plumbing (shell): namespaces, sysctls, rtnetlink (bridge, veth, addresses), IPAM."""
