"""The swap model both protocols serve: who is which node (``nodes``), the storage a node
swaps to (``store``: one Backend path for NBD swap exports and NFS swap files), and when a
node holds its reserve (``attach``). nbd/ and nfs/ are front ends over it."""
