"""netswap-node: the node side of netswap."""
