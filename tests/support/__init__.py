"""What the tests share: starting netswapd, talking NBD and NFS to it raw, reading its
metrics, waiting on conditions. Imported as `support` (tests/conftest.py puts tests/ on the
path); no test module imports another."""
