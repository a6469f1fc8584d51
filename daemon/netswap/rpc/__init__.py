"""ONC RPC v2 (RFC 5531) and XDR (RFC 4506) for the NFSv3 and MOUNT servers, without any I/O."""
