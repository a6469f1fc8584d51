"""NFSv3 swap exports: file handles, per-node swap files (no sockets, no RPC here)."""
